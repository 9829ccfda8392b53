"""Approved answers help at once: retrieval with citations, end to end.

Real Bolt over signed HTTP with the emulator as Slack, the real MiniLM embedder, the tiny model
as the engine (its submit wrapped to record each request), SQLite and PostgreSQL. Experts judge
answers by clicking the buttons and submitting the modal exactly as a person would.
"""

from __future__ import annotations

import json

import pytest
from slack_sdk import WebClient

from bot.engine.types import Note
from bot.knowledge import KnowledgeBase, load_embedder
from bot.slack import blocks, manifest_spec
from bot.slack.local_flows import correct_answer
from bot.store import make_engine
from bot.store.models import Answer, Verdict
from tests.test_slack_e2e import (
    CHANNEL,
    EXPERT,
    USER,
    answer_id_of,
    ask_and_wait,
    has_buttons,
    rows,
    start_slack,
)

SECRET = "CSECRET"
BILLING = "what port does the billing service listen on?"
BILLING_REWORDED = "on which port does billing listen?"  # similar (~0.94), not the same question
BILLING_FACT = "The billing service listens on port 7431 since the October migration."
DOOR = "what is the door code for the server room?"
DOOR_REWORDED = "which code opens the server room door?"
DOOR_FACT = "The server room door code is 4417; it changes every quarter."


@pytest.fixture
def slack(make_settings, database_url):
    bot = start_slack(make_settings(database_url=database_url), retrieval=True)
    bot.emulator.add_channel(SECRET, name="secret", is_private=True, members=[USER, EXPERT, "UBOT"])
    yield bot
    bot.close()


def record_requests(bot) -> list:
    """Every AnswerRequest the engine receives, in order (the engine itself still answers)."""
    seen = []
    submit = bot.services.engine.submit

    def recording(request, **kwargs):
        seen.append(request)
        return submit(request, **kwargs)

    bot.services.engine.submit = recording
    return seen


def context_lines(message: dict) -> list[str]:
    return [
        element["text"]
        for block in message.get("blocks") or []
        if block["type"] == "context"
        for element in block["elements"]
    ]


def citations(message: dict) -> list[str]:
    return [line for line in context_lines(message) if line.startswith("📚")]


def permalink(bot, channel: str, ts: str) -> str:
    client = WebClient(token=bot.settings.slack_bot_token, base_url=bot.settings.slack_api_base)
    return client.chat_getPermalink(channel=channel, message_ts=ts)["permalink"]


def verdict_day(bot, answer_id: int, kind: str) -> str:
    [verdict] = rows(
        bot,
        Verdict,
        Verdict.answer_id == answer_id,
        Verdict.kind == kind,
        Verdict.withdrawn_at.is_(None),
    )
    return f"{verdict.created_at:%Y-%m-%d}"


def stored(bot, message: dict) -> Answer:
    [answer] = rows(bot, Answer, Answer.id == answer_id_of(message))
    return answer


def click_approve(bot, answer: dict, *, expect: str, channel: str = CHANNEL) -> None:
    before = len(bot.emulator.ephemerals(user=EXPERT))
    bot.emulator.click_button(
        user=EXPERT, channel=channel, message_ts=answer["ts"], label="✅ Approve"
    )
    bot.emulator.wait_until(
        lambda: any(expect in e["text"] for e in bot.emulator.ephemerals(user=EXPERT)[before:]),
        timeout=10,
        describe=lambda: f"an ephemeral saying {expect!r}",
    )


def test_a_correction_is_cited_for_a_reworded_question_and_reaches_the_prompt(slack):
    seen = record_requests(slack)
    _, first = ask_and_wait(slack, text=f"<@UBOT> {BILLING}")
    assert seen[0].notes == () and citations(first) == []
    correct_answer(slack.emulator, user=EXPERT, answer=first, text=BILLING_FACT)

    _, second = ask_and_wait(slack, text=f"<@UBOT> {BILLING_REWORDED}")
    day = verdict_day(slack, answer_id_of(first), "correct")
    assert seen[1].question == BILLING_REWORDED
    assert seen[1].notes == (
        Note(question=BILLING, answer=BILLING_FACT, source=f"corrected by <@{EXPERT}> on {day}"),
    )
    link = permalink(slack, CHANNEL, first["ts"])
    assert citations(second) == [
        f"📚 from an answer corrected by <@{EXPERT}> on {day} (<{link}|thread>)"
    ]
    assert "base model" in context_lines(second)[0]  # the model answered, with the note
    [source] = stored(slack, second).sources
    assert source["entry"] == f"answer:{answer_id_of(first)}" and source["exact"] is False
    assert source["score"] >= slack.services.knowledge.threshold

    # below the threshold nothing is injected and nothing cited
    _, unrelated = ask_and_wait(slack, text="<@UBOT> who cleans the office fridge?")
    assert seen[2].notes == () and citations(unrelated) == []
    assert stored(slack, unrelated).sources is None

    # the citation is part of the answer: a verdict re-renders the message and keeps it
    click_approve(slack, second, expect="Approved")
    shown = slack.emulator.messages(CHANNEL, second["thread_ts"])[-1]
    assert f"approved by <@{EXPERT}>" in json.dumps(shown["blocks"])
    assert citations(shown) == citations(second)
    # chat.getPermalink was called, and the manifest's scopes know it
    methods = {method for method, _ in slack.emulator.calls}
    assert "chat.getPermalink" in methods and manifest_spec.required_scopes(methods)


def test_retrieval_switched_off_on_the_services_takes_effect_at_once(slack):
    seen = record_requests(slack)
    _, first = ask_and_wait(slack, text=f"<@UBOT> {BILLING}")
    correct_answer(slack.emulator, user=EXPERT, answer=first, text=BILLING_FACT)
    knowledge, slack.services.knowledge = slack.services.knowledge, None
    _, second = ask_and_wait(slack, text=f"<@UBOT> {BILLING_REWORDED}")
    assert seen[1].notes == () and citations(second) == []
    slack.services.knowledge = knowledge  # and back on, without a restart
    _, third = ask_and_wait(slack, text=f"<@UBOT> {BILLING_REWORDED}")
    assert [note.answer for note in seen[2].notes] == [BILLING_FACT] and citations(third)


def test_private_channel_knowledge_stays_in_its_channel(slack):
    seen = record_requests(slack)
    _, first = ask_and_wait(slack, channel=SECRET, text=f"<@UBOT> {DOOR}")
    correct_answer(slack.emulator, user=EXPERT, answer=first, text=DOOR_FACT)

    # elsewhere: not for a rewording, not even for the very same question, and not in a DM
    dm = slack.emulator.open_dm(USER)
    for channel, question in ((CHANNEL, DOOR_REWORDED), (CHANNEL, DOOR), (dm, DOOR_REWORDED)):
        _, answer = ask_and_wait(slack, channel=channel, text=f"<@UBOT> {question}")
        assert seen[-1].question == question and seen[-1].notes == ()
        assert citations(answer) == [] and "4417" not in json.dumps(answer["blocks"])
        assert stored(slack, answer).sources is None
    assert len(seen) == 4  # every one of them went to the model

    # in its own channel the rewording gets the note and the citation
    _, own = ask_and_wait(slack, channel=SECRET, text=f"<@UBOT> {DOOR_REWORDED}")
    assert [note.answer for note in seen[-1].notes] == [DOOR_FACT]
    [line] = citations(own)
    assert line.startswith(f"📚 from an answer corrected by <@{EXPERT}>")
    assert permalink(slack, SECRET, first["ts"]) in line


def test_a_withdrawn_approval_stops_being_cited(slack):
    seen = record_requests(slack)
    question = "who signs off on the quarterly vendor audit?"
    reworded = "who approves the vendor audit each quarter?"
    _, first = ask_and_wait(slack, text=f"<@UBOT> {question}")
    click_approve(slack, first, expect="Approved")

    _, cited_answer = ask_and_wait(slack, text=f"<@UBOT> {reworded}")
    [note] = seen[-1].notes
    assert note.answer == stored(slack, first).text  # an approval vouches for the bot's text
    [line] = citations(cited_answer)
    assert f"approved by <@{EXPERT}>" in line

    # clicking ✅ again withdraws the approval; the next asker gets no note and no citation
    click_approve(slack, first, expect="withdrew")
    _, after = ask_and_wait(slack, text=f"<@UBOT> {reworded}")
    assert seen[-1].notes == () and citations(after) == []
    # the earlier answer still shows what it used when it was written
    assert citations(slack.emulator.messages(CHANNEL, cited_answer["thread_ts"])[-1]) == [line]


def test_an_exact_repeat_is_answered_with_the_approved_text_without_the_model(slack):
    seen = record_requests(slack)
    _, first = ask_and_wait(slack, text="<@UBOT> How do I get VPN access?")
    click_approve(slack, first, expect="Approved")
    approved_text = stored(slack, first).text
    day = verdict_day(slack, answer_id_of(first), "approve")

    _, repeat = ask_and_wait(slack, text="<@UBOT> how do i get vpn access")
    assert len(seen) == 1  # only the first question reached the model
    row = stored(slack, repeat)
    assert row.text == approved_text and row.adapter_version is None and row.state == "done"
    assert [s["exact"] for s in row.sources] == [True]
    lines = context_lines(repeat)
    assert lines[0].startswith(blocks.APPROVED_TEXT_LABEL)
    link = permalink(slack, CHANNEL, first["ts"])
    assert f"✅ Answered from an answer approved by <@{EXPERT}> on {day} (<{link}|thread>)" in lines
    assert citations(repeat) == []

    # experts can still judge it: a correction replaces the text and keeps the mark ...
    correct_answer(
        slack.emulator,
        user=EXPERT,
        answer=repeat,
        text="Ask IT in #it-help; access arrives within a day.",
    )
    shown = slack.emulator.messages(CHANNEL, repeat["thread_ts"])[-1]
    assert any(
        line.startswith("✅ Answered from an answer approved by") for line in context_lines(shown)
    )
    # ... and the next exact repeat gets the correction, the latest verdict on that question
    _, again = ask_and_wait(slack, text="<@UBOT> How do I get VPN access?")
    assert len(seen) == 1
    assert stored(slack, again).text == "Ask IT in #it-help; access arrives within a day."
    assert any("corrected by" in line for line in context_lines(again))


def test_an_exact_repeat_in_a_thread_with_history_goes_to_the_model(slack):
    """A follow-up's words lean on the thread: only a fresh question is repeated verbatim."""
    seen = record_requests(slack)
    _, first = ask_and_wait(slack, text="<@UBOT> and on Fridays?")
    click_approve(slack, first, expect="Approved")
    ts, other = ask_and_wait(slack, text="<@UBOT> who deploys?")
    slack.emulator.post_message(user=USER, channel=CHANNEL, text="and on Fridays?", thread_ts=ts)
    follow_up = slack.emulator.wait_for_message(
        channel=CHANNEL,
        thread_ts=ts,
        user="UBOT",
        predicate=lambda m: has_buttons(m) and m["ts"] != other["ts"],
        timeout=30,
    )
    assert len(seen) == 3 and seen[-1].history  # the model answered, with the thread's history
    assert [note.question for note in seen[-1].notes] == ["and on Fridays?"]  # still a note
    assert not any(line.startswith("✅ Answered") for line in context_lines(follow_up))
    assert [source["exact"] for source in stored(slack, follow_up).sources] == [False]


def test_a_failing_knowledge_base_never_blocks_an_answer(make_settings, sqlite_url, tmp_path):
    unreachable = make_engine(f"sqlite:///{tmp_path / 'missing' / 'nowhere.db'}")
    knowledge = KnowledgeBase(db=unreachable, embedder=load_embedder())
    bot = start_slack(make_settings(database_url=sqlite_url), knowledge=knowledge)
    try:
        seen = record_requests(bot)
        _, answer = ask_and_wait(bot, text="<@UBOT> does this still work?")
        assert seen[0].notes == () and citations(answer) == []
        assert stored(bot, answer).state == "done"
    finally:
        bot.close()


def test_answer_blocks_cite_notes_and_mark_approved_text():
    line = "from an answer corrected by <@UALICE> on 2026-11-20 (<https://x.slack.com/p1|thread>)"
    cited = blocks.answer_blocks(
        blocks.AnswerCard(
            answer_id=7,
            text="Port 7431.",
            adapter_version="v0003",
            latency_ms=900,
            notes_used=2,
            citations=(line, line.replace("UALICE", "UBOB")),
        )
    )
    contexts = [b for b in cited if b["type"] == "context"]
    assert contexts[0]["elements"][0]["text"] == "adapter v0003 · 0.9 s"
    assert [e["text"] for e in contexts[1]["elements"]] == [
        f"📚 {line}",
        f"📚 {line.replace('UALICE', 'UBOB')}",
    ]
    verbatim = blocks.answer_blocks(
        blocks.AnswerCard(
            answer_id=8,
            text="Port 7431.",
            adapter_version=None,
            latency_ms=12,
            answered_from=line.replace("corrected", "approved"),
        )
    )
    texts = [e["text"] for b in verbatim if b["type"] == "context" for e in b["elements"]]
    assert texts[0] == f"{blocks.APPROVED_TEXT_LABEL} · 0.0 s"
    assert texts[1] == "✅ Answered " + line.replace("corrected", "approved")
    assert verbatim[-1]["type"] == "actions"  # experts can still judge a repeated answer
    plain = blocks.answer_blocks(
        blocks.AnswerCard(answer_id=9, text="x", adapter_version=None, latency_ms=None)
    )
    assert not any("📚" in json.dumps(b) or "✅ Answered" in json.dumps(b) for b in plain)
