"""Knowledge entries: the answers the team's experts currently stand behind.

An answer becomes an entry when its *effective* expert verdict — the latest non-withdrawn
approve / correct / reject from any expert — is approve (the bot's own text) or correct (the
expert's text). A later reject, or withdrawing the verdict that made it an entry, takes it out
again; withdrawing a later verdict brings the earlier one back, because "effective" is computed
from the rows every time rather than remembered. These are the same rules the training-set
builder applies, so what the bot retrieves today is what the adapter learns tomorrow.

Visibility follows Slack: an entry from a public channel ("channel") may be shown anywhere; one
from a private channel ("group"), a DM ("im") or a group DM ("mpim") only in that same
conversation. Anything else (an unknown type, a question asked outside Slack) is treated as
private to its channel id, because leaking is worse than missing.

When the same question (after `normalise_question`) was answered and judged several times in
one visibility scope, the latest effective verdict among its answers decides, as in the
training set: a newer correction replaces an older approval instead of contradicting it, and a
newer rejection leaves no entry at all (the expert may have rejected the answer because the old
fact went stale). Unlike the training set, private conversations need no opt-in here: their
entries are only ever shown back where they were asked.

`bot.learning.dataset.build_training_set` applies the same rules in Python over ORM rows and
exposes no per-answer query to share, so this module has its own window query; keep the two in
step when the rules change.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func
from sqlmodel import Session, col, select

from bot.store.models import Answer, Question, Verdict, VerdictKind
from bot.store.question_keys import normalise_question

PUBLIC_CHANNEL_TYPE = "channel"
EXPERT_KINDS = (VerdictKind.APPROVE.value, VerdictKind.CORRECT.value, VerdictKind.REJECT.value)


@dataclass(frozen=True)
class KnowledgeEntry:
    """One approved or corrected answer, with what is needed to cite it and to scope it."""

    id: str  # "answer:<answer id>", the same key the training set uses
    answer_id: int
    question_id: int
    question: str
    answer: str  # the bot's answer if approved, the expert's text if corrected
    kind: str  # "approved" | "corrected"
    expert_id: str
    verdict_id: int
    verdict_at: datetime
    channel_id: str | None
    channel_type: str | None
    thread_ts: str | None  # the thread the question lives in (its own ts when it started one)
    answer_ts: str | None  # the bot's reply, for a permalink
    key: str = ""  # normalise_question(question), computed once when read

    @property
    def public(self) -> bool:
        return self.channel_type == PUBLIC_CHANNEL_TYPE

    def visible_in(self, channel_id: str | None) -> bool:
        """Whether a question asked in `channel_id` may be shown this entry."""
        return self.public or self.channel_id == channel_id

    @property
    def scope(self) -> tuple[bool, str | None]:
        """Entries compete ("latest verdict wins") only with others of the same scope."""
        return _scope(self.channel_type, self.channel_id)


def _scope(channel_type: str | None, channel_id: str | None) -> tuple[bool, str | None]:
    return (True, None) if channel_type == PUBLIC_CHANNEL_TYPE else (False, channel_id)


def current_entries(*, session: Session) -> list[KnowledgeEntry]:
    """Every answer the experts currently stand behind, one per question and scope.

    One query: a window over the non-withdrawn expert verdicts picks each answer's latest
    (by time, then id, so two verdicts in the same instant still have an order), joined to
    its answer and question; then, per question and scope, the latest of those decides.
    """
    ranked = (
        select(
            col(Verdict.id).label("verdict_id"),
            func.row_number()
            .over(
                partition_by=col(Verdict.answer_id),
                order_by=(col(Verdict.created_at).desc(), col(Verdict.id).desc()),
            )
            .label("rank"),
        )
        .where(col(Verdict.kind).in_(EXPERT_KINDS), col(Verdict.withdrawn_at).is_(None))
        .subquery()
    )
    # Plain Core rows: ORM row processing was most of a refresh's time at 10k entries.
    rows = (
        session.connection()
        .execute(
            select(
                Verdict.id,
                Verdict.kind,
                Verdict.author_id,
                Verdict.text,
                Verdict.created_at,
                Answer.id,
                Answer.text,
                Answer.state,
                Answer.message_ts,
                Question.id,
                Question.text,
                Question.channel_id,
                Question.channel_type,
                Question.thread_ts,
                Question.message_ts,
            )
            .join(ranked, ranked.c.verdict_id == col(Verdict.id))
            .join(Answer, col(Answer.id) == col(Verdict.answer_id))
            .join(Question, col(Question.id) == col(Answer.question_id))
            .where(ranked.c.rank == 1)
            .order_by(col(Verdict.created_at), col(Verdict.id))
        )
        .all()
    )

    # Rows come oldest verdict first, so a later one overwrites an earlier one.
    latest: dict[tuple[tuple[bool, str | None], str], KnowledgeEntry | None] = {}
    for (
        verdict_id,
        kind,
        author_id,
        correction,
        verdict_at,
        answer_id,
        answer_text,
        answer_state,
        answer_ts,
        question_id,
        question_text,
        channel_id,
        channel_type,
        thread_ts,
        question_ts,
    ) in rows:
        key = normalise_question(question_text)
        if kind == VerdictKind.REJECT.value:
            latest[(_scope(channel_type, channel_id), key)] = None
            continue
        corrected = kind == VerdictKind.CORRECT.value
        text = (correction if corrected else answer_text) or ""
        # An approval of a reply that never finished has nothing worth repeating.
        if not text.strip() or not question_text.strip():
            continue
        if not corrected and answer_state != "done":
            continue
        entry = KnowledgeEntry(
            id=f"answer:{answer_id}",
            answer_id=answer_id,
            question_id=question_id,
            question=question_text.strip(),
            answer=text.strip(),
            kind="corrected" if corrected else "approved",
            expert_id=author_id,
            verdict_id=verdict_id,
            verdict_at=verdict_at,
            channel_id=channel_id,
            channel_type=channel_type,
            thread_ts=thread_ts or question_ts,
            answer_ts=answer_ts,
            key=key,
        )
        latest[(entry.scope, key)] = entry
    return sorted((e for e in latest.values() if e is not None), key=lambda e: e.answer_id)
