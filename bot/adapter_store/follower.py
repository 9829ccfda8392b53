"""Following the active-version pointer: every replica hot-swaps to what the database says.

A thread polls `registry.active_version()` every `poll_s` seconds (2 s by default: a promotion
reaches every replica within seconds, and the query is one indexed row). When the pointer moved,
it asks the engine to swap (`engine.set_adapter`, applied between batches, so no answer in
flight is disturbed) and waits for the result. A swap that fails (a folder deleted or damaged by
hand, a version published on another host's disk) is logged and remembered: the engine keeps
serving what it had, and the follower does not retry that same version every poll, only when
the pointer moves again. A database hiccup is logged and the next poll tries again.
"""

from __future__ import annotations

import logging
import threading

from bot.adapter_store.registry import AdapterRegistry

log = logging.getLogger(__name__)

_UNSET = object()


class AdapterFollower:
    def __init__(
        self,
        *,
        registry: AdapterRegistry,
        engine,
        poll_s: float = 2.0,
        swap_timeout_s: float = 120.0,
    ):
        self.registry = registry
        self.engine = engine
        self.poll_s = poll_s
        self.swap_timeout_s = swap_timeout_s
        self.failed: dict[str | None, str] = {}  # version -> why its swap failed
        self.last_error: str | None = None
        self._last_target = _UNSET
        self._stop = threading.Event()
        self._lock = threading.Lock()  # sync_now from a test and the thread never overlap
        self._thread: threading.Thread | None = None

    def start(self) -> AdapterFollower:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="apprentice-adapter-follower", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> AdapterFollower:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_now()
            except Exception:  # the follower must outlive any one bad poll
                log.exception("adapter follower: poll failed; trying again")
            self._stop.wait(self.poll_s)

    def sync_now(self) -> str | None:
        """Bring the engine to the active version now; return the version it serves."""
        with self._lock:
            try:
                target = self.registry.active_version()
            except Exception as exc:
                self.last_error = f"could not read the active version: {exc}"
                log.warning("adapter follower: %s", self.last_error)
                return self.engine.active_version
            moved = target != self._last_target
            self._last_target = target
            if target == self.engine.active_version:
                return target
            if not moved and target in self.failed:
                return self.engine.active_version  # already failed; wait for the next change
            path = self.registry.path(target) if target is not None else None
            try:
                seconds = self.engine.set_adapter(target, path).result(self.swap_timeout_s)
            except Exception as exc:
                self.failed[target] = str(exc)
                self.last_error = f"swap to {target} failed: {exc}"
                log.error(
                    "adapter follower: %s; still serving %s",
                    self.last_error,
                    self.engine.active_version or "the base model",
                )
                return self.engine.active_version
            self.failed.pop(target, None)
            self.last_error = None
            log.info("adapter follower: now serving %s (swap %.2f s)", target or "base", seconds)
            return target
