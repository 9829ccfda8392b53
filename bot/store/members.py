"""Members: people an admin added to a role from Slack (`/apprentice experts add @user`).

Configured ids (settings.experts / settings.admins) never live here; they cannot be removed
from Slack, only from the configuration, so a mis-click cannot lock the admins out.
"""

from __future__ import annotations

from sqlmodel import Session, col, select

from bot.store.models import Member, Role


def add_member(*, session: Session, user_id: str, role: str, added_by: str | None = None) -> bool:
    """Give `user_id` the role; False when they already had it."""
    role = Role(role).value
    existing = session.exec(
        select(Member).where(Member.user_id == user_id, Member.role == role)
    ).first()
    if existing is not None:
        return False
    session.add(Member(user_id=user_id, role=role, added_by=added_by))
    session.flush()
    return True


def remove_member(*, session: Session, user_id: str, role: str) -> bool:
    """Take the role away; False when they did not have it (as a row)."""
    role = Role(role).value
    existing = session.exec(
        select(Member).where(Member.user_id == user_id, Member.role == role)
    ).first()
    if existing is None:
        return False
    session.delete(existing)
    session.flush()
    return True


def list_members(*, session: Session, role: str | None = None) -> list[Member]:
    query = select(Member).order_by(col(Member.created_at), col(Member.id))
    if role is not None:
        query = query.where(Member.role == Role(role).value)
    return list(session.exec(query).all())


def member_roles(*, session: Session, user_id: str) -> set[str]:
    return set(session.exec(select(Member.role).where(Member.user_id == user_id)).all())
