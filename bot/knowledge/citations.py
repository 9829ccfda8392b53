"""How a retrieved entry is credited: in the prompt's team notes and under the answer in Slack.

Pure functions. The expert is named as a Slack mention (`<@U…>`), which Slack renders as the
person's current name, and the date is the verdict's, in UTC, so "corrected by … on …" tells
the reader who vouches for the fact and how fresh it is.
"""

from __future__ import annotations

from collections.abc import Iterable

from bot.engine.types import Note
from bot.knowledge.entries import KnowledgeEntry


def vouched_by(entry: KnowledgeEntry) -> str:
    """`corrected by <@UALICE> on 2026-11-20` (or `approved by …`)."""
    return f"{entry.kind} by <@{entry.expert_id}> on {entry.verdict_at:%Y-%m-%d}"


def as_notes(hits: Iterable) -> tuple[Note, ...]:
    """Team notes for the answer engine, one per hit (a `Hit` or a bare `KnowledgeEntry`)."""
    notes = []
    for hit in hits:
        entry = getattr(hit, "entry", hit)
        notes.append(Note(question=entry.question, answer=entry.answer, source=vouched_by(entry)))
    return tuple(notes)


def citation(entry: KnowledgeEntry, permalink: str | None = None) -> str:
    """Slack mrkdwn: `from an answer corrected by <@U…> on 2026-11-20 (<link|thread>)`.

    The permalink comes from the Slack side (`chat.getPermalink` on `entry.channel_id` and
    `entry.answer_ts`); without one the citation simply has no link.
    """
    text = f"from an answer {vouched_by(entry)}"
    if permalink:
        text += f" (<{permalink}|thread>)"
    return text
