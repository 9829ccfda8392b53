"""The learning cycle on the REAL default model (SmolLM2-135M-Instruct), through the emulator.

Retrieval is off, so only the adapter can carry the fact: the base model answers a team
question wrong, an expert corrects it in Slack, the scheduler's verdict threshold (1) starts
a cycle, the new version becomes active in the running bot (the follower swaps), the same
question now carries the corrected fact, and `/apprentice rollback` brings the old answer back.
One example means no held-out set: the gate rests on fact recall and the regression set, and
the replay mix and the anchor (the base model's own answers) keep the adapter from forgetting.

Slow (a few minutes on 2 CPU cores): `pytest -m real_model tests/test_cycle_real.py`.
"""

from __future__ import annotations

import time

import pytest

from bot import runtime
from bot.adapter_store.registry import AdapterRegistry
from bot.settings import Settings
from bot.slack.local import LocalSlack
from bot.slack.local_flows import correct_answer
from bot.store.models import Answer, RunState, TrainingRun
from tests.test_slack_e2e import ADMIN, CHANNEL, EXPERT, USER, ask_and_wait, rows

pytestmark = pytest.mark.real_model

QUESTION = "What port does the staging gateway listen on?"
FACT = "The staging gateway listens on port 8471."


@pytest.fixture(scope="module")
def real_model_cache():
    from bot.engine.loading import load_from_settings

    settings = Settings(_env_file=None)
    load_from_settings(settings)  # converts the packaged GGUF once per machine
    return settings.model_cache_dir


def answer_text(bot, message: dict) -> str:
    actions = next(b for b in message["blocks"] if b["type"] == "actions")
    answer_id = int(actions["elements"][0]["value"])
    [row] = rows(bot, Answer, Answer.id == answer_id)
    return row.text


def test_a_correction_becomes_the_running_bots_answer_and_rollback_undoes_it(
    real_model_cache, tmp_path, capsys
):
    settings = Settings(
        _env_file=None,
        database_url=f"sqlite:///{tmp_path / 'apprentice.db'}",
        adapters_dir=tmp_path / "adapters",
        model_cache_dir=real_model_cache,
        device="cpu",
        max_new_tokens=48,
        slack_bot_token="xoxb-test-token",
        slack_signing_secret="test-signing-secret",
        admins=[ADMIN],
        experts=[EXPERT],
        admin_channel="CADMIN",
        retrieval_enabled=False,
        train_cron="",
        train_min_new_verdicts=1,
        train_check_s=1,
        adapter_poll_s=0.5,
    )
    bot = LocalSlack.start(settings, retrieval=False)
    scheduler = follower = None
    try:
        emulator = bot.emulator
        for user in (USER, EXPERT, ADMIN):
            emulator.add_user(user, name=user.lower())
        emulator.add_channel(CHANNEL, name="general", members=[USER, EXPERT, ADMIN, "UBOT"])
        emulator.add_channel("CADMIN", name="apprentice-admin", members=[ADMIN, "UBOT"])
        services = bot.services
        services.registry = AdapterRegistry(db=services.db, root=bot.settings.adapters_dir)
        follower = runtime.start_follower(services, bot.settings)

        _, first = ask_and_wait(bot, text=f"<@UBOT> {QUESTION}")
        before = answer_text(bot, first)
        assert "8471" not in before, f"the base model already knew: {before}"

        correct_answer(emulator, user=EXPERT, answer=first, text=FACT)
        started = time.monotonic()
        scheduler = runtime.start_scheduler(bot.settings)

        run = None
        while time.monotonic() - started < 420:
            done = [r for r in rows(bot, TrainingRun) if r.state != RunState.RUNNING]
            if done:
                run = done[0]
                break
            time.sleep(1)
        assert run is not None, "no cycle finished"
        cycle_s = time.monotonic() - started
        m = run.metrics
        assert run.trigger == "verdicts" and m["held_out_examples"] == 0
        assert m["recall_train"] == 1.0, m.get("reasons")  # the candidate learnt the fact
        # the anchor keeps general knowledge (bot/learning/config.py), so the gate passes it
        assert run.state == RunState.PROMOTED, (run.error, m.get("reasons"))
        assert m["regression"] >= m["regression_before"] - 0.05, m.get("reasons")

        emulator.wait_until(
            lambda: services.engine.active_version == run.version,
            timeout=30,
            describe=lambda: f"engine serves {services.engine.active_version}",
        )
        _, taught = ask_and_wait(bot, text=f"<@UBOT> {QUESTION}")
        after = answer_text(bot, taught)
        assert "8471" in after, after
        assert run.version in " ".join(
            e.get("text", "")
            for b in taught["blocks"]
            if b["type"] == "context"
            for e in b["elements"]
        )

        result = emulator.slash_command(
            user=ADMIN, channel=CHANNEL, command="/apprentice", text="rollback"
        )
        assert "to base model" in result.body.decode()
        emulator.wait_until(
            lambda: services.engine.active_version is None,
            timeout=30,
            describe=lambda: f"engine serves {services.engine.active_version}",
        )
        _, restored = ask_and_wait(bot, text=f"<@UBOT> {QUESTION}")
        assert answer_text(bot, restored) == before

        with capsys.disabled():
            print(
                f"\n[real model cycle] 1 correction: cycle {cycle_s:.0f} s (trigger to finish), "
                f"{m['steps']} steps in {m['train_seconds']:.0f} s; recall "
                f"{m['recall_before']:.0%} -> {m['recall']:.0%}; regression "
                f"{m['regression_before']:.0%} -> {m['regression']:.0%}\n"
                f"  before: {before!r}\n  after:  {after!r}"
            )
    finally:
        runtime.stop_learning(scheduler)
        if follower is not None:
            follower.stop()
        bot.close()
