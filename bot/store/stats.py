"""Numbers for App Home and `/apprentice status`: questions, review rates, pending reviews.

An answer's expert outcome is its newest current expert verdict (approve | correct | reject);
answers with none are pending review. Weekly volumes are small, so the rates are computed in
Python over the week's rows rather than in dialect-specific SQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, select

from bot.store.models import Answer, Question, Verdict, VerdictKind

EXPERT_KIND_VALUES = [k.value for k in VerdictKind if k.expert_only]


@dataclass(frozen=True)
class ReviewStats:
    questions: int
    answers: int  # finished answers
    reviewed: int  # with a current expert verdict
    approved: int
    corrected: int
    rejected: int
    pending_reviews: int  # finished answers with no expert verdict (all time)

    @property
    def approval_rate(self) -> float | None:
        return self.approved / self.reviewed if self.reviewed else None

    @property
    def correction_rate(self) -> float | None:
        return self.corrected / self.reviewed if self.reviewed else None


def _outcomes(session: Session, answer_ids: list[int]) -> dict[int, str]:
    """answer id -> kind of its newest current expert verdict."""
    outcomes: dict[int, str] = {}
    if not answer_ids:
        return outcomes
    rows = session.exec(
        select(Verdict.answer_id, Verdict.kind)
        .where(col(Verdict.answer_id).in_(answer_ids))
        .where(col(Verdict.kind).in_(EXPERT_KIND_VALUES), col(Verdict.withdrawn_at).is_(None))
        .order_by(col(Verdict.created_at), col(Verdict.id))
    ).all()
    for answer_id, kind in rows:
        outcomes[answer_id] = kind  # later rows win
    return outcomes


def review_stats(*, session: Session, since: datetime) -> ReviewStats:
    questions = len(session.exec(select(Question.id).where(Question.created_at >= since)).all())
    answer_ids = list(
        session.exec(
            select(Answer.id).where(Answer.created_at >= since, Answer.state == "done")
        ).all()
    )
    outcomes = _outcomes(session, answer_ids)
    kinds = list(outcomes.values())
    return ReviewStats(
        questions=questions,
        answers=len(answer_ids),
        reviewed=len(kinds),
        approved=kinds.count(VerdictKind.APPROVE.value),
        corrected=kinds.count(VerdictKind.CORRECT.value),
        rejected=kinds.count(VerdictKind.REJECT.value),
        pending_reviews=len(pending_reviews(session=session, limit=None)),
    )


def pending_reviews(*, session: Session, limit: int | None = 5) -> list[tuple[Question, Answer]]:
    """Finished answers no expert has judged yet, newest first."""
    judged = (
        select(Verdict.answer_id)
        .where(col(Verdict.kind).in_(EXPERT_KIND_VALUES), col(Verdict.withdrawn_at).is_(None))
        .scalar_subquery()
    )
    query = (
        select(Question, Answer)
        .join(Answer, col(Answer.question_id) == col(Question.id))
        .where(Answer.state == "done", col(Answer.id).not_in(judged))
        .order_by(col(Answer.created_at).desc(), col(Answer.id).desc())
    )
    if limit is not None:
        query = query.limit(limit)
    return [(q, a) for q, a in session.exec(query).all()]
