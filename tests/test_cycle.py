"""The learning cycle end to end on the tiny model: Slack verdicts in, a gated version out.

Real parts throughout: Bolt over signed HTTP with the emulator as Slack, the database, the
scheduler, a training child process, the adapter follower swapping the serving engine. The
tiny model learns a short answer only at a high learning rate, so the fast settings below
raise it (and skip the general mix, which the tiny model cannot answer anyway).
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import timedelta

import pytest

from bot import runtime
from bot.adapter_store.registry import AdapterRegistry
from bot.learning.cycle import LockBusy, run_cycle, start_cycle, wait_for_phase
from bot.slack.local_flows import correct_answer
from bot.store import session_scope
from bot.store.locks import INTERRUPTED, hold_lock
from bot.store.models import (
    AdapterActivation,
    AdapterVersion,
    Answer,
    RunState,
    TrainingRun,
    utcnow,
)
from tests.test_slack_e2e import ADMIN, CHANNEL, EXPERT, ask_and_wait, rows, start_slack

ADMIN_CHANNEL = "CADMIN"
QUESTION = "<@UBOT> what is the room code?"
CORRECTION = "The code is 5"
FAST = {
    "max_steps": 60,
    "learning_rate": 1e-2,
    "general_mix": 0,
    "eval_fraction": 0.0,
    "min_steps": 1,
}


@pytest.fixture
def bot(make_settings, sqlite_url):
    settings = make_settings(
        database_url=sqlite_url,
        admin_channel=ADMIN_CHANNEL,
        train_cron="",
        train_min_new_verdicts=1,
        train_check_s=0.5,
        adapter_poll_s=0.2,
        max_new_tokens=16,
        train_overrides=FAST,
        train_threads=1,
    )
    local = start_slack(settings)
    local.emulator.add_channel(ADMIN_CHANNEL, name="apprentice-admin", members=[ADMIN, "UBOT"])
    services = local.services
    services.registry = AdapterRegistry(db=services.db, root=local.settings.adapters_dir)
    runtime.attach_learning(services)
    local.follower = runtime.start_follower(services, local.settings)
    local.scheduler = None
    yield local
    runtime.stop_learning(local.scheduler)
    local.follower.stop()
    local.close()


def correct(bot, text: str = QUESTION, correction: str = CORRECTION) -> None:
    """An expert corrects the bot's answer through the ✏️ modal."""
    _, answer = ask_and_wait(bot, text=text)
    correct_answer(bot.emulator, user=EXPERT, answer=answer, text=correction)


def admin(bot, text: str) -> str:
    result = bot.emulator.slash_command(
        user=ADMIN, channel=CHANNEL, command="/apprentice", text=text
    )
    assert result.status == 200
    return result.body.decode()


def wait_run(bot, predicate, timeout=180.0) -> TrainingRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [run for run in rows(bot, TrainingRun) if predicate(run)]
        if found:
            return found[-1]
        time.sleep(0.2)
    raise TimeoutError(f"no matching training run; runs: {rows(bot, TrainingRun)}")


def wait_serving(bot, version, timeout=30.0) -> None:
    engine = bot.services.engine
    bot.emulator.wait_until(
        lambda: engine.active_version == version,
        timeout=timeout,
        describe=lambda: f"engine serves {engine.active_version}, not {version}",
    )


def context_of(message: dict) -> str:
    return " ".join(
        e.get("text", "")
        for b in message.get("blocks") or []
        if b["type"] == "context"
        for e in b["elements"]
    )


def assert_no_partial_version(settings) -> None:
    root = settings.adapters_dir
    leftovers = [p.name for p in root.iterdir()] if root.exists() else []
    assert not [name for name in leftovers if name.startswith(".tmp-")], leftovers


def test_verdicts_trigger_a_cycle_that_swaps_the_running_bot_and_reports(bot):
    emulator = bot.emulator
    correct(bot)
    bot.scheduler = runtime.start_scheduler(bot.settings)  # threshold: 1 new verdict

    run = wait_run(bot, lambda r: r.state != RunState.RUNNING)
    assert run.state == RunState.PROMOTED, (run.error, run.metrics)
    assert run.trigger == "verdicts" and run.version == "v0001"
    [answer_id] = [answer.id for answer in rows(bot, Answer, Answer.text != "")][:1]
    assert run.example_ids == [f"answer:{answer_id}"]  # lineage: the corrected answer
    assert run.metrics["recall"] > run.metrics["recall_before"]
    assert run.finished_at and run.heartbeat_at and run.error is None

    # every running bot follows the pointer: this one swaps, and its answers say so
    wait_serving(bot, "v0001")
    _, again = ask_and_wait(bot, text="<@UBOT> anything new?")
    assert "v0001" in context_of(again)

    # the report in the admin channel, with the loss curve in its thread
    report = emulator.wait_for_message(
        channel=ADMIN_CHANNEL, predicate=lambda m: "Training run #" in m.get("text", "")
    )
    assert "v0001 promoted" in report["text"]
    shown = json.dumps(report["blocks"])
    assert f"answer:{answer_id}" in shown and "fact recall" in shown and "Why" in shown
    [picture] = emulator.wait_until(
        lambda: [f for f in emulator.files if f["name"] == "loss-v0001.png"],
        timeout=30,
        describe=lambda: f"the loss curve; files: {[f['name'] for f in emulator.files]}",
    )
    assert picture["channel"] == ADMIN_CHANNEL and picture["thread_ts"] == report["ts"]
    assert picture["bytes"].startswith(b"\x89PNG")

    # /apprentice export sends the same data to the admin as a file
    admin(bot, "export")
    emulator.wait_for_ephemeral(user=ADMIN, predicate=lambda e: "Export finished" in e["text"])
    [exported] = [f for f in emulator.files if f["name"].startswith("training-")]
    assert exported["name"].endswith(".jsonl")
    assert CORRECTION in exported["bytes"].decode() and exported["channel"].startswith("D")

    # rollback through Slack: the running bot swaps back to the base model
    assert "from adapter v0001 to base model" in admin(bot, "rollback")
    wait_serving(bot, None)
    _, after = ask_and_wait(bot, text="<@UBOT> and now?")
    assert "base model" in context_of(after)


def test_the_gate_refuses_a_candidate_that_forgets_and_keeps_the_active_version(bot):
    correct(bot)
    first = run_cycle(settings=bot.settings, db=bot.services.db, trigger="cli")
    assert first.promoted, first.reasons
    wait_serving(bot, first.version)

    # the same data, a learning rate far too high: the candidate forgets what v0001 knew
    reckless = bot.settings.model_copy(
        update={"train_overrides": {**FAST, "learning_rate": 3.0, "max_steps": 30}}
    )
    second = run_cycle(settings=reckless, db=bot.services.db, trigger="cli")
    assert second.state == RunState.REFUSED and second.version == "v0002"
    assert any(f"did not improve over {first.version}" in r for r in second.reasons), second.reasons
    assert bot.services.registry.active_version() == first.version
    [row] = rows(bot, TrainingRun, TrainingRun.id == second.run_id)
    assert row.state == RunState.REFUSED and any(
        "did not improve" in r for r in row.metrics["reasons"]
    )
    time.sleep(3 * bot.settings.adapter_poll_s)
    assert bot.services.engine.active_version == first.version  # nothing swapped
    report = bot.emulator.wait_for_message(
        channel=ADMIN_CHANNEL, predicate=lambda m: "refused by the gate" in m.get("text", "")
    )
    assert "did not improve" in json.dumps(report["blocks"])


def test_a_second_cycle_is_refused_and_a_killed_child_fails_its_run(bot):
    correct(bot)
    slow = bot.settings.model_copy(
        update={"train_overrides": {**FAST, "max_steps": 100_000, "learning_rate": 1e-4}}
    )
    bot.services.run_training = runtime.training_hook(slow, bot.services.db)
    reply = admin(bot, "train")
    assert "Started training run #1" in reply and f"<#{ADMIN_CHANNEL}>" in reply

    # one cycle at a time: Slack says so, and so does a direct start (another "replica")
    assert "already running" in admin(bot, "train")
    with pytest.raises(LockBusy):
        start_cycle(settings=slow, trigger="cli")

    wait_for_phase(db=bot.services.db, run_id=1, phase="training", timeout=120)
    [run] = rows(bot, TrainingRun)
    child = int(run.owner.rsplit(":", 1)[1])
    assert child != os.getpid()
    # answering comes first: the training process runs at the lowest priority (train_nice)
    assert os.getpriority(os.PRIO_PROCESS, child) == min(
        19, os.getpriority(os.PRIO_PROCESS, 0) + bot.settings.train_nice
    )
    os.kill(child, signal.SIGKILL)

    failed = wait_run(bot, lambda r: r.state == RunState.FAILED, timeout=60)
    assert "SIGKILL" in failed.error and failed.finished_at is not None
    assert rows(bot, AdapterVersion) == [] and rows(bot, AdapterActivation) == []
    assert bot.services.registry.active_version() is None
    assert_no_partial_version(bot.settings)
    bot.emulator.wait_for_ephemeral(user=ADMIN, predicate=lambda e: "failed" in e["text"])
    # the lease went with the run: the next cycle may start
    admin_reply = admin(bot, "train")
    assert "Started training run #2" in admin_reply
    wait_for_phase(db=bot.services.db, run_id=2, phase="training", timeout=120)
    runtime.stop_learning(None)  # the bot shutting down stops its cycle
    [second] = rows(bot, TrainingRun, TrainingRun.id == 2)
    assert second.state == RunState.FAILED and "shut down" in second.error
    assert rows(bot, AdapterVersion) == []


def test_a_run_left_running_by_a_dead_process_is_marked_failed(bot, make_settings):
    db = bot.services.db
    long_ago = utcnow() - timedelta(hours=1)
    with session_scope(db) as session:
        for owner in ("host:1", "host:2"):
            session.add(
                TrainingRun(
                    trigger="schedule",
                    state=RunState.RUNNING,
                    owner=owner,
                    started_at=long_ago,
                    heartbeat_at=long_ago,
                )
            )
        alive = TrainingRun(trigger="cli", state=RunState.RUNNING, heartbeat_at=utcnow())
        session.add(alive)
    # bot start-up marks the stale ones failed, and leaves a run with a fresh heartbeat alone
    runtime.recover_interrupted_runs(bot.settings, db)
    states = {run.owner: run.state for run in rows(bot, TrainingRun)}
    assert states == {"host:1": "failed", "host:2": "failed", None: "running"}
    assert all(
        r.error == INTERRUPTED for r in rows(bot, TrainingRun, TrainingRun.owner == "host:1")
    )

    # a cycle start does it too (it holds the lease, so any "running" run with an old
    # heartbeat is dead); with nothing to learn it records a skipped run
    with session_scope(db) as session:
        run = session.get(TrainingRun, 3)
        run.heartbeat_at = long_ago
        session.add(run)
    outcome = run_cycle(settings=bot.settings, db=db, trigger="schedule")
    assert outcome.state == RunState.SKIPPED and "no approved or corrected" in outcome.error
    assert rows(bot, TrainingRun, TrainingRun.id == 3)[0].state == RunState.FAILED
    assert bot.services.registry.active_version() is None


def test_a_lease_held_by_another_replica_refuses_the_cycle(bot):
    with hold_lock(engine=bot.services.db, name="training", owner="replica-b:7", ttl_s=60):
        with pytest.raises(LockBusy, match="replica-b:7"):
            run_cycle(settings=bot.settings, db=bot.services.db, trigger="schedule")
        assert "already running" in admin(bot, "train")
    assert rows(bot, TrainingRun) == []  # a refused start records nothing
    assert rows(bot, AdapterVersion) == [] and rows(bot, AdapterActivation) == []
