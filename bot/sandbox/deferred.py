"""`DeferredEngine`: an answer engine that loads in the background, so the sandbox opens at once.

The packaged model's first load converts its GGUF file (~20 s). Making a newcomer stare at a
terminal for that long before the page even opens is the wrong first impression, so the sandbox
serves the page and the bot right away and loads the model on a thread. Questions asked
meanwhile are accepted as usual (the bot posts "thinking…"); their `submit` returns a Future at
once, and the calls are replayed on the real engine, in order, the moment it is ready. A model
that fails to load fails those Futures with the loading error, which the dispatcher shows in
the thread instead of a "thinking…" that never ends.

It is duck-typed like `bot.engine.worker.AnswerEngine` as far as the Slack side and the adapter
follower use it: `submit`, `set_adapter`, `active_version`, `stats`, `stop`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from bot.engine.types import EngineError, EngineStopped

STARTING, READY, FAILED, STOPPED = "starting", "ready", "failed", "stopped"
NOT_READY_STOPPED = "the sandbox is shutting down"


class DeferredEngine:
    """Loads an engine with `load()` on a thread; calls made before it is ready wait in order."""

    def __init__(self, *, load: Callable[[], Any]) -> None:
        self._load = load
        self._engine: Any = None
        self._state = STARTING
        self._error: str | None = None
        self._waiting: list[tuple[Callable[[Any], Future], Future]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()  # set once loading ended, whichever way
        self._started_at = time.monotonic()
        self._load_s: float | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loader", daemon=True)

    def start(self) -> DeferredEngine:
        self._started_at = time.monotonic()
        self._thread.start()
        return self

    # -- what the page and the CLI show ----------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def error(self) -> str | None:
        return self._error

    def elapsed_s(self) -> float:
        """Seconds spent loading (so far, or in all once done)."""
        if self._load_s is not None:
            return self._load_s
        return time.monotonic() - self._started_at

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once the engine is ready; False on timeout or when loading failed."""
        self._ready.wait(timeout)
        return self._state == READY

    # -- the engine interface ---------------------------------------------------------------

    def submit(self, request, *, on_partial=None) -> Future:
        return self._call(lambda engine: engine.submit(request, on_partial=on_partial))

    def set_adapter(self, version, path) -> Future:
        return self._call(lambda engine: engine.set_adapter(version, path))

    @property
    def active_version(self) -> str | None:
        engine = self._engine
        return engine.active_version if engine is not None else None

    def stats(self) -> dict:
        engine = self._engine
        if engine is not None:
            return engine.stats()
        with self._lock:
            waiting = len(self._waiting)
        return {"queue_depth": waiting, "running": False, "loading": self._state == STARTING}

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            if self._state == STARTING:
                self._state = STOPPED  # the loader stops the engine if it still arrives
            waiting, self._waiting = self._waiting, []
            engine = self._engine
        for _, future in waiting:
            _settle(future, error=EngineStopped(NOT_READY_STOPPED))
        if engine is not None:
            engine.stop(timeout)

    # -- internals ---------------------------------------------------------------------------

    def _call(self, call: Callable[[Any], Future]) -> Future:
        with self._lock:
            engine, state = self._engine, self._state
            if engine is None and state == STARTING:
                future: Future = Future()
                self._waiting.append((call, future))
                return future
        if engine is not None:
            return call(engine)
        if state == FAILED:
            raise EngineError(f"the model did not load: {self._error}")
        raise EngineStopped(NOT_READY_STOPPED)

    def _run(self) -> None:
        try:
            engine = self._load()
        except Exception as exc:  # shown on the page, in the terminal and in each waiting thread
            with self._lock:
                self._error = f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)
                self._state = FAILED if self._state == STARTING else self._state
                waiting, self._waiting = self._waiting, []
            self._load_s = time.monotonic() - self._started_at
            self._ready.set()
            for _, future in waiting:
                _settle(future, error=EngineError(f"the model did not load: {self._error}"))
            return
        with self._lock:
            stopped = self._state == STOPPED
            if not stopped:
                self._engine, self._state = engine, READY
            waiting, self._waiting = self._waiting, []
        self._load_s = time.monotonic() - self._started_at
        self._ready.set()
        if stopped:
            engine.stop()
            return
        for call, future in waiting:
            if future.cancelled():  # the dispatcher gave up on it while we loaded
                continue
            try:
                _chain(call(engine), future)
            except Exception as exc:  # e.g. a question the engine refuses outright
                _settle(future, error=exc)


def _chain(source: Future, target: Future) -> None:
    def copy(done: Future) -> None:
        if done.cancelled():
            target.cancel()
        elif done.exception() is not None:
            _settle(target, error=done.exception())
        else:
            _settle(target, result=done.result())

    source.add_done_callback(copy)
    # the dispatcher cancels an answer that timed out: let the engine skip it too
    target.add_done_callback(lambda done: source.cancel() if done.cancelled() else None)


def _settle(future: Future, *, result=None, error: BaseException | None = None) -> None:
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except Exception:  # cancelled or settled in between: nobody waits any more
        pass
