"""`/apprentice` over signed HTTP: admins change things (rows checked), everyone else is refused."""

from __future__ import annotations

import threading

import pytest
from sqlmodel import col, select

from bot.scheduler import PauseState, pause_state, training_paused
from bot.store import session_scope
from bot.store.models import AdapterActivation, AdapterVersion, AppState, ChannelSetting, Member
from tests.test_slack_e2e import (
    ADMIN,
    CHANNEL,
    EXPERT,
    OTHER,
    USER,
    ask_and_wait,
    rows,
    start_slack,
    wait_answer,
)


@pytest.fixture
def slack(make_settings, database_url):
    bot = start_slack(make_settings(database_url=database_url))
    yield bot
    bot.close()


def admin(bot, text: str, user: str = ADMIN) -> str:
    result = bot.emulator.slash_command(
        user=user, channel=CHANNEL, command="/apprentice", text=text
    )
    assert result.status == 200
    return result.body.decode()


def test_non_admin_is_refused_and_nothing_changes(slack):
    for text in ("experts add <@UBOB|bob>", "channel auto on", "pause", "rollback", "status"):
        body = admin(slack, text, user=EXPERT)
        assert "Only Apprentice admins" in body
    assert rows(slack, Member) == [] and rows(slack, ChannelSetting) == []
    assert rows(slack, AppState) == []
    shown = slack.emulator.ephemerals(user=EXPERT)
    assert len(shown) == 5 and all("Only Apprentice admins" in e["text"] for e in shown)


def test_experts_are_added_listed_and_removed_and_can_then_review(slack):
    emulator = slack.emulator
    assert "are now experts" in admin(slack, "experts add <@UBOB|bob>")
    [member] = rows(slack, Member)
    assert (member.user_id, member.role, member.added_by) == (OTHER, "expert", ADMIN)
    assert "already was an expert" in admin(slack, "experts add <@UBOB>")
    listing = admin(slack, "experts list")
    assert f"<@{OTHER}>" in listing and f"<@{EXPERT}>" in listing

    _, answer = ask_and_wait(slack)
    emulator.click_button(user=OTHER, channel=CHANNEL, message_ts=answer["ts"], label="✅ Approve")
    emulator.wait_for_ephemeral(user=OTHER, predicate=lambda e: "Approved" in e["text"])

    assert "no longer experts" in admin(slack, "experts remove <@UBOB|bob>")
    assert rows(slack, Member) == []
    assert "by configuration" in admin(slack, "experts remove <@UEXPERT>")
    assert "@mentions" in admin(slack, "experts add bob")


def test_channel_auto_answer_on_and_off(slack):
    emulator = slack.emulator
    assert "answer every new question" in admin(slack, "channel auto on")
    [setting] = rows(slack, ChannelSetting)
    assert setting.auto_answer and setting.updated_by == ADMIN
    ts = emulator.post_message(user=USER, channel=CHANNEL, text="where are the docs?")
    wait_answer(emulator, CHANNEL, ts)
    admin(slack, "channel auto off")
    assert rows(slack, ChannelSetting)[0].auto_answer is False


def test_pause_resume_status_and_unavailable_hooks(slack):
    admin(slack, "pause")
    assert pause_state(db=slack.services.db) == PauseState(
        paused=True, actor=ADMIN, since=pause_state(db=slack.services.db).since
    )
    assert "paused" in admin(slack, "status")
    admin(slack, "resume")
    assert not training_paused(db=slack.services.db)
    status = admin(slack, "status")
    assert "base model" in status and "Scheduled training:* on" in status
    assert "not available yet" in admin(slack, "train")
    assert "not available yet" in admin(slack, "export")
    assert "/apprentice status" in admin(slack, "help")
    assert "don't know `frobnicate`" in admin(slack, "frobnicate")


class TableRegistry:
    """Stand-in for bot.adapter_store.registry.AdapterRegistry: the same interface over the same
    tables, without the adapter folders (the registry's own tests cover those)."""

    def __init__(self, *, db, root=None):
        self.db = db

    def list_versions(self):
        with session_scope(self.db) as session:
            return list(session.exec(select(AdapterVersion).order_by(AdapterVersion.name)).all())

    def active_version(self):
        with session_scope(self.db) as session:
            newest = session.exec(
                select(AdapterActivation).order_by(col(AdapterActivation.id).desc())
            ).first()
            return newest.version if newest else None

    def promote(self, name, *, actor):
        with session_scope(self.db) as session:
            session.add(AdapterActivation(version=name, action="promote", actor=actor))

    def rollback(self, *, actor):
        with session_scope(self.db) as session:
            history = session.exec(
                select(AdapterActivation).order_by(col(AdapterActivation.id).desc())
            ).all()
            if not history:
                raise ValueError("nothing to roll back: the base model is active")
            previous = history[1].version if len(history) > 1 else None
            session.add(AdapterActivation(version=previous, action="rollback", actor=actor))
            return previous


@pytest.fixture
def slack_with_hooks(make_settings, sqlite_url):
    trained = []
    done = threading.Event()

    def run_training(trigger, actor):
        trained.append((trigger, actor))
        done.set()
        return "v0003 promoted"

    settings = make_settings(database_url=sqlite_url)
    bot = start_slack(settings, run_training=run_training, export_dataset=lambda: "12 examples")
    bot.services.registry = TableRegistry(db=bot.services.db)
    yield bot, trained
    bot.close()


def test_train_export_adapters_and_rollback(slack_with_hooks):
    bot, trained = slack_with_hooks
    emulator = bot.emulator
    assert "Training started" in admin(bot, "train")
    emulator.wait_for_ephemeral(user=ADMIN, predicate=lambda e: "v0003 promoted" in e["text"])
    assert trained == [("slack", ADMIN)]
    admin(bot, "export")
    emulator.wait_for_ephemeral(user=ADMIN, predicate=lambda e: "12 examples" in e["text"])

    assert "No adapter versions" in admin(bot, "adapters")
    with session_scope(bot.services.db) as session:
        for name in ("v0001", "v0002"):
            session.add(AdapterVersion(name=name, base_model="tiny"))
    bot.services.registry.promote("v0001", actor="test")
    bot.services.registry.promote("v0002", actor="test")
    listing = admin(bot, "adapters")
    assert "▶ v0002" in listing and "adapter v0002" in listing
    assert "from adapter v0002 to adapter v0001" in admin(bot, "rollback")
    [last] = rows(bot, AdapterActivation, AdapterActivation.action == "rollback")
    assert last.actor == f"slack:{ADMIN}" and last.version == "v0001"


def test_usergroup_members_are_experts(make_settings, sqlite_url):
    bot = start_slack(make_settings(database_url=sqlite_url, expert_usergroup="S0EXPERTS"))
    try:
        bot.emulator.add_usergroup("S0EXPERTS", handle="experts", users=[OTHER])
        _, answer = ask_and_wait(bot)
        bot.emulator.click_button(
            user=OTHER, channel=CHANNEL, message_ts=answer["ts"], label="✏️ Correct"
        )
        assert bot.emulator.wait_for_view(user=OTHER)["callback_id"] == "answer_correct_view"
        assert bot.emulator.calls_to("usergroups.users.list")
    finally:
        bot.close()
