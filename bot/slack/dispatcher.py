"""AnswerDispatcher: from a stored question to a finished answer message, off Bolt's threads.

Bolt runs listeners on a handful of threads that must stay free to acknowledge new requests in
milliseconds, so listeners only hand an `AnswerJob` over. The dispatcher submits it to the engine
(which only enqueues and batches), and a single ticker thread watches every answer in flight:
at most once per `update_interval_s` it pushes the text so far into the "thinking…" message
(`chat.update`), and it gives up on answers that run past the timeout. The engine's callbacks
(`on_partial`, the future's done-callback) only store text or schedule work on the dispatcher's
own small pool: they never do I/O on the engine's worker thread.

The final answer is committed to the database before the message shows it, and a failure is
stored and shown too ("never leave a thinking… hanging").

Retrieval happens here too, on the dispatcher's pool, never in a listener: before submitting, the
knowledge base is refreshed (one aggregate query when no verdict changed) and searched with the
asker's channel, so an expert's verdict helps the very next question. Hits go into the request as
team notes and are cited under the answer (only those the engine kept in the prompt). An exact
repeat of an approved question is answered with the approved text, without the model; not in a
thread with earlier turns, where the same words may mean something else. A failing search is
logged and the question answered without notes: retrieval may help an answer, never block it.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from sqlalchemy import Engine

from bot.engine.types import (
    AnswerRequest,
    AnswerResult,
    EngineError,
    EngineStopped,
    EngineTimeout,
    Timings,
)
from bot.knowledge import as_notes
from bot.slack import blocks, citing
from bot.slack.metrics import Metrics
from bot.store import session_scope
from bot.store.questions import fail_answer, finish_answer

log = logging.getLogger(__name__)


@dataclass(eq=False)
class AnswerJob:
    answer_id: int
    channel: str
    message_ts: str  # the "thinking…" message that becomes the answer
    request: AnswerRequest
    received_at: float = field(default_factory=time.monotonic)  # when the question arrived
    # filled in by the dispatcher
    partial: str = ""
    shown: str = ""
    last_update: float = 0.0
    updating: bool = False
    finished: bool = False
    future: Future | None = None
    hits: tuple = ()  # bot.knowledge.Hit: the team notes put into the request
    exact: Any = None  # bot.knowledge.KnowledgeEntry answered with verbatim, no model
    lock: threading.Lock = field(default_factory=threading.Lock)


def failure_message(exc: BaseException, *, timeout_s: float) -> str:
    if isinstance(exc, EngineTimeout):
        return (
            f"I could not answer within {timeout_s:.0f} s; the model is busy or stuck. "
            "Please ask again in a minute, and tell an admin if it keeps happening."
        )
    if isinstance(exc, EngineStopped):
        return "I was restarting and could not finish this answer. Please ask again."
    if isinstance(exc, EngineError):
        return f"I could not answer this: {exc}"
    return (
        f"Something went wrong while answering ({type(exc).__name__}). Please ask again; "
        "an admin can find the details in the bot's log."
    )


class AnswerDispatcher:
    def __init__(
        self,
        *,
        client: WebClient,
        db: Engine,
        engine,
        metrics: Metrics | None = None,
        workers: int = 4,
        update_interval_s: float = 1.0,
        timeout_s: float = 180.0,
        knowledge=None,
        retrieval_k: int = 3,
    ) -> None:
        self.client = client
        self.db = db
        self.engine = engine
        self.metrics = metrics
        # bot.knowledge.KnowledgeBase, None (no retrieval), or a function returning either:
        # the app passes one reading `services.knowledge`, so retrieval can be switched live
        self._knowledge = knowledge if callable(knowledge) else (lambda: knowledge)
        self.retrieval_k = retrieval_k
        self.permalinks = citing.Permalinks(client=client)
        self.update_interval_s = update_interval_s
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="answer-dispatch")
        self._inflight: set[AnswerJob] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._closing = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="answer-ticker", daemon=True)
        self._ticker.start()

    @property
    def knowledge(self):
        return self._knowledge()

    # -- public ----------------------------------------------------------------------------

    def dispatch(self, job: AnswerJob) -> None:
        """Hand a job over; returns at once (called from Bolt's listener threads)."""
        with self._lock:
            self._inflight.add(job)
        self._submit(self._start, job)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is in flight (tests, shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._inflight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Let the answers in flight finish (or fail) for up to `timeout` s, then stop."""
        self.wait_idle(timeout)
        self._closing.set()
        self._ticker.join(timeout=2)
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- work ------------------------------------------------------------------------------

    def _submit(self, fn, *args) -> None:
        try:
            self._pool.submit(fn, *args)
        except RuntimeError:  # pool shut down: finish here rather than leave "thinking…"
            fn(*args)

    def _start(self, job: AnswerJob) -> None:
        def on_partial(text: str) -> None:
            job.partial = text  # the ticker pushes it; never do I/O on the engine thread

        knowledge = self.knowledge  # read once: it may be switched while this job runs
        if knowledge is not None:
            self._retrieve(job, knowledge)
            if job.finished:  # timed out while retrieving: the asker was already told
                return
            if job.exact is not None:  # the approved text itself, no model involved
                verbatim = AnswerResult(
                    text=job.exact.answer, adapter_version=None, timings=Timings(0, 0, 0, 0, 0)
                )
                self._finish(job, result=verbatim)
                return
        try:
            job.future = self.engine.submit(job.request, on_partial=on_partial)
        except Exception as exc:  # a refused request: fail it visibly
            self._finish(job, error=exc)
            return
        job.future.add_done_callback(lambda future: self._submit(self._finish_future, job))

    def _retrieve(self, job: AnswerJob, knowledge) -> None:
        """Find the approved answers this question may use; fills `job.exact` or the notes."""
        question = job.request.question
        try:
            knowledge.refresh()
            if not job.request.history:
                job.exact = knowledge.exact_match(question, channel_id=job.channel)
                if job.exact is not None:
                    return
            hits = knowledge.search(question, channel_id=job.channel, k=self.retrieval_k)
        except Exception:
            log.warning(
                "retrieval failed for answer %s; answering without it", job.answer_id, exc_info=True
            )
            return
        if hits:
            job.hits = tuple(hits)
            job.request = replace(job.request, notes=as_notes(hits))

    def _sources(self, job: AnswerJob, result: AnswerResult) -> list[dict]:
        if job.exact is not None:
            entry = job.exact
            return [
                citing.source(entry=entry, permalink=self.permalinks.of_entry(entry), exact=True)
            ]
        used = citing.used_hits(job.hits, result.notes_used)
        return citing.note_sources(hits=used, permalinks=self.permalinks)

    def _finish_future(self, job: AnswerJob) -> None:
        future = job.future
        assert future is not None
        if future.cancelled():
            self._finish(job, error=EngineTimeout("cancelled"))
            return
        error = future.exception()
        self._finish(job, result=None if error else future.result(), error=error)

    def _finish(
        self,
        job: AnswerJob,
        *,
        result: AnswerResult | None = None,
        error: BaseException | None = None,
    ) -> None:
        with job.lock:
            if job.finished:
                return
            job.finished = True
            latency_ms = int((time.monotonic() - job.received_at) * 1000)
            try:
                self._store_and_show(job, result=result, error=error, latency_ms=latency_ms)
            except Exception:
                log.exception("could not finish answer %s", job.answer_id)
        with self._idle:
            self._inflight.discard(job)
            self._idle.notify_all()

    def _store_and_show(self, job, *, result, error, latency_ms: int) -> None:
        if result is not None and not result.text.strip():
            error, result = EngineError("the model produced an empty answer; try rephrasing"), None
        if result is None:
            message = failure_message(error, timeout_s=self.timeout_s)
            if not isinstance(error, EngineError):
                log.error("answer %s failed", job.answer_id, exc_info=error)
            with session_scope(self.db) as session:
                fail_answer(
                    session=session, answer_id=job.answer_id, error=message, latency_ms=latency_ms
                )
            if self.metrics:
                self.metrics.answers.labels(state="failed").inc()
            self._update(job, text=message, blocks=blocks.error_blocks(message))
            return
        sources = self._sources(job, result)
        with session_scope(self.db) as session:
            answer = finish_answer(
                session=session,
                answer_id=job.answer_id,
                text=result.text,
                adapter_version=result.adapter_version,
                latency_ms=latency_ms,
                truncated=result.truncated_input,
            )
            answer.sources = sources or None
        if self.metrics:
            self.metrics.answers.labels(state="done").inc()
            self.metrics.answer_latency.observe(latency_ms / 1000)
        card = blocks.AnswerCard(
            answer_id=job.answer_id,
            text=result.text,
            adapter_version=result.adapter_version,
            latency_ms=latency_ms,
            truncated_input=result.truncated_input,
            notes_used=len(result.notes_used),
            citations=citing.cited(sources),
            answered_from=citing.answered_from(sources),
        )
        self._update(job, text=blocks.fallback_text(result.text), blocks=blocks.answer_blocks(card))

    def _time_out(self, job: AnswerJob) -> None:
        self._finish(job, error=EngineTimeout(f"no answer within {self.timeout_s:.0f} s"))

    def _push_partial(self, job: AnswerJob) -> None:
        with job.lock:
            job.updating = False
            text = job.partial
            if job.finished or not text.strip() or text == job.shown:
                return
            job.shown = text
            job.last_update = time.monotonic()
            self._update(job, text=blocks.fallback_text(text), blocks=blocks.streaming_blocks(text))

    def _update(self, job: AnswerJob, *, text: str, blocks: list[dict]) -> None:
        try:
            self.client.chat_update(
                channel=job.channel, ts=job.message_ts, text=text, blocks=blocks
            )
        except SlackApiError as exc:
            log.warning("chat.update of answer %s failed: %s", job.answer_id, exc)

    def _tick(self) -> None:
        """Push partial text at most once per interval; time out answers that hang."""
        step = min(0.25, self.update_interval_s)
        while not self._closing.wait(step):
            now = time.monotonic()
            with self._lock:
                jobs = list(self._inflight)
            for job in jobs:
                if job.finished:
                    continue
                if now - job.received_at > self.timeout_s:
                    if job.future is not None:
                        job.future.cancel()  # still queued: the engine skips it
                    self._submit(self._time_out, job)
                elif (
                    not job.updating
                    and job.partial != job.shown
                    and now - job.last_update >= self.update_interval_s
                ):
                    job.updating = True
                    self._submit(self._push_partial, job)
