"""The Slack app end to end: real Bolt over signed HTTP, the emulator as Slack, a real engine on
the tiny model, and the database (SQLite and PostgreSQL) checked row by row."""

from __future__ import annotations

import json
import time

import pytest
from sqlmodel import select

from bot.engine.types import EngineError
from bot.slack import blocks
from bot.slack.local import LocalSlack
from bot.slack.local_flows import correct_answer
from bot.store import session_scope
from bot.store.models import Answer, Question, SlackEvent, Verdict
from tests.support.tiny_model import tiny_engine

USER, EXPERT, ADMIN, OTHER = "UALICE", "UEXPERT", "UADMIN", "UBOB"
CHANNEL = "CGENERAL"


def start_slack(settings, **hooks) -> LocalSlack:
    bot = LocalSlack.start(settings, engine=tiny_engine(settings), **hooks)
    emulator = bot.emulator
    for user in (USER, EXPERT, ADMIN, OTHER):
        emulator.add_user(user, name=user.lower())
    emulator.add_channel(CHANNEL, name="general", members=[USER, EXPERT, ADMIN, OTHER, "UBOT"])
    return bot


@pytest.fixture
def slack(make_settings, database_url):
    bot = start_slack(make_settings(database_url=database_url))
    yield bot
    bot.close()


def has_buttons(message: dict) -> bool:
    return any(b.get("type") == "actions" for b in message.get("blocks") or [])


def wait_answer(emulator, channel, thread_ts, *, predicate=has_buttons, timeout=30.0) -> dict:
    return emulator.wait_for_message(
        channel=channel, thread_ts=thread_ts, user="UBOT", predicate=predicate, timeout=timeout
    )


def rows(bot, model, *where):
    with session_scope(bot.services.db) as session:
        return list(session.exec(select(model).where(*where)).all())


def answer_id_of(message: dict) -> int:
    actions = next(b for b in message["blocks"] if b["type"] == "actions")
    return int(actions["elements"][0]["value"])


def ask_and_wait(bot, text="<@UBOT> how do we deploy?", user=USER, channel=CHANNEL):
    ts = bot.emulator.post_message(user=user, channel=channel, text=text)
    return ts, wait_answer(bot.emulator, channel, ts)


def test_mention_gets_thinking_then_answer_with_buttons(slack):
    emulator = slack.emulator
    ts, answer = ask_and_wait(slack)
    # the reply was posted as "thinking…" and then replaced in place by the answer
    posted = emulator.calls_to("chat.postMessage")
    assert posted[0]["text"] == blocks.THINKING_TEXT and posted[0]["thread_ts"] == ts
    assert answer["ts"] == emulator.calls_to("chat.update")[-1]["ts"]
    labels = [
        e["text"]["text"] for b in answer["blocks"] if b["type"] == "actions" for e in b["elements"]
    ]
    assert labels == ["✅ Approve", "✏️ Correct", "✗ Reject", "👍", "👎", "🙋 Ask an expert"]
    context = " ".join(
        e["text"] for b in answer["blocks"] if b["type"] == "context" for e in b["elements"]
    )
    assert "base model" in context and " s" in context
    [question] = rows(slack, Question)
    assert (question.source, question.text, question.thread_ts) == (
        "mention",
        "how do we deploy?",
        ts,
    )
    [stored] = rows(slack, Answer)
    assert stored.state == "done" and stored.text and stored.message_ts == answer["ts"]
    assert answer_id_of(answer) == stored.id
    # the channel's message event for the same mention did not produce a second answer
    assert len(emulator.messages(CHANNEL, ts)) == 2


def test_dm_and_slash_ask_and_thread_follow_up_with_history(slack):
    emulator = slack.emulator
    dm = emulator.open_dm(USER)
    ts = emulator.post_message(user=USER, channel=dm, text="what is the on-call rotation?")
    wait_answer(emulator, dm, ts)

    result = emulator.slash_command(user=USER, channel=CHANNEL, command="/ask", text="who deploys?")
    assert result.status == 200
    echo = emulator.wait_for_message(
        channel=CHANNEL, user="UBOT", predicate=lambda m: "who deploys?" in m.get("text", "")
    )
    first = wait_answer(emulator, CHANNEL, echo["ts"])

    # a reply in the bot's thread is a follow-up (no mention needed); history goes along
    seen = []
    real_submit = slack.services.engine.submit

    def spy(request, **kwargs):
        seen.append(request)
        return real_submit(request, **kwargs)

    slack.services.engine.submit = spy
    emulator.post_message(user=USER, channel=CHANNEL, text="and on Fridays?", thread_ts=echo["ts"])
    wait_answer(
        emulator, CHANNEL, echo["ts"], predicate=lambda m: has_buttons(m) and m["ts"] != first["ts"]
    )
    assert [(t.role, t.text) for t in seen[0].history][0] == ("user", "who deploys?")
    assert seen[0].history[1].role == "assistant" and seen[0].question == "and on Fridays?"
    sources = sorted(q.source for q in rows(slack, Question))
    assert sources == ["command", "dm", "thread"]
    # a plain channel message outside the bot's threads is not a question
    emulator.post_message(user=USER, channel=CHANNEL, text="lunch anyone?")
    emulator.wait_until(
        lambda: skipped(slack, "not_a_question") == 1, timeout=10, describe=lambda: "skipped"
    )
    assert len(rows(slack, Question)) == 3


def test_expert_approve_correct_reject_and_withdraw(slack):
    emulator = slack.emulator
    ts, answer = ask_and_wait(slack)
    answer_id = answer_id_of(answer)

    emulator.click_button(user=EXPERT, channel=CHANNEL, message_ts=answer["ts"], label="✅ Approve")
    note = emulator.wait_for_ephemeral(user=EXPERT, predicate=lambda e: "Approved" in e["text"])
    assert note["channel"] == CHANNEL
    [verdict] = rows(slack, Verdict, Verdict.withdrawn_at.is_(None))
    assert (verdict.kind, verdict.author_id, verdict.answer_id) == ("approve", EXPERT, answer_id)
    shown = emulator.messages(CHANNEL, ts)[-1]
    assert f"approved by <@{EXPERT}>" in json.dumps(shown["blocks"])

    # clicking your current verdict again withdraws it, and says so
    emulator.click_button(user=EXPERT, channel=CHANNEL, message_ts=answer["ts"], label="✅ Approve")
    emulator.wait_for_ephemeral(user=EXPERT, predicate=lambda e: "withdrew" in e["text"])
    assert rows(slack, Verdict, Verdict.withdrawn_at.is_(None)) == []

    # ✏️ opens a modal prefilled with the answer; the submitted correction replaces the text
    emulator.click_button(user=ADMIN, channel=CHANNEL, message_ts=answer["ts"], label="✏️ Correct")
    modal = emulator.wait_for_view(user=ADMIN)
    initial = modal["blocks"][0]["element"]["initial_value"]
    assert initial and initial == rows(slack, Answer)[0].text
    result = emulator.submit_view(
        user=ADMIN,
        view_id=modal["id"],
        values={
            blocks.CORRECTION_BLOCK: {blocks.CORRECTION_INPUT: "Deploys run on Tuesdays at noon."}
        },
    )
    assert result.status == 200
    [correction] = rows(slack, Verdict, Verdict.kind == "correct")
    assert (correction.author_id, correction.text) == (ADMIN, "Deploys run on Tuesdays at noon.")
    updated = emulator.wait_for_message(
        channel=CHANNEL,
        thread_ts=ts,
        predicate=lambda m: "corrected by" in json.dumps(m.get("blocks")),
    )
    assert "Deploys run on Tuesdays at noon." in json.dumps(updated["blocks"])
    assert f"corrected by <@{ADMIN}>" in json.dumps(updated["blocks"])

    # ✗ asks for a reason; clicking ✗ again withdraws the rejection
    emulator.click_button(user=EXPERT, channel=CHANNEL, message_ts=answer["ts"], label="✗ Reject")
    modal = emulator.wait_for_view(user=EXPERT)
    assert modal["callback_id"] == blocks.REJECT_VIEW
    emulator.submit_view(
        user=EXPERT,
        view_id=modal["id"],
        values={blocks.REASON_BLOCK: {blocks.REASON_INPUT: "We stopped Tuesday deploys."}},
    )
    [rejection] = rows(slack, Verdict, Verdict.kind == "reject", Verdict.withdrawn_at.is_(None))
    assert rejection.text == "We stopped Tuesday deploys." and rejection.author_id == EXPERT
    emulator.click_button(user=EXPERT, channel=CHANNEL, message_ts=answer["ts"], label="✗ Reject")
    emulator.wait_for_ephemeral(
        user=EXPERT, predicate=lambda e: "withdrew your rejection" in e["text"]
    )
    assert rows(slack, Verdict, Verdict.kind == "reject", Verdict.withdrawn_at.is_(None)) == []

    # anyone may give 👍; 🙋 tags the experts in the thread
    emulator.click_button(user=OTHER, channel=CHANNEL, message_ts=answer["ts"], label="👍")
    emulator.wait_for_ephemeral(user=OTHER, predicate=lambda e: "Thanks" in e["text"])
    assert [v.kind for v in rows(slack, Verdict, Verdict.author_id == OTHER)] == ["up"]
    emulator.click_button(
        user=OTHER, channel=CHANNEL, message_ts=answer["ts"], label="🙋 Ask an expert"
    )
    tagged = emulator.wait_for_message(
        channel=CHANNEL, thread_ts=ts, predicate=lambda m: f"<@{EXPERT}>" in m.get("text", "")
    )
    assert f"<@{ADMIN}>" in tagged["text"]


def test_the_shared_correction_flow_saves_or_says_why_not(slack):
    """`correct_answer`, which other tests and the benchmarks use to correct answers."""
    _, answer = ask_and_wait(slack)
    with pytest.raises(RuntimeError, match="Only experts"):
        correct_answer(slack.emulator, user=OTHER, answer=answer, text="Tuesdays.")
    assert rows(slack, Verdict) == []
    shown = correct_answer(slack.emulator, user=EXPERT, answer=answer, text="Tuesdays at noon.")
    assert shown["ts"] == answer["ts"] and "Tuesdays at noon." in json.dumps(shown["blocks"])
    [correction] = rows(slack, Verdict, Verdict.kind == "correct")
    assert (correction.author_id, correction.text) == (EXPERT, "Tuesdays at noon.")
    assert slack.emulator.views == {}  # the modal closed


def test_non_expert_clicks_are_refused_and_nothing_is_stored(slack):
    emulator = slack.emulator
    ts, answer = ask_and_wait(slack)
    for label in ("✅ Approve", "✏️ Correct", "✗ Reject"):
        emulator.click_button(user=OTHER, channel=CHANNEL, message_ts=answer["ts"], label=label)
    emulator.wait_until(
        lambda: len(emulator.ephemerals(user=OTHER)) == 3, timeout=10, describe=lambda: "3 notes"
    )
    assert all("Only experts" in e["text"] for e in emulator.ephemerals(user=OTHER))
    assert rows(slack, Verdict) == [] and emulator.views == {}
    # a forged submission of the correction modal is refused too
    assert emulator.calls_to("views.open") == []


@pytest.mark.parametrize("attack", ["forged", "stale"])
def test_bad_signature_or_stale_timestamp_is_refused_and_stores_nothing(slack, attack):
    emulator = slack.emulator
    event = {
        "type": "app_mention",
        "user": USER,
        "text": "<@UBOT> leak?",
        "ts": "1700000099.000100",
        "channel": CHANNEL,
        "event_ts": "1700000099.000100",
    }
    options = {"forge_signature": True} if attack == "forged" else {"timestamp_offset": -600}
    result = emulator.deliver_event(event, event_id="Ev0BAD", retry=False, **options)
    assert result.status == 401
    assert rows(slack, SlackEvent) == [] and rows(slack, Question) == []
    assert emulator.calls_to("chat.postMessage") == []


def skipped(bot, reason: str) -> float:
    return bot.services.metrics.skipped.labels(reason=reason)._value.get()


def test_retried_event_produces_exactly_one_answer(slack):
    emulator = slack.emulator
    ts, answer = ask_and_wait(slack, text="<@UBOT> retried?")
    envelopes = [d.payload for d in emulator.deliveries if d.kind == "event"]
    assert [e["event"]["type"] for e in envelopes] == ["app_mention", "message"]
    for envelope in envelopes:  # Slack thought we missed them and retries both
        retried = emulator.deliver_event(envelope, retry_num=1, retry=False)
        assert retried.status == 200  # acknowledged, so Slack stops retrying
    emulator.wait_until(
        lambda: skipped(slack, "duplicate") >= 1, timeout=10, describe=lambda: "a duplicate"
    )
    slack.services.dispatcher.wait_idle(20)
    assert len(rows(slack, Question)) == 1 and len(rows(slack, Answer)) == 1
    assert len(emulator.calls_to("chat.postMessage")) == 1
    assert envelopes[0]["event_id"] in {e.event_id for e in rows(slack, SlackEvent)}


def test_a_40000_character_question_is_answered_with_a_note(slack):
    question = "why " * 10_000
    ts, answer = ask_and_wait(slack, text="<@UBOT> " + question.strip())
    assert "too long" in json.dumps(answer["blocks"])
    [stored] = rows(slack, Answer)
    assert stored.truncated is True
    assert len(rows(slack, Question)[0].text) == len(question.strip())


def test_engine_error_replaces_thinking_and_is_stored(make_settings, sqlite_url):
    class FailingEngine:
        active_version = None

        def submit(self, request, on_partial=None):
            from concurrent.futures import Future

            future = Future()
            future.set_exception(EngineError("the model is not loaded"))
            return future

    bot = LocalSlack.start(make_settings(database_url=sqlite_url), engine=FailingEngine())
    try:
        bot.emulator.add_user(USER, name="alice")
        bot.emulator.add_channel(CHANNEL, name="general", members=[USER, "UBOT"])
        ts = bot.emulator.post_message(user=USER, channel=CHANNEL, text="<@UBOT> hello?")
        shown = wait_answer(
            bot.emulator, CHANNEL, ts, predicate=lambda m: "not loaded" in m.get("text", "")
        )
        assert blocks.THINKING_TEXT not in shown["text"]
        [answer] = rows(bot, Answer)
        assert answer.state == "failed" and "not loaded" in answer.error
    finally:
        bot.close()


def test_app_home_is_published_with_the_numbers(slack):
    emulator = slack.emulator
    ts, answer = ask_and_wait(slack)
    emulator.deliver_event(
        {"type": "app_home_opened", "user": EXPERT, "channel": "D0HOME", "tab": "home"},
        retry=False,
    )
    home = emulator.wait_until(
        lambda: emulator.home_views.get(EXPERT), timeout=10, describe=lambda: "home view"
    )
    text = json.dumps(home["blocks"])
    assert "*Questions this week*\\n1" in text and "*Pending reviews*\\n1" in text
    assert "base model" in text and "how do we deploy?" in text


def test_thinking_is_streamed_at_most_once_a_second(make_settings, sqlite_url):
    """A slow engine that streams many partials: the message is updated, but throttled."""
    from concurrent.futures import Future

    from bot.engine.types import AnswerResult, Timings

    class SlowEngine:
        active_version = None

        def submit(self, request, on_partial=None):
            future = Future()

            def run():
                text = ""
                for word in range(25):
                    text += f"word{word} "
                    on_partial(text)
                    time.sleep(0.1)
                future.set_result(
                    AnswerResult(
                        text=text, adapter_version=None, timings=Timings(0, 0, 2.5, 2.5, 25)
                    )
                )

            import threading

            threading.Thread(target=run, daemon=True).start()
            return future

    bot = LocalSlack.start(make_settings(database_url=sqlite_url), engine=SlowEngine())
    try:
        bot.emulator.add_user(USER, name="alice")
        bot.emulator.add_channel(CHANNEL, name="general", members=[USER, "UBOT"])
        ts = bot.emulator.post_message(user=USER, channel=CHANNEL, text="<@UBOT> stream?")
        final = wait_answer(bot.emulator, CHANNEL, ts)
        assert "word24" in final["text"]
        updates = bot.emulator.calls_to("chat.update")
        partial = [u for u in updates if "still" in json.dumps(u.get("blocks"))]
        assert 1 <= len(partial) <= 4  # 2.5 s of streaming, at most one update a second
    finally:
        bot.close()


def test_channel_kind_comes_from_slack_not_guessed(slack):
    """app_mention and /ask carry no channel type: a private channel must be stored as private."""
    emulator = slack.emulator
    emulator.add_channel("CSECRET", name="secret", is_private=True, members=[USER, "UBOT"])
    ask_and_wait(slack, channel="CSECRET")
    emulator.slash_command(user=USER, channel="CSECRET", command="/ask", text="who deploys?")
    ask_and_wait(slack)  # public #general
    kinds = sorted((q.channel_id, q.source, q.channel_type) for q in rows(slack, Question))
    assert kinds == [
        ("CGENERAL", "mention", "channel"),
        ("CSECRET", "command", "group"),
        ("CSECRET", "mention", "group"),
    ]
