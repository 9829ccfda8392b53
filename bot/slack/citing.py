"""Citing team knowledge under an answer, and remembering what was cited.

An answer that used approved answers says so under its text: "📚 from an answer corrected by
@alice on 2026-11-20 (thread)" for each team note the model actually saw, or "✅ Answered from an
answer approved by @erin on …" when the bot repeated an approved answer without the model. The
reader can follow the link to the thread where the expert vouched for it.

What an answer cited is stored with it (`Answer.sources`, a small JSON list) because the message
is re-rendered from the rows after every verdict, by which time the knowledge base may hold
something else. Each source keeps the rendered citation (mrkdwn) plus the entry id, its score and
whether it was repeated verbatim, so a later audit can tell which approved answers shaped which
replies.

Permalinks come from `chat.getPermalink` (no scope needed); they never change, so they are
cached per message. A failed lookup costs the citation its link, never the answer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot.engine.types import Note
from bot.knowledge import Hit, KnowledgeEntry, as_notes, citation

log = logging.getLogger(__name__)


class Permalinks:
    """`chat.getPermalink`, cached: one call per cited message for the process's life."""

    def __init__(self, *, client: WebClient, max_size: int = 4096) -> None:
        self._client = client
        self._cache: dict[tuple[str, str], str] = {}
        self._max_size = max_size
        self._lock = threading.Lock()

    def of(self, *, channel_id: str | None, message_ts: str | None) -> str | None:
        if not channel_id or not message_ts:
            return None
        key = (channel_id, message_ts)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        try:
            link = self._client.chat_getPermalink(channel=channel_id, message_ts=message_ts)
        except SlackApiError as exc:  # e.g. the bot left that channel: cite without a link
            log.info("no permalink for %s/%s: %s", *key, exc.response.get("error"))
            return None
        permalink = link.get("permalink")
        if permalink:
            with self._lock:
                if len(self._cache) >= self._max_size:
                    self._cache.clear()  # permalinks are cheap to ask again; keep memory flat
                self._cache[key] = permalink
        return permalink

    def of_entry(self, entry: KnowledgeEntry) -> str | None:
        """The bot's reply that the expert judged, else the thread it lives in."""
        return self.of(channel_id=entry.channel_id, message_ts=entry.answer_ts or entry.thread_ts)


def source(
    *, entry: KnowledgeEntry, permalink: str | None, exact: bool, score: float | None = None
) -> dict:
    """One stored source of an answer (JSON-ready)."""
    return {
        "entry": entry.id,
        "kind": entry.kind,
        "expert": entry.expert_id,
        "exact": exact,
        "score": None if score is None else round(score, 4),
        "citation": citation(entry, permalink),
    }


def used_hits(hits: Sequence[Hit], notes_used: Iterable[Note]) -> list[Hit]:
    """The hits whose notes made it into the prompt (the engine may drop some to fit)."""
    used = set(notes_used)
    return [hit for hit, note in zip(hits, as_notes(hits), strict=True) if note in used]


def note_sources(*, hits: Sequence[Hit], permalinks: Permalinks) -> list[dict]:
    return [
        source(
            entry=hit.entry, permalink=permalinks.of_entry(hit.entry), exact=False, score=hit.score
        )
        for hit in hits
    ]


def cited(sources: Iterable[dict] | None) -> tuple[str, ...]:
    """Citation lines of the team notes an answer used."""
    return tuple(s["citation"] for s in sources or () if not s.get("exact") and s.get("citation"))


def answered_from(sources: Iterable[dict] | None) -> str | None:
    """The citation of the approved answer repeated verbatim, if the answer is one."""
    return next((s["citation"] for s in sources or () if s.get("exact")), None)
