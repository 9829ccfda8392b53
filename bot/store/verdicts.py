"""Verdicts: experts approve, correct or reject an answer; anyone gives 👍 or 👎.

Each author holds at most one current verdict per answer in each of two slots: the expert slot
(approve | correct | reject) and the soft slot (up | down). Recording a new verdict withdraws the
author's previous one in the same slot, so "the latest one counts" is a plain query for the
non-withdrawn rows, and the history of changes of mind is kept for the learning side.
"""

from __future__ import annotations

from sqlmodel import Session, col, select

from bot.store.models import Verdict, VerdictKind, utcnow

EXPERT_KINDS = (VerdictKind.APPROVE, VerdictKind.CORRECT, VerdictKind.REJECT)
SOFT_KINDS = (VerdictKind.UP, VerdictKind.DOWN)


def _slot(kind: str) -> tuple[VerdictKind, ...]:
    return EXPERT_KINDS if VerdictKind(kind).expert_only else SOFT_KINDS


def current_verdicts(*, session: Session, answer_id: int) -> list[Verdict]:
    """Every author's current (non-withdrawn) verdicts on an answer, oldest first."""
    return list(
        session.exec(
            select(Verdict)
            .where(Verdict.answer_id == answer_id, col(Verdict.withdrawn_at).is_(None))
            .order_by(col(Verdict.created_at), col(Verdict.id))
        ).all()
    )


def current_verdict(
    *, session: Session, answer_id: int, author_id: str, kind: str
) -> Verdict | None:
    """The author's current verdict in `kind`'s slot (expert or soft), if any."""
    return session.exec(
        select(Verdict)
        .where(
            Verdict.answer_id == answer_id,
            Verdict.author_id == author_id,
            col(Verdict.kind).in_([k.value for k in _slot(kind)]),
            col(Verdict.withdrawn_at).is_(None),
        )
        .order_by(col(Verdict.created_at).desc(), col(Verdict.id).desc())
    ).first()


def withdraw_verdict(
    *, session: Session, answer_id: int, author_id: str, kind: str
) -> Verdict | None:
    """Withdraw the author's current verdict in `kind`'s slot; returns it, or None if none."""
    withdrawn = None
    now = utcnow()
    for verdict in session.exec(
        select(Verdict).where(
            Verdict.answer_id == answer_id,
            Verdict.author_id == author_id,
            col(Verdict.kind).in_([k.value for k in _slot(kind)]),
            col(Verdict.withdrawn_at).is_(None),
        )
    ).all():
        verdict.withdrawn_at = now
        session.add(verdict)
        withdrawn = verdict
    session.flush()
    return withdrawn


def record_verdict(
    *, session: Session, answer_id: int, kind: str, author_id: str, text: str | None = None
) -> Verdict:
    """Store a verdict; it replaces the author's previous one in the same slot."""
    kind = VerdictKind(kind)
    if kind is VerdictKind.CORRECT and not (text or "").strip():
        raise ValueError("a correction needs the corrected answer text")
    withdraw_verdict(session=session, answer_id=answer_id, author_id=author_id, kind=kind)
    verdict = Verdict(answer_id=answer_id, kind=kind.value, author_id=author_id, text=text)
    session.add(verdict)
    session.flush()
    return verdict


def latest_correction(*, session: Session, answer_id: int) -> Verdict | None:
    """The newest current correction of an answer: what the team now holds to be right."""
    return session.exec(
        select(Verdict)
        .where(
            Verdict.answer_id == answer_id,
            Verdict.kind == VerdictKind.CORRECT.value,
            col(Verdict.withdrawn_at).is_(None),
        )
        .order_by(col(Verdict.created_at).desc(), col(Verdict.id).desc())
    ).first()
