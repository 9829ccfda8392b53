"""The answer engine: one worker thread owns the model, batches questions, hot-swaps adapters.

Why one worker: a model is not safe to call from several threads, and a small model on a CPU
earns most of its throughput from batching (one decoding step for eight rows costs little more
than for one). So callers only enqueue: `submit` returns a `Future` at once (Bolt listeners must
ack within milliseconds).

Continuous batching: the worker runs its own greedy decode loop (`bot.engine.decoding`) instead
of `model.generate`. Between two decoding steps it admits whatever is waiting (up to
`batch_size` rows in all): the newcomers are prefilled together and join the rows already
decoding, and rows that finished leave at once. A question that arrives mid-answer starts at the
next step instead of waiting for the whole batch. Greedy decoding keeps every answer equal to
the one it gets alone.

Adapters are merged into the base weights (`bot.engine.merging`): serving with an adapter costs
no more per token than the base model. Swaps go through the same queue, in order: a question
asked after a swap was requested is answered by the new version, and an answer in flight always
finishes on the version it started with. Every row carries its version; a row whose version is
not the merged one is computed through a per-row low-rank correction (`MergedWeights.mixed`),
exact up to float rounding, so rows of several versions decode in one batch. The worker takes
the whole queue between two steps: it applies the swaps in order (each folder read and checked
whole: config, weights, shapes against the base model; a broken folder is refused and the
version before keeps serving) and tags every question with the version its place gives.
Admissions then take the oldest waiting question first and fill the batch with those on a
version already in it before any other (`choose_admissions`): with swaps queued between
waiting questions (a promotion and a rollback during a backlog), batches stay one version.
A batch's version is merged (`_settle`) at once when newcomers alone make it up or no row is
left; with rows decoding on it, once their corrections have cost as much as the last merge
did (a merge, one pass over the weights, ~2 steps of 8 rows, stalls every row decoding; a
corrected 8-row step costs 4-12 % more than a plain one, bot/engine/merging.py). While rows
of two versions share the batch every step is corrected whichever version is merged, so
merging then would only add the merge. Questions queued on both sides of a swap can still
be prefilled together, each row with its own version's weights (and prefix states).
(`mix_versions=False` drains instead: admissions stop until the running rows finish; the
benchmark compares the two.) When the worker exits the adapter is unmerged: the `LoadedModel`
is the base again.

On a CPU the worker can choose, step by step, between all torch threads and one
(`tune_threads`, `bot.engine.threads`): on cores shared with other work one thread is several
times faster; on idle cores all of them may be.

Importing this module is cheap (no torch, no transformers): they load with the model.

`stop()` refuses new work, fails everything still queued with `EngineStopped`, lets the rows in
flight finish within the timeout, and aborts them (at the next decoding step) past that.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.engine.loading import LoadedModel, load_from_settings
from bot.engine.prompt import EncodedPrompt, check_question, encode_prompt
from bot.engine.streaming import RowStream
from bot.engine.types import (
    AnswerRequest,
    AnswerResult,
    EngineError,
    EngineStopped,
    EngineTimeout,
    PartialCallback,
    Timings,
)

log = logging.getLogger(__name__)

STOPPED = "the answer engine is stopped: the bot is shutting down or restarting; ask again shortly"
_NONE = object()  # no version (None is one: the base model)
ABORT_GRACE_S = 10.0  # after an abort, one decoding step at most
# `generate`-style options the decode loop honours (greedy only; the benchmark forces lengths)
SUPPORTED_OPTIONS = {"min_new_tokens", "suppress_tokens", "do_sample", "num_beams"}


@dataclass
class _Job:
    request: AnswerRequest
    on_partial: PartialCallback | None
    future: Future = field(default_factory=Future)
    submitted_at: float = field(default_factory=time.perf_counter)


@dataclass
class _Row:
    """A question being decoded: its job, prompt, token stream and the version answering it."""

    job: _Job
    prompt: EncodedPrompt | None = None
    stream: RowStream | None = None
    version: str | None = None
    admitted_at: float = 0.0
    first_token_at: float | None = None


@dataclass
class _Swap:
    version: str | None
    path: Path | None
    future: Future = field(default_factory=Future)
    started: float = 0.0  # when the worker took it up


class AnswerEngine:
    """Answers `AnswerRequest`s with the base model and the active LoRA adapter."""

    # what correcting the rows of an unmerged version adds to a step or prefill, as a
    # share of its time (a corrected step cost 4-12 % more than a plain one, measured on this
    # project's CPUs): `_settle` merges once the share of those steps has cost one merge
    corrected_share = 0.1

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        system_prompt: str,
        max_input_tokens: int,
        max_new_tokens: int,
        batch_size: int,
        generate_options: dict[str, Any] | None = None,
        tune_threads: bool = False,
        mix_versions: bool = True,
        row_kernels: bool | None = None,
    ):
        """`generate_options`: `min_new_tokens`, `suppress_tokens` (decoding is always greedy).

        `tune_threads`: on a CPU, choose per step between all torch threads and one, from the
        steps' measured times (`bot.engine.threads`); off, torch's thread count is left alone.

        `mix_versions`: a swap applies while rows decode (they keep their version through a
        per-row correction); off, it waits until the running rows have finished.

        `row_kernels`: while the worker runs, the model's linear layers compute a few rows with
        the skinny kernel built on this machine, or without one with the weight as the left
        operand (`bot.engine.kernels`; 1.3-2x faster steps on this project's CPUs); True: at
        every row count up to `kernels.MOST_ROWS`; None: where it applies (a CPU model in
        float32, or in bf16 with the kernel), at the row counts where the worker measured it
        faster on this machine's cores at its start (1-3 s, and ~2 s to build the kernel once
        a machine), for one thread and for all.
        """
        from bot.engine.loading import base_weight_reader
        from bot.engine.merging import MergedWeights

        if batch_size < 1 or max_new_tokens < 1 or max_input_tokens < 1:
            raise EngineError("batch_size, max_new_tokens and max_input_tokens must be at least 1")
        options = dict(generate_options or {})
        unknown = set(options) - SUPPORTED_OPTIONS
        if unknown or options.get("do_sample") or options.get("num_beams", 1) != 1:
            raise EngineError(
                f"unsupported generate options {sorted(unknown) or options}: the engine decodes "
                "greedily and honours only min_new_tokens and suppress_tokens"
            )
        self.loaded = loaded
        self.system_prompt = system_prompt
        self.max_input_tokens = max_input_tokens
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.generate_options = options
        self.tune_threads = tune_threads
        self.mix_versions = mix_versions
        self.row_kernels = row_kernels
        self._tuner = None  # built by the worker (it knows torch's thread count)
        self._base = loaded.model
        # the adapter merged into the base (bf16: each merge recomputed from the base's file)
        self._weights = MergedWeights(model=loaded.model, base_weights=base_weight_reader(loaded))
        self._adapters: dict = {}  # the active adapter and the one before, for a cheap swap back
        self._active: str | None = None
        # a merge's cost (the last one's seconds; None: none yet) against what correcting the
        # rows of one unmerged version (`_charged`) has cost since they were alone on it
        # (see `_settle`)
        self._merge_seconds: float | None = None
        self._unmerged_seconds = 0.0
        self._charged: object = _NONE  # the version `_unmerged_seconds` counts for
        self._stop_ids = _stop_token_ids(loaded)
        tokenizer = loaded.tokenizer
        self._pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self._stop_ids)
        )
        self._pending: deque[_Job | _Swap] = deque()
        # questions taken from the queue, each with the version it is to be answered by, until
        # admitted (`_choose`); the worker's, read by `stop` and `stats` (under `_cond`)
        self._waiting: list[tuple[_Job, str | None]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None
        self._counts = {
            "answered": 0,
            "failed": 0,
            "batches": 0,
            "swaps": 0,
            "merges": 0,  # versions merged into the weights (a swap is merged once settled)
            "last_batch_size": 0,
            "steps": 0,
            "corrected_steps": 0,  # steps with a row on a version other than the merged one
            "row_kernels": False,  # whether the worker computes steps with kernels.linear
            "row_kernel": None,  # which product: "skinny" or "weight on the left"
            "row_kernel_rows": None,  # {threads: the row counts it won} (None: all, or unused)
            "row_kernel_widen": False,  # bf16 products past those rows computed in float32
            "row_kernel_shapes": {},  # {rows: "3x8"}: the kernel's shape measured at each count
        }
        # batches: prefill groups (questions admitted together); steps: decoding steps

    @classmethod
    def from_settings(cls, settings, loaded: LoadedModel | None = None) -> AnswerEngine:
        return cls(
            loaded if loaded is not None else load_from_settings(settings, serving=True),
            system_prompt=settings.system_prompt,
            max_input_tokens=settings.max_input_tokens,
            max_new_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size,
            tune_threads=settings.tune_threads,
        )

    # lifecycle

    def start(self) -> AnswerEngine:
        with self._cond:
            if self._stopping:
                raise EngineStopped("a stopped engine cannot start again; build a new one")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="apprentice-engine", daemon=True
                )
                self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, fail what is queued, give the batch in flight `timeout` s to finish."""
        with self._cond:
            self._stopping = True
            queued = [*self._pending, *(job for job, _ in self._waiting)]
            self._pending.clear()
            self._waiting.clear()
            self._cond.notify_all()
        for item in queued:
            _fail(item.future, EngineStopped(STOPPED))
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        thread.join(timeout)
        if thread.is_alive():
            self._abort.set()
            thread.join(ABORT_GRACE_S)
            if thread.is_alive():
                log.warning("the engine worker did not stop within %.0f s", timeout + ABORT_GRACE_S)

    def __enter__(self) -> AnswerEngine:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # requests

    def submit(
        self, request: AnswerRequest | str, *, on_partial: PartialCallback | None = None
    ) -> Future:
        """Queue a question; the `Future` gives an `AnswerResult`. Thread-safe, never blocks."""
        if isinstance(request, str):
            request = AnswerRequest(question=request)
        check_question(request.question)
        job = _Job(request=request, on_partial=on_partial)
        self._enqueue(job)
        return job.future

    def answer(self, request: AnswerRequest | str, *, timeout: float | None = None) -> AnswerResult:
        """Submit and wait; raise `EngineTimeout` when `timeout` seconds pass first."""
        if self._thread is None:
            raise EngineError("the answer engine is not started: call start() (or use `with`)")
        future = self.submit(request)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            future.cancel()  # still queued: nobody waits for it, so skip it
            waiting = self.stats()["queue_depth"]
            raise EngineTimeout(
                f"no answer within {timeout:g} s; the engine is busy ({waiting} more question(s) "
                "waiting). Ask again in a minute, or raise APPRENTICE_ANSWER_TIMEOUT_S"
            ) from None

    # adapters

    def set_adapter(self, version: str | None, path: Path | None) -> Future:
        """Queue a swap to adapter `version` (in folder `path`), or to the base model for None.

        The worker applies it between two steps; the `Future` gives the seconds the swap took
        (reading, and merging when no row was decoding: see `_settle`), or raises
        `EngineError` if the folder does not load (the active version stays).
        """
        if version is not None and path is None:
            raise EngineError(f"adapter {version} needs the folder it is stored in")
        swap = _Swap(version=version, path=Path(path) if path is not None else None)
        self._enqueue(swap)
        return swap.future

    @property
    def active_version(self) -> str | None:
        return self._active

    def stats(self) -> dict:
        with self._cond:
            jobs = sum(isinstance(item, _Job) for item in self._pending)
            return {
                "queue_depth": jobs + len(self._waiting),
                "swaps_pending": len(self._pending) - jobs,
                "active_version": self._active,
                "merged_version": self._weights.version,
                "running": self._thread is not None and self._thread.is_alive(),
                **self._counts,
                "threads": self._tuner.choice if self._tuner else None,
            }

    # the worker

    def _enqueue(self, item: _Job | _Swap) -> None:
        with self._cond:
            if self._stopping:
                raise EngineStopped(STOPPED)
            self._pending.append(item)
            self._cond.notify()

    def _next_work(self, *, running: int) -> list[_Job | _Swap] | None:
        """What came in since the last step: swaps and questions, in queue order ([]: nothing
        new), or None.

        Blocks only when no row is decoding and no question waits. None means: stopping and
        nothing left to finish. With `mix_versions` the whole queue is taken: the worker
        applies its swaps in order and each question waits (`_waiting`) with the version its
        place in the queue gives, so that an admission can choose among them (`_choose`).
        Without it, a swap at the head stops the taking until the running rows have finished
        (drain), and comes back alone.
        """
        with self._cond:
            while not self._pending and not self._waiting and not running and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return [] if running else None
            if self.mix_versions:
                work = list(self._pending)
                self._pending.clear()
                return work
            if self._pending and isinstance(self._pending[0], _Swap):
                return [] if running or self._waiting else [self._pending.popleft()]
            work: list[_Job | _Swap] = []
            while self._pending and not isinstance(self._pending[0], _Swap):
                work.append(self._pending.popleft())
            return work

    def _choose(self, room: int, keys: list[str | None]) -> tuple[list[_Job], list[str | None]]:
        """The waiting questions to admit into `room` free rows beside rows on versions `keys`
        (`choose_admissions`), and their versions."""
        with self._cond:
            self._waiting = [entry for entry in self._waiting if not entry[0].future.cancelled()]
            taken = choose_admissions(
                [version for _, version in self._waiting],
                room=room,
                decoding=keys,
                mixing=self.mix_versions,
            )
            chosen = [self._waiting[index] for index in taken]
            taken_set = set(taken)
            self._waiting = [e for i, e in enumerate(self._waiting) if i not in taken_set]
        chosen = [(job, v) for job, v in chosen if job.future.set_running_or_notify_cancel()]
        return [job for job, _ in chosen], [v for _, v in chosen]

    def _run(self) -> None:
        import torch

        from bot.engine import kernels, skinny
        from bot.engine.decoding import DecodeBatch
        from bot.engine.threads import ThreadTuner

        row_kernels, wins, library, widen = self.row_kernels, None, None, False
        shapes: dict = {}  # measured only with row_kernels None
        if row_kernels is not False and kernels.applies(self._base, library=True):
            library = skinny.load()  # built on this machine at first use; None: can't be
        product = "skinny" if library else "weight on the left"
        if row_kernels is None:  # where it applies, measured on this machine's cores
            # the kernel's fastest shape for prefills (its steps keep the default: see
            # measure_shapes), then at which counts it beats F.linear
            shapes = kernels.measure_shapes(self._base, library=library, above=self.batch_size)
            # a decoding step's counts: a tie goes to the kernel (its layer step; see measure)
            ties = self.batch_size if library else 0
            wins, ratios = kernels.measure(self._base, library=library, ties_up_to=ties)
            widening = kernels.measure_widening(self._base)  # bf16 on a CPU only
            widen = widening is not None and widening < 0.95
            row_kernels = any(wins.values()) or widen
            if ratios or widening is not None:
                log.info(
                    "%s products at %s rows (threads: rows; time ratios to F.linear %s; "
                    "shapes by rows %s); bf16 prefills widened to float32: %s (time ratio %s)",
                    product, wins, ratios, shapes, widen, widening,
                )  # fmt: skip
        elif row_kernels:  # told to: a bf16 CPU model's prefills are widened too
            widen = kernels.applies(self._base, library=True) and not kernels.applies(self._base)
        self._counts["row_kernels"] = bool(row_kernels)
        self._counts["row_kernel"] = product if row_kernels else None
        self._counts["row_kernel_rows"] = wins if row_kernels else None
        self._counts["row_kernel_widen"] = widen
        self._counts["row_kernel_shapes"] = {n: f"{nw}x{mr}" for n, (nw, mr) in shapes.items()}
        if row_kernels:  # undone when the worker exits
            kernels.install(self._base, wins, library=library, widen=widen)
        batch = DecodeBatch(self._base, pad_id=self._pad_id, device=self.loaded.device)
        batch.set_prefix(self._shared_prefix())
        # rows admitted before a swap decode on their own version: corrected per row
        batch.weights_for = lambda versions: self._weights.mixed(versions, self._adapters)
        threads_at_start = torch.get_num_threads()  # process-wide: the tuner's choice must not
        # outlive the engine (a trainer using the same process afterwards wants all threads)
        if self.tune_threads and getattr(self.loaded.device, "type", "cpu") == "cpu":
            self._tuner = ThreadTuner(most=torch.get_num_threads())
        try:
            while True:
                work = self._next_work(running=len(batch))
                if work is None:
                    return
                swapped = []
                for item in work:  # swaps first, in order; each question keeps its place's version
                    if isinstance(item, _Swap):
                        with self._cond:
                            waiting = {version for _, version in self._waiting}
                        if self._swap(item, keep={*batch.keys, *waiting}):
                            swapped.append(item)
                    else:
                        with self._cond:
                            self._waiting.append((item, self._active))
                jobs, versions = [], []
                if not len(batch) or batch.can_join:
                    jobs, versions = self._choose(self.batch_size - len(batch), batch.keys)
                try:
                    # merge the version of every row (running or joining) if they share one:
                    # at once for newcomers alone, else once it pays
                    self._settle(batch, [*batch.keys, *versions])
                    for swap in swapped:  # done: applied, and merged unless rows decode
                        with contextlib.suppress(InvalidStateError):
                            swap.future.set_result(time.perf_counter() - swap.started)
                    with torch.inference_mode():
                        if jobs:
                            if self._tuner and torch.get_num_threads() != self._tuner.choice:
                                torch.set_num_threads(self._tuner.choice)  # not a probe's
                            started = time.perf_counter()
                            self._admit(batch, jobs, versions)
                            self._charge(time.perf_counter() - started, versions)
                        if len(batch):
                            keys, started = batch.keys, time.perf_counter()
                            self._step(batch)
                            self._charge(time.perf_counter() - started, keys)
                    if len(batch) or not (self._pending or self._waiting):  # else: the
                        # next admission's versions decide
                        self._settle(batch, batch.keys)  # the last row of another version left?
                except Exception as exc:  # a bug must not kill the worker and hang every caller
                    log.exception("the engine worker failed while decoding")
                    rows = [*batch.rows, *(_Row(job=job) for job in jobs)]
                    batch.clear()
                    self._weights.unmix()
                    for swap in swapped:
                        _fail(swap.future, EngineError(f"the answer engine failed: {exc}"))
                    for row in rows:
                        if not row.job.future.done():
                            self._counts["failed"] += 1
                            _fail(row.job.future, EngineError(f"the answer engine failed: {exc}"))
                merged = self._weights.version
                if self._weights.mixing and all(key == merged for key in batch.keys):
                    self._weights.unmix()  # no row of another version is left
        finally:
            self._weights.apply(None)  # hand the LoadedModel back as the base model it was
            if row_kernels:
                kernels.uninstall(self._base)
            if torch.get_num_threads() != threads_at_start:
                torch.set_num_threads(threads_at_start)

    def _admit(self, batch, jobs: list[_Job], versions: list[str | None]) -> None:
        """Prefill the newcomers as one group and merge them into the running batch; each
        decodes with the adapter version beside it in `versions`."""
        tokenizer = self.loaded.tokenizer
        rows, prompts = [], []
        for job, version in zip(jobs, versions, strict=True):
            try:
                prompt = encode_prompt(
                    tokenizer,
                    job.request,
                    system_prompt=self.system_prompt,
                    max_input_tokens=self.max_input_tokens,
                )
            except EngineError as exc:
                _fail(job.future, exc)
                self._counts["failed"] += 1
                continue
            limit = max(1, job.request.max_new_tokens or self.max_new_tokens)
            stream = RowStream(
                tokenizer=tokenizer, callback=job.on_partial, stop_ids=self._stop_ids, limit=limit
            )
            rows.append(_Row(job=job, prompt=prompt, stream=stream, version=version))
            prompts.append(prompt.input_ids)
        if not rows:
            return
        started = time.perf_counter()
        for row in rows:
            row.admitted_at = started
        # rows sharing the prefix come first
        logits = batch.join(prompts, rows, keys=[row.version for row in rows])
        self._counts["batches"] += 1
        self._counts["last_batch_size"] = len(rows)
        joined = batch.rows[len(batch) - len(rows) :]
        self._take(batch, joined, logits, offset=len(batch) - len(rows))

    def _shared_prefix(self) -> list[int]:
        """The prompt tokens every plain question shares: the system prompt and the template.

        Two prompts that differ only in their question are compared token by token; the common
        head, less its last token (a merge at the seam could differ for another question).
        """
        try:
            first, second = (
                encode_prompt(
                    self.loaded.tokenizer,
                    AnswerRequest(question=question),
                    system_prompt=self.system_prompt,
                    max_input_tokens=self.max_input_tokens,
                ).input_ids
                for question in ("What is A?", "Who has 7 cats?")
            )
        except EngineError:
            return []
        common = 0
        while common < min(len(first), len(second)) and first[common] == second[common]:
            common += 1
        return first[: max(0, common - 1)]

    def _step(self, batch) -> None:
        if self._abort.is_set():
            rows = batch.rows
            batch.clear()
            for row in rows:
                _fail(row.job.future, EngineStopped(STOPPED))
            return
        tuner = self._tuner
        # a corrected step (rows of another version) is slower: no probe, no sample
        corrected = any(key != self._weights.version for key in batch.keys)
        self._counts["corrected_steps"] += corrected
        if tuner is None:
            logits = batch.step(batch.tokens)
        else:
            import torch

            threads = tuner.choice if corrected else tuner.threads_for(len(batch))
            if threads != torch.get_num_threads():  # a probe's count must not linger
                torch.set_num_threads(threads)
            started = time.perf_counter()
            logits = batch.step(batch.tokens)
            if not corrected:
                seconds = time.perf_counter() - started
                tuner.record(threads=threads, width=len(batch), seconds=seconds)
        self._counts["steps"] += 1
        self._take(batch, batch.rows, logits, offset=0)

    def _take(self, batch, rows: list[_Row], logits, *, offset: int) -> None:
        """Choose each row's next token, stream it, and let finished rows leave the batch."""
        import torch

        from bot.engine.decoding import greedy

        blocked = self._blocked_tokens(rows, logits)
        tokens = greedy(logits, blocked=blocked)
        if offset:  # newcomers: their first token joins the running rows' last ones
            batch.tokens = torch.cat([batch.tokens, tokens])
        else:
            batch.tokens = tokens
        now = time.perf_counter()
        for row, token in zip(rows, tokens.tolist(), strict=True):
            if row.first_token_at is None:
                row.first_token_at = now
            row.stream.push(token)
        if any(row.stream.done for row in rows):
            finished = [row for row in batch.rows if row.stream.done]
            batch.keep([i for i, row in enumerate(batch.rows) if not row.stream.done])
            for row in finished:
                self._finish(row)

    def _blocked_tokens(self, rows: list[_Row], logits):
        """Tokens a row may not pick now: `suppress_tokens`, stop tokens before `min_new_tokens`."""
        suppress = self.generate_options.get("suppress_tokens")
        minimum = self.generate_options.get("min_new_tokens", 0)
        early = [len(row.stream.ids) < minimum for row in rows]
        if not suppress and not any(early):
            return None
        import torch

        blocked = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        if suppress:
            blocked[:, list(suppress)] = True
        stops = sorted(self._stop_ids)
        for index, is_early in enumerate(early):
            if is_early:
                blocked[index, stops] = True
        return blocked

    def _finish(self, row: _Row) -> None:
        finished = time.perf_counter()
        text = row.stream.text()
        row.stream.finish(text)
        first = row.first_token_at or finished
        result = AnswerResult(
            text=text,
            adapter_version=row.version,
            timings=Timings(
                queued_s=row.admitted_at - row.job.submitted_at,
                prompt_s=first - row.admitted_at,
                generate_s=finished - first,
                total_s=finished - row.job.submitted_at,
                new_tokens=len(row.stream.ids),
            ),
            truncated_input=row.prompt.truncated,
            notes_used=row.prompt.notes_used,
        )
        self._counts["answered"] += 1
        with contextlib.suppress(InvalidStateError):
            row.job.future.set_result(result)

    # swaps

    def _swap(self, swap: _Swap, *, keep: set[str | None]) -> bool:
        """Make `swap`'s version the one new questions get (read and checked first: a broken
        folder changes nothing and fails the swap's future); the adapters of versions in
        `keep` stay in memory. The merge waits for `_settle`."""
        swap.started = time.perf_counter()
        before = self._active
        try:
            self._apply_adapter(swap.version, swap.path, keep=keep)
        except Exception as exc:
            log.warning("adapter swap refused: %s", exc)
            _fail(
                swap.future,
                EngineError(
                    f"adapter {swap.version} at {swap.path} failed to load: {_reason(exc)}; "
                    f"the active version stays {before or 'the base model (no adapter)'}"
                ),
            )
            return False
        self._counts["swaps"] += 1
        log.info(
            "adapter %s -> %s (read in %.2f s)",
            before, swap.version, time.perf_counter() - swap.started,
        )  # fmt: skip
        return True

    def _apply_adapter(self, version: str | None, path: Path | None, *, keep=frozenset()) -> None:
        from bot.engine.merging import read_adapter

        if version == self._active:
            return
        if version is not None:
            cached = self._adapters.get(version)
            # read and check it all before any row uses it: a bad folder changes nothing
            adapter = cached or read_adapter(Path(path), version=version, base_model=self._base)
        # the A/B matrices (a few MB each) of this version, the one before (a swap back or a
        # rollback reads no file) and those rows in flight still decode on
        kept = {self._active, *keep}
        self._adapters = {v: a for v, a in self._adapters.items() if v in kept}
        if version is not None:
            self._adapters[version] = adapter
        self._active = version

    def _settle(self, batch, keys: list[str | None]) -> None:
        """Merge the version every row in `keys` (those decoding and those about to join)
        decodes on (none: the active version) into the weights, once either no row is left or
        correcting its rows has cost as much as a merge: from then on it costs nothing.

        Until then the rows of that version are corrected like any other (a corrected step
        costs 4-12 % more than a plain one; a merge, ~2 steps of 8 rows, and the rows of
        another version would then be corrected anyway): under frequent swaps with mixed
        batches nothing is merged at all. With rows decoding, the merge would stall every one
        of them, while their corrections may be over in a few steps: it waits until those
        corrections' share (`corrected_share` of the steps' time, `_charge`) has reached the
        last merge's time (the ski-rental rule: about twice, at most, what the better choice
        made knowing when the rows finish would cost). An engine left without rows merges at
        once, and so does one about to admit newcomers alone (all their answers are ahead of
        them: corrections of ~10 % over a whole answer outweigh a merge of ~2 steps); the first
        merge too (no measured cost yet), and every one without `mix_versions` (no row is
        ever corrected then).
        """
        version = self._lone_version(keys)
        if version is _NONE:
            return
        if (
            len(batch)  # rows decoding (newcomers alone have their whole answers ahead)
            and self.mix_versions
            and self._merge_seconds is not None
            and (self._charged != version or self._unmerged_seconds < self._merge_seconds)
        ):
            return
        started = time.perf_counter()
        self._weights.apply(None if version is None else self._adapters[version])
        batch.use_weights(version)  # the prefix's keys and values are per version
        self._merge_seconds = time.perf_counter() - started
        self._unmerged_seconds, self._charged = 0.0, _NONE
        self._counts["merges"] += 1
        log.info("adapter %s merged in %.2f s", version, self._merge_seconds)

    def _charge(self, seconds: float, keys: list[str | None]) -> None:
        """Count what a step or prefill of rows `keys` paid for their version not being
        merged: its corrections' share of `seconds`, when every row was on one version (a
        merge would have spared them all)."""
        version = self._lone_version(keys) if keys else _NONE
        if version is _NONE:
            return
        if version != self._charged:  # another version: its corrections are counted anew
            self._charged, self._unmerged_seconds = version, 0.0
        self._unmerged_seconds += seconds * self.corrected_share

    def _lone_version(self, keys: list[str | None]) -> object:
        """The version every row in `keys` is on (none: the active one) when it is not the
        merged one, so that merging it would leave nothing to correct; else `_NONE`."""
        version = keys[0] if keys else self._active
        if version == self._weights.version or any(key != version for key in keys):
            return _NONE
        return version


def choose_admissions(
    waiting: Sequence[str | None], *, room: int, decoding: Sequence[str | None], mixing: bool
) -> list[int]:
    """Which waiting questions (their versions, oldest first) to admit into `room` free rows
    beside rows decoding on versions `decoding`: their indices, in queue order.

    The oldest first; then, oldest first, those on a version already decoding or taken; then
    any. Rows on one version decode on the merged weights, while each other version in a batch
    costs every step a correction (8-16 % with two versions): when swaps queue between
    waiting questions, batches by version are cheaper. A question is passed over only by
    newer ones on a version already in the batch, and each admission takes the oldest, so
    none waits long; without swaps between them, this is queue order. Without `mixing` (a
    batch holds one version), only the oldest and those right after it on its version, which
    must be the version decoding.
    """
    if not room or not waiting:
        return []
    if not mixing:
        version = decoding[0] if decoding else waiting[0]
        taken = []
        for index, waiting_version in enumerate(waiting):
            if waiting_version != version or len(taken) == room:
                break
            taken.append(index)
        return taken
    versions = {*decoding, waiting[0]}
    alike = [index for index in range(1, len(waiting)) if waiting[index] in versions]
    others = [index for index in range(1, len(waiting)) if waiting[index] not in versions]
    return sorted([0, *(alike + others)[: room - 1]])


def _stop_token_ids(loaded: LoadedModel) -> frozenset[int]:
    """eos from the tokenizer and the generation config, plus ChatML's end of turn."""
    tokenizer = loaded.tokenizer
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    configured = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    if not ids:
        raise EngineError(f"model {loaded.name!r} defines no end-of-sequence token")
    return frozenset(ids)


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "…"


def _fail(future: Future, exc: Exception) -> None:
    with contextlib.suppress(InvalidStateError):
        if not future.done():
            future.set_exception(exc)
