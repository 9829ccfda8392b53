"""Per-channel switches admins flip from Slack (auto-answer), persisted for every replica.

Pausing training lives with the scheduler (`bot.scheduler.pause_training`).
"""

from __future__ import annotations

from sqlmodel import Session

from bot.store.models import ChannelSetting, utcnow


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
