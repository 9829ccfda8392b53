"""What kind of conversation a channel is: public, private, DM or group DM.

It decides privacy (only public-channel verdicts train the adapter; private knowledge stays in
its channel), so it must not be guessed: `app_mention` events and slash commands carry no
reliable channel type. Ask `conversations.info` once per channel and cache the answer for a
few minutes (a channel can be made private). When Slack cannot say, the answer is None, which
every consumer treats as private.
"""

from __future__ import annotations

import logging
import threading
import time

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

log = logging.getLogger(__name__)

CACHE_S = 300.0


def kind_of(info: dict) -> str:
    """Map a conversations.info `channel` object to the Events API's channel_type names."""
    if info.get("is_im"):
        return "im"
    if info.get("is_mpim"):
        return "mpim"
    if info.get("is_private") or info.get("is_group"):
        return "group"
    return "channel"


class ChannelKinds:
    def __init__(self, *, cache_s: float = CACHE_S):
        self._cache: dict[str, tuple[float, str | None]] = {}
        self._lock = threading.Lock()
        self._cache_s = cache_s

    def resolve(self, *, client: WebClient, channel_id: str, hint: str | None = None) -> str | None:
        """The channel's kind; `hint` (a message event's channel_type) is trusted when given."""
        if hint:
            return hint
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(channel_id)
        if cached and now - cached[0] < self._cache_s:
            return cached[1]
        try:
            kind = kind_of(client.conversations_info(channel=channel_id)["channel"])
        except SlackApiError as exc:
            log.warning("conversations.info %s: %s", channel_id, exc.response.get("error"))
            kind = None
        with self._lock:
            self._cache[channel_id] = (now, kind)
        return kind
