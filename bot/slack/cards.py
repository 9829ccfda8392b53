"""An answer message's content, rebuilt from the database after every verdict.

The message is a view of the rows: the correction (if any) replaces the text, the current
verdicts give the status line, and the team knowledge it cited is stored with the answer.
Rebuilding from rows means two experts clicking at once still leave the message matching what
is stored.
"""

from __future__ import annotations

from sqlmodel import Session

from bot.slack.blocks import AnswerCard
from bot.slack.citing import answered_from, cited
from bot.store.models import Answer, VerdictKind
from bot.store.verdicts import current_verdicts


def answer_card(*, session: Session, answer: Answer) -> AnswerCard:
    verdicts = current_verdicts(session=session, answer_id=answer.id)
    corrections = [v for v in verdicts if v.kind == VerdictKind.CORRECT]
    latest = corrections[-1] if corrections else None
    return AnswerCard(
        answer_id=answer.id,
        text=latest.text if latest else answer.text,
        adapter_version=answer.adapter_version,
        latency_ms=answer.latency_ms,
        truncated_input=answer.truncated,
        corrected_by=latest.author_id if latest else None,
        approved_by=tuple(v.author_id for v in verdicts if v.kind == VerdictKind.APPROVE),
        rejected_by=tuple((v.author_id, v.text) for v in verdicts if v.kind == VerdictKind.REJECT),
        thumbs_up=sum(v.kind == VerdictKind.UP for v in verdicts),
        thumbs_down=sum(v.kind == VerdictKind.DOWN for v in verdicts),
        citations=cited(answer.sources),
        answered_from=answered_from(answer.sources),
    )


def shown_text(*, session: Session, answer: Answer) -> str:
    """The answer as the team now holds it (the latest correction wins)."""
    return answer_card(session=session, answer=answer).text
