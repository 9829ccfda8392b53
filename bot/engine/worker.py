"""The answer engine: one worker thread owns the model, batches questions, hot-swaps adapters.

Why one worker: a model is not safe to call from several threads, and a small model on a CPU
earns most of its throughput from batching (one decoding step for eight rows costs little more
than for one). So callers only enqueue: `submit` returns a `Future` at once (Bolt listeners must
ack within milliseconds) and the worker takes everything waiting, up to `batch_size`, left-pads
it and runs one greedy `generate`. Greedy decoding keeps batched answers equal to single ones.

Importing this module is cheap (no torch, no transformers): they load with the model.

Adapter swaps go through the same queue, in order, and are applied only between batches: an
answer in flight always finishes on the version it started with, and a question asked after a
swap was requested is answered by the new version. A swap validates the folder (config, weights,
shapes against the base model) before touching the model, so a broken folder is refused and the
previous adapter keeps serving. The LoRA configuration is fixed across versions, so a swap is a
weight load (`load_adapter` + `set_adapter` + `delete_adapter`), not a model rebuild.

`stop()` refuses new work, fails everything still queued with `EngineStopped`, lets the batch in
flight finish within the timeout, and aborts it (at the next decoding step) past that.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.engine.loading import LoadedModel, load_from_settings
from bot.engine.prompt import check_question, encode_prompt
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
ABORT_GRACE_S = 10.0  # after an abort, one decoding step at most


@dataclass
class _Job:
    request: AnswerRequest
    on_partial: PartialCallback | None
    future: Future = field(default_factory=Future)
    submitted_at: float = field(default_factory=time.perf_counter)


@dataclass
class _Swap:
    version: str | None
    path: Path | None
    future: Future = field(default_factory=Future)


class AnswerEngine:
    """Answers `AnswerRequest`s with the base model and the active LoRA adapter."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        system_prompt: str,
        max_input_tokens: int,
        max_new_tokens: int,
        batch_size: int,
        generate_options: dict[str, Any] | None = None,
    ):
        """`generate_options` go to every `model.generate` call (the benchmark forces lengths)."""
        if batch_size < 1 or max_new_tokens < 1 or max_input_tokens < 1:
            raise EngineError("batch_size, max_new_tokens and max_input_tokens must be at least 1")
        self.loaded = loaded
        self.system_prompt = system_prompt
        self.max_input_tokens = max_input_tokens
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.generate_options = dict(generate_options or {})
        self._base = loaded.model
        self._peft = None  # a PeftModel around the base once the first adapter is loaded
        self._active: str | None = None
        self._stop_ids = _stop_token_ids(loaded)
        self._pending: deque[_Job | _Swap] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None
        self._counts = {"answered": 0, "failed": 0, "batches": 0, "swaps": 0, "last_batch_size": 0}

    @classmethod
    def from_settings(cls, settings, loaded: LoadedModel | None = None) -> AnswerEngine:
        return cls(
            loaded if loaded is not None else load_from_settings(settings),
            system_prompt=settings.system_prompt,
            max_input_tokens=settings.max_input_tokens,
            max_new_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size,
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
            queued = list(self._pending)
            self._pending.clear()
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

        The worker applies it between batches; the `Future` gives the seconds the swap took, or
        raises `EngineError` if the folder does not load (the active version stays).
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
                "queue_depth": jobs,
                "swaps_pending": len(self._pending) - jobs,
                "active_version": self._active,
                "running": self._thread is not None and self._thread.is_alive(),
                **self._counts,
            }

    # the worker

    def _enqueue(self, item: _Job | _Swap) -> None:
        with self._cond:
            if self._stopping:
                raise EngineStopped(STOPPED)
            self._pending.append(item)
            self._cond.notify()

    def _next_work(self) -> _Swap | list[_Job] | None:
        """Wait for work: a swap, or the jobs queued before the next swap (up to batch_size)."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            if isinstance(self._pending[0], _Swap):
                return self._pending.popleft()
            jobs = []
            while self._pending and isinstance(self._pending[0], _Job):
                if len(jobs) == self.batch_size:
                    break
                job = self._pending.popleft()
                if job.future.set_running_or_notify_cancel():  # False: the caller gave up
                    jobs.append(job)
            return jobs

    def _run(self) -> None:
        import torch

        while True:
            work = self._next_work()
            if work is None:
                return
            try:
                if isinstance(work, _Swap):
                    self._swap(work)
                elif work:
                    with torch.inference_mode():
                        self._answer_batch(work)
            except Exception as exc:  # a bug must not kill the worker and hang every caller
                log.exception("the engine worker failed on a %s", type(work).__name__)
                futures = [work.future] if isinstance(work, _Swap) else [j.future for j in work]
                if not isinstance(work, _Swap):
                    self._counts["failed"] += sum(not future.done() for future in futures)
                for future in futures:
                    _fail(future, EngineError(f"the answer engine failed: {exc}"))

    def _answer_batch(self, jobs: list[_Job]) -> None:
        import torch
        from transformers import StoppingCriteriaList

        from bot.engine.streaming import BatchStreamer, answer_ids, decode_answer

        started = time.perf_counter()
        tokenizer = self.loaded.tokenizer
        encoded = []
        for job in list(jobs):
            try:
                prompt = encode_prompt(
                    tokenizer,
                    job.request,
                    system_prompt=self.system_prompt,
                    max_input_tokens=self.max_input_tokens,
                )
            except EngineError as exc:
                _fail(job.future, exc)
                jobs.remove(job)
                self._counts["failed"] += 1
                continue
            encoded.append(prompt)
        if not jobs:
            return

        width = max(len(prompt.input_ids) for prompt in encoded)
        pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self._stop_ids)
        )
        input_ids = torch.full((len(jobs), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, prompt in enumerate(encoded):  # left padding: every row ends where decoding starts
            n = len(prompt.input_ids)
            input_ids[row, width - n :] = torch.tensor(prompt.input_ids, dtype=torch.long)
            attention_mask[row, width - n :] = 1
        limits = [max(1, job.request.max_new_tokens or self.max_new_tokens) for job in jobs]
        streamer = BatchStreamer(
            tokenizer=tokenizer,
            callbacks=[job.on_partial for job in jobs],
            stop_ids=self._stop_ids,
            limits=limits,
        )
        version = self._active
        model, adapter_off = self._serving_model()
        options = {"do_sample": False, "num_beams": 1, **self.generate_options}
        with adapter_off:
            output = model.generate(
                input_ids=input_ids.to(self.loaded.device),
                attention_mask=attention_mask.to(self.loaded.device),
                max_new_tokens=max(limits),
                eos_token_id=sorted(self._stop_ids),
                pad_token_id=pad_id,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList(
                    [_RowLimits(width, limits), _Abort(self._abort)]
                ),
                **options,
            )
        finished = time.perf_counter()
        self._counts["batches"] += 1
        self._counts["last_batch_size"] = len(jobs)
        first_token_at = streamer.first_token_at or finished
        for row, (job, prompt) in enumerate(zip(jobs, encoded, strict=True)):
            if self._abort.is_set():
                _fail(job.future, EngineStopped(STOPPED))
                continue
            ids = answer_ids(
                output[row, width:].tolist(), stop_ids=self._stop_ids, limit=limits[row]
            )
            text = decode_answer(tokenizer, ids)
            streamer.finish(row, text)
            result = AnswerResult(
                text=text,
                adapter_version=version,
                timings=Timings(
                    queued_s=started - job.submitted_at,
                    prompt_s=first_token_at - started,
                    generate_s=finished - first_token_at,
                    total_s=finished - job.submitted_at,
                    new_tokens=len(ids),
                ),
                truncated_input=prompt.truncated,
                notes_used=prompt.notes_used,
            )
            self._counts["answered"] += 1
            with contextlib.suppress(InvalidStateError):
                job.future.set_result(result)

    def _serving_model(self):
        """The model to call and the context to call it in, for the active version."""
        if self._peft is None:
            return self._base, contextlib.nullcontext()
        if self._active is None:
            return self._peft, self._peft.disable_adapter()
        return self._peft, contextlib.nullcontext()

    # swaps

    def _swap(self, swap: _Swap) -> None:
        started = time.perf_counter()
        before = self._active
        try:
            self._apply_adapter(swap.version, swap.path)
        except Exception as exc:
            log.warning("adapter swap refused: %s", exc)
            _fail(
                swap.future,
                EngineError(
                    f"adapter {swap.version} at {swap.path} failed to load: {_reason(exc)}; "
                    f"the active version stays {before or 'the base model (no adapter)'}"
                ),
            )
            return
        self._counts["swaps"] += 1
        elapsed = time.perf_counter() - started
        log.info("adapter %s -> %s in %.2f s", before, swap.version, elapsed)
        with contextlib.suppress(InvalidStateError):
            swap.future.set_result(elapsed)

    def _apply_adapter(self, version: str | None, path: Path | None) -> None:
        if version is None or version == self._active:
            self._active = version  # None: the loaded adapter stays, disabled while generating
            return
        if self._peft is not None and version in self._peft.peft_config:
            self._peft.set_adapter(version, inference_mode=True)
        else:
            check_adapter_folder(path, base_model=self._base)
            if self._peft is None:
                self._wrap_base(version, path)
            else:
                self._load_into_peft(version, path)
        for name in list(self._peft.peft_config):
            if name != version:
                self._peft.delete_adapter(name)
        self._active = version

    def _wrap_base(self, version: str, path: Path) -> None:
        from peft import PeftModel

        try:
            self._peft = PeftModel.from_pretrained(self._base, str(path), adapter_name=version)
        except Exception:
            _remove_lora_layers(self._base)  # from_pretrained injects layers before loading
            raise
        self._peft.eval()

    def _load_into_peft(self, version: str, path: Path) -> None:
        previous = self._peft.active_adapter
        try:
            self._peft.load_adapter(str(path), adapter_name=version)
            self._peft.set_adapter(version, inference_mode=True)
        except Exception:
            if version in self._peft.peft_config:
                self._peft.set_adapter(previous, inference_mode=True)
                self._peft.delete_adapter(version)
            raise


def check_adapter_folder(path: Path, *, base_model) -> None:
    """Refuse a folder that is not a LoRA adapter for `base_model`, without touching the model."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise EngineError(f"{path / 'adapter_config.json'} is missing")
    config = PeftConfig.from_pretrained(str(path))
    if str(config.peft_type).upper().rsplit(".", 1)[-1] != "LORA":
        raise EngineError(f"it is a {config.peft_type} adapter, not LoRA")
    weights = load_peft_weights(str(path), device="cpu")
    if not weights:
        raise EngineError("it holds no weights")
    for key, tensor in weights.items():
        for marker, dim in ((".lora_A.", 1), (".lora_B.", 0)):
            if marker not in key:
                continue
            module_path = key.split(marker)[0].removeprefix("base_model.model.")
            try:
                module = base_model.get_submodule(module_path)
            except AttributeError:
                raise EngineError(f"its layer {module_path} is not in the base model") from None
            layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            weight = getattr(layer, "weight", None)
            if weight is None or weight.dim() != 2:
                continue
            expected = weight.shape[dim]
            if tensor.shape[dim] != expected:
                raise EngineError(
                    f"{key} has shape {tuple(tensor.shape)}, the base layer {expected} features: "
                    "it was trained for a different base model"
                )


class _RowLimits:
    """Stops each row at its own `max_new_tokens` (a batch mixes requests with different ones)."""

    def __init__(self, prompt_width: int, limits: list[int]):
        import torch

        self.prompt_width = prompt_width
        self.limits = torch.tensor(limits, dtype=torch.long)

    def __call__(self, input_ids, scores, **kwargs):
        produced = input_ids.shape[1] - self.prompt_width
        return (produced >= self.limits).to(input_ids.device)


class _Abort:
    """Stops every row at the next step once `stop()` gave up waiting."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), device=input_ids.device)


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


def _remove_lora_layers(model) -> None:
    """Put back the original layers where a failed `PeftModel.from_pretrained` injected LoRA."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "…"


def _fail(future: Future, exc: Exception) -> None:
    with contextlib.suppress(InvalidStateError):
        if not future.done():
            future.set_exception(exc)
