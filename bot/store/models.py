"""The tables. Every change to them goes through a migration in `migrations/versions/`.

Times are timezone-aware UTC (sqlmodel's UTCDateTime refuses naive ones); `utcnow()` makes them.
JSON columns hold small structured data (metrics, example ids) that nothing queries inside.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import JSON, Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class VerdictKind(StrEnum):
    APPROVE = "approve"
    CORRECT = "correct"
    REJECT = "reject"
    UP = "up"
    DOWN = "down"

    @property
    def expert_only(self) -> bool:
        return self in (VerdictKind.APPROVE, VerdictKind.CORRECT, VerdictKind.REJECT)


class Role(StrEnum):
    EXPERT = "expert"
    ADMIN = "admin"


class RunState(StrEnum):
    RUNNING = "running"
    PROMOTED = "promoted"
    REFUSED = "refused"  # trained, but the gate kept the active version
    SKIPPED = "skipped"  # nothing (new) to learn from
    FAILED = "failed"


class SlackEvent(SQLModel, table=True):
    """Every Slack event id seen once: a retried delivery finds its row and is dropped."""

    __tablename__ = "slack_event"
    event_id: str = Field(primary_key=True, max_length=64)
    received_at: datetime = Field(default_factory=utcnow)


class Question(SQLModel, table=True):
    __tablename__ = "question"
    id: int | None = Field(default=None, primary_key=True)
    event_id: str | None = Field(default=None, max_length=64, unique=True, index=True)
    source: str = Field(max_length=16, description="mention | dm | command | thread | auto | cli")
    team_id: str | None = Field(default=None, max_length=32)
    channel_id: str | None = Field(default=None, max_length=32, index=True)
    channel_type: str | None = Field(default=None, max_length=16, description="channel|group|im|…")
    user_id: str | None = Field(default=None, max_length=32)
    thread_ts: str | None = Field(default=None, max_length=32, index=True)
    message_ts: str | None = Field(default=None, max_length=32)
    text: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, index=True)


class Answer(SQLModel, table=True):
    __tablename__ = "answer"
    id: int | None = Field(default=None, primary_key=True)
    question_id: int = Field(foreign_key="question.id", index=True)
    text: str = Field(sa_column=Column(Text, nullable=False))
    adapter_version: str | None = Field(default=None, max_length=32, description="None = base")
    latency_ms: int | None = None
    truncated: bool = False
    channel_id: str | None = Field(default=None, max_length=32)
    message_ts: str | None = Field(default=None, max_length=32, index=True)
    state: str = Field(default="done", max_length=16, description="pending | done | failed")
    error: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow, index=True)
    # Team knowledge the answer used (retrieved notes, or the approved answer it repeated),
    # as `bot.slack.citing` writes it; None = none.
    sources: list | None = Field(default=None, sa_column=Column(JSON, nullable=True))


class Verdict(SQLModel, table=True):
    """One person's judgement of one answer. The latest non-withdrawn one of an author counts."""

    __tablename__ = "verdict"
    id: int | None = Field(default=None, primary_key=True)
    answer_id: int = Field(foreign_key="answer.id", index=True)
    kind: str = Field(max_length=16)
    author_id: str = Field(max_length=32, index=True)
    text: str | None = Field(default=None, sa_column=Column(Text), description="correction/reason")
    created_at: datetime = Field(default_factory=utcnow, index=True)
    withdrawn_at: datetime | None = None


class Member(SQLModel, table=True):
    """People added to a role by an admin (configured ids come from settings, not rows)."""

    __tablename__ = "member"
    __table_args__ = (UniqueConstraint("user_id", "role"),)
    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(max_length=32, index=True)
    role: str = Field(max_length=16)
    added_by: str | None = Field(default=None, max_length=32)
    created_at: datetime = Field(default_factory=utcnow)


class ChannelSetting(SQLModel, table=True):
    __tablename__ = "channel_setting"
    channel_id: str = Field(primary_key=True, max_length=32)
    auto_answer: bool = False
    train_opt_in: bool = Field(default=False, description="private channel/DM verdicts may train")
    updated_by: str | None = Field(default=None, max_length=32)
    updated_at: datetime = Field(default_factory=utcnow)


class AdapterVersion(SQLModel, table=True):
    """A published adapter folder (adapters/vNNNN). Rows are never deleted or renamed."""

    __tablename__ = "adapter_version"
    name: str = Field(primary_key=True, max_length=32)
    base_model: str = Field(max_length=256)
    dataset_hash: str | None = Field(default=None, max_length=64)
    example_count: int = 0
    metrics: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    rolled_back_at: datetime | None = None


class AdapterActivation(SQLModel, table=True):
    """The active-version pointer's history: the newest row is the active version.

    `version` None means the base model alone. Rollback appends a row, so the history is kept.
    """

    __tablename__ = "adapter_activation"
    id: int | None = Field(default=None, primary_key=True)
    version: str | None = Field(default=None, max_length=32)
    action: str = Field(max_length=16, description="promote | rollback")
    actor: str | None = Field(default=None, max_length=64)
    reason: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow, index=True)


class TrainingRun(SQLModel, table=True):
    __tablename__ = "training_run"
    id: int | None = Field(default=None, primary_key=True)
    trigger: str = Field(max_length=32, description="cli | schedule | verdicts | slack")
    state: str = Field(default=RunState.RUNNING, max_length=16, index=True)
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None
    owner: str | None = Field(default=None, max_length=128, description="host:pid running it")
    version: str | None = Field(default=None, max_length=32)
    example_ids: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    metrics: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    error: str | None = Field(default=None, sa_column=Column(Text))


class AppState(SQLModel, table=True):
    """Small persistent flags (e.g. `training_paused`)."""

    __tablename__ = "app_state"
    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(default="", sa_column=Column(Text, nullable=False))
    updated_at: datetime = Field(default_factory=utcnow)


class Lock(SQLModel, table=True):
    """A lease in the database, shared by every process and replica (e.g. `training`)."""

    __tablename__ = "lock"
    name: str = Field(primary_key=True, max_length=64)
    owner: str = Field(max_length=128)
    acquired_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime
