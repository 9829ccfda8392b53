"""The emulated workspace: users, channels, messages, views, files — and one lock over all of it.

Everything the Web API, the response URLs and the test-facing `SlackEmulator` read or change lives
here, behind one re-entrant lock. The lock's `Condition` (`changed`) is notified after every
change, so `wait_for_message` sleeps until something happens instead of polling in a tight loop.
Nothing here does I/O: delivering events to the bot happens outside the lock (the bot calls back
into the Web API while it handles them, and must never wait on us).

Records are stored in the shapes Slack returns them (a message is the dict `conversations.history`
would give), so handlers return copies of them as they are.
"""

from __future__ import annotations

import copy
import itertools
import secrets
import threading
import time
from decimal import Decimal


class Workspace:
    """All mutable state of one emulated Slack workspace (one team, one bot)."""

    def __init__(
        self,
        *,
        team_id: str,
        team_domain: str,
        bot_user_id: str,
        bot_id: str,
        app_id: str,
        ts_start: float = 1_700_000_000.0,
        clock=time.monotonic,
    ) -> None:
        self.team_id = team_id
        self.team_domain = team_domain
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.app_id = app_id
        self.clock = clock  # seconds, for trigger and response-URL lifetimes; tests may fake it
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.users: dict[str, dict] = {}
        self.channels: dict[str, dict] = {}
        self.usergroups: dict[str, dict] = {}
        self.messages: dict[str, list[dict]] = {}  # channel id -> messages, oldest first
        self.ephemerals: list[dict] = []
        self.views: dict[str, dict] = {}  # every view ever opened, by id
        self.view_owner: dict[str, str] = {}  # view id -> user id
        self.modal_stacks: dict[str, list[str]] = {}  # user id -> open modal ids, bottom first
        self.home_views: dict[str, dict] = {}
        self.files: list[dict] = []
        self.pending_uploads: dict[str, dict] = {}  # file id -> {"name", "length", "bytes"}
        self.calls: list[tuple[str, dict]] = []
        self.triggers: dict[str, dict] = {}  # trigger id -> {"user", "issued", "used", "view_id"}
        self.response_urls: dict[str, dict] = {}  # key -> where a response lands
        self._last_ts = Decimal(f"{ts_start:.6f}")
        self._counter = itertools.count(1)

    # -- ids ---------------------------------------------------------------------------------

    def next_ts(self) -> str:
        """A message timestamp like Slack's ("1700000000.000100"), strictly increasing."""
        with self.lock:
            self._last_ts += Decimal("0.000100")
            return f"{self._last_ts:.6f}"

    def new_id(self, prefix: str) -> str:
        """An id in Slack's style: a type letter and upper-case alphanumerics (V0A1B2C3D4)."""
        return f"{prefix}0{next(self._counter):03d}{secrets.token_hex(3).upper()}"

    def issue_trigger(self, *, user: str, view_id: str | None = None) -> str:
        """A trigger id, usable once, for a short while (views.open checks the age)."""
        trigger_id = f"{next(self._counter)}.{int(time.time())}.{secrets.token_hex(16)}"
        with self.lock:
            self.triggers[trigger_id] = {
                "user": user,
                "issued": self.clock(),
                "used": False,
                "view_id": view_id,
            }
        return trigger_id

    def notify(self) -> None:
        with self.lock:
            self.changed.notify_all()

    # -- people and places ---------------------------------------------------------------------

    def is_member(self, channel_id: str, user_id: str) -> bool:
        channel = self.channels.get(channel_id)
        return bool(channel) and user_id in channel["_members"]

    def im_with(self, user_id: str) -> str | None:
        for channel in self.channels.values():
            if channel.get("is_im") and channel.get("user") == user_id:
                return channel["id"]
        return None

    def channel_type(self, channel_id: str) -> str:
        """The `channel_type` Slack puts on message events: channel, group, im or mpim."""
        channel = self.channels[channel_id]
        if channel.get("is_im"):
            return "im"
        if channel.get("is_mpim"):
            return "mpim"
        return "group" if channel.get("is_private") else "channel"

    def public_channel(self, channel_id: str) -> dict:
        """The channel as conversations.info shows it to the bot (no internal fields)."""
        channel = {k: v for k, v in self.channels[channel_id].items() if not k.startswith("_")}
        channel["is_member"] = self.bot_user_id in self.channels[channel_id]["_members"]
        if not channel.get("is_im"):
            channel["num_members"] = len(self.channels[channel_id]["_members"])
        return channel

    # -- messages ------------------------------------------------------------------------------

    def find_message(self, channel_id: str, ts: str) -> dict | None:
        for message in self.messages.get(channel_id, []):
            if message["ts"] == ts:
                return message
        return None

    def store_message(self, channel_id: str, message: dict) -> dict:
        """Append a message and keep the parent's thread summary as Slack does."""
        with self.lock:
            self.messages.setdefault(channel_id, []).append(message)
            thread_ts = message.get("thread_ts")
            if thread_ts and thread_ts != message["ts"]:
                parent = self.find_message(channel_id, thread_ts)
                if parent is not None:
                    parent["thread_ts"] = thread_ts
                    parent["reply_count"] = parent.get("reply_count", 0) + 1
                    users = parent.setdefault("reply_users", [])
                    author = message.get("user")
                    if author and author not in users:
                        users.append(author)
                    parent["reply_users_count"] = len(users)
                    parent["latest_reply"] = message["ts"]
            self.notify()
            return message

    def delete_message(self, channel_id: str, ts: str) -> None:
        """Remove a message; a parent with replies stays as a tombstone, as in Slack."""
        with self.lock:
            message = self.find_message(channel_id, ts)
            if message is None:
                return
            if message.get("reply_count"):
                message.update(
                    subtype="tombstone", text="This message was deleted.", hidden=True, blocks=[]
                )
            else:
                self.messages[channel_id].remove(message)
                thread_ts = message.get("thread_ts")
                parent = self.find_message(channel_id, thread_ts) if thread_ts else None
                if parent is not None and parent is not message and parent.get("reply_count"):
                    parent["reply_count"] -= 1
            self.notify()

    def thread(self, channel_id: str, thread_ts: str) -> list[dict]:
        """The parent and its replies, oldest first (what conversations.replies returns)."""
        return [
            m
            for m in self.messages.get(channel_id, [])
            if m["ts"] == thread_ts or m.get("thread_ts") == thread_ts
        ]

    def top_level(self, channel_id: str) -> list[dict]:
        """Messages shown in the channel itself (not replies), oldest first."""
        return [
            m
            for m in self.messages.get(channel_id, [])
            if not m.get("thread_ts") or m["thread_ts"] == m["ts"]
        ]

    def snapshot(self, value):
        """A deep copy taken under the lock, so callers never see a half-made change."""
        with self.lock:
            return copy.deepcopy(value)
