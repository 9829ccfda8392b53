"""Switches admins flip from Slack: per-channel auto-answer, and pausing training.

Both are persisted so every replica (and a restart) sees the same setting. `training_paused`
lives in `app_state` as "true" / "false"; the scheduler reads it through `training_paused()`.
"""

from __future__ import annotations

from sqlmodel import Session

from bot.store.models import AppState, ChannelSetting, utcnow

TRAINING_PAUSED = "training_paused"


def set_auto_answer(
    *, session: Session, channel_id: str, enabled: bool, updated_by: str | None = None
) -> ChannelSetting:
    setting = session.get(ChannelSetting, channel_id) or ChannelSetting(channel_id=channel_id)
    setting.auto_answer = enabled
    setting.updated_by = updated_by
    setting.updated_at = utcnow()
    session.add(setting)
    session.flush()
    return setting


def auto_answer_enabled(*, session: Session, channel_id: str) -> bool:
    setting = session.get(ChannelSetting, channel_id)
    return bool(setting and setting.auto_answer)


def set_training_paused(*, session: Session, paused: bool) -> None:
    state = session.get(AppState, TRAINING_PAUSED) or AppState(key=TRAINING_PAUSED)
    state.value = "true" if paused else "false"
    state.updated_at = utcnow()
    session.add(state)
    session.flush()


def training_paused(*, session: Session) -> bool:
    state = session.get(AppState, TRAINING_PAUSED)
    return bool(state and state.value == "true")
