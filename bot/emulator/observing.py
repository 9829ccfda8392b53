"""Reading the emulated workspace from tests: snapshots, and waits that sleep on its Condition.

A mixin of `SlackEmulator` (it needs `self.ws`): every reader copies under the lock, so a test
never sees half of a change, and the `wait_for_*` helpers wake on each change instead of
polling. A timeout raises `TimeoutError` that says what was there instead.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

from bot.emulator.state import Workspace


class WorkspaceViews:
    ws: Workspace

    def messages(self, channel: str, thread_ts: str | None = None) -> list[dict]:
        """Current messages (edits applied), oldest first: the channel's top level, or the
        thread (parent first) when `thread_ts` is given. Each carries its `channel`."""
        with self.ws.lock:
            found = self.ws.thread(channel, thread_ts) if thread_ts else self.ws.top_level(channel)
            return [dict(copy.deepcopy(m), channel=channel) for m in found]

    def ephemerals(self, channel: str | None = None, user: str | None = None) -> list[dict]:
        with self.ws.lock:
            return [
                copy.deepcopy(e)
                for e in self.ws.ephemerals
                if channel in (None, e["channel"]) and user in (None, e["user"])
            ]

    @property
    def views(self) -> dict[str, dict]:
        """Open modals by id (each has root_view_id/previous_view_id: its place in the stack)."""
        with self.ws.lock:
            return {
                view_id: copy.deepcopy(self.ws.views[view_id])
                for stack in self.ws.modal_stacks.values()
                for view_id in stack
            }

    def view_stack(self, user: str) -> list[dict]:
        """The user's open modals, bottom first."""
        with self.ws.lock:
            return [copy.deepcopy(self.ws.views[v]) for v in self.ws.modal_stacks.get(user, [])]

    @property
    def home_views(self) -> dict[str, dict]:
        return self.ws.snapshot(self.ws.home_views)

    @property
    def files(self) -> list[dict]:
        return self.ws.snapshot(self.ws.files)

    @property
    def calls(self) -> list[tuple[str, dict]]:
        return self.ws.snapshot(self.ws.calls)

    def calls_to(self, method: str) -> list[dict]:
        """The params of every call to one Web API method, oldest first."""
        return [params for name, params in self.calls if name == method]

    def wait_until(self, condition: Callable[[], object], *, timeout: float, describe) -> object:
        """Sleep on the workspace's Condition until `condition()` is truthy; return it."""
        deadline = time.monotonic() + timeout
        with self.ws.changed:
            while True:
                found = condition()
                if found:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(describe())
                self.ws.changed.wait(timeout=min(left, 0.25))

    def wait_for_message(
        self,
        *,
        channel: str,
        thread_ts: str | None = None,
        predicate: Callable[[dict], bool] | None = None,
        user: str | None = None,
        timeout: float = 10.0,
    ) -> dict:
        """The first message (oldest first) in the channel, or among the thread's replies, that
        matches; waits for one up to `timeout` s. `TimeoutError` lists what there was."""

        def candidates() -> list[dict]:
            found = self.messages(channel, thread_ts)
            if thread_ts:
                found = [m for m in found if m["ts"] != thread_ts]
            return [m for m in found if user in (None, m.get("user"))]

        def match():
            return next((m for m in candidates() if predicate is None or predicate(m)), None)

        def describe() -> str:
            seen = [(m.get("user"), m["ts"], (m.get("text") or "")[:80]) for m in candidates()]
            where = f"{channel} thread {thread_ts}" if thread_ts else channel
            return f"no matching message in {where} after {timeout} s; saw {seen}"

        return self.wait_until(match, timeout=timeout, describe=describe)

    def wait_for_ephemeral(
        self,
        *,
        channel: str | None = None,
        user: str | None = None,
        predicate: Callable[[dict], bool] | None = None,
        timeout: float = 10.0,
    ) -> dict:
        def match():
            found = self.ephemerals(channel=channel, user=user)
            return next((e for e in found if predicate is None or predicate(e)), None)

        def describe() -> str:
            seen = [(e["user"], (e.get("text") or "")[:80]) for e in self.ephemerals(channel)]
            return f"no matching ephemeral for {user} in {channel} after {timeout} s; saw {seen}"

        return self.wait_until(match, timeout=timeout, describe=describe)

    def wait_for_view(
        self,
        *,
        user: str,
        predicate: Callable[[dict], bool] | None = None,
        timeout: float = 10.0,
    ) -> dict:
        """The top open modal of `user` that matches; waits for one."""

        def match():
            stack = self.view_stack(user)
            top = stack[-1] if stack else None
            return top if top and (predicate is None or predicate(top)) else None

        def describe() -> str:
            titles = [(v["id"], (v.get("title") or {}).get("text")) for v in self.view_stack(user)]
            return f"no matching open modal for {user} after {timeout} s; open: {titles}"

        return self.wait_until(match, timeout=timeout, describe=describe)
