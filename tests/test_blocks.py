"""Block Kit builders are pure functions that respect Slack's limits."""

from __future__ import annotations

import json

import pytest

from bot.emulator.blocks_check import check_message, check_view
from bot.slack import blocks


def card(text: str, **kw) -> blocks.AnswerCard:
    return blocks.AnswerCard(answer_id=42, text=text, adapter_version=None, latency_ms=1234, **kw)


def section_texts(built: list[dict]) -> list[str]:
    return [b["text"]["text"] for b in built if b["type"] == "section"]


def test_split_text_respects_the_limit_and_prefers_breaks():
    text = ("word " * 700 + "\n\n") * 3
    chunks = blocks.split_text(text, limit=3000)
    assert all(len(c) <= 3000 for c in chunks) and len(chunks) >= 3
    assert " ".join(chunks).split() == text.split()  # nothing lost, words intact
    assert blocks.split_text("x" * 7000, limit=3000) == ["x" * 3000, "x" * 3000, "x" * 1000]


def test_a_long_answer_fits_one_message_with_a_visible_cut():
    built = blocks.answer_blocks(card("y" * 200_000))
    assert len(built) <= blocks.MESSAGE_BLOCK_LIMIT
    assert all(len(t) <= blocks.SECTION_TEXT_LIMIT for t in section_texts(built))
    assert blocks.TRUNCATED_NOTE in section_texts(built)[-1]
    assert built[-1]["type"] == "actions"
    assert (
        check_message(text=blocks.fallback_text("y" * 200_000), blocks=built, attachments=None)[0]
        is None
    )


def test_answer_buttons_carry_the_answer_id_and_status_lines():
    built = blocks.answer_blocks(
        card(
            "Deploy on Tuesdays <!channel> & co",
            corrected_by="UEXPERT",
            approved_by=("UA",),
            rejected_by=(("UB", "<wrong>"),),
            thumbs_up=2,
            truncated_input=True,
        )
    )
    actions = built[-1]
    assert [e["value"] for e in actions["elements"]] == ["42"] * 6
    assert [e["action_id"] for e in actions["elements"]] == list(blocks.ANSWER_ACTIONS)
    text = json.dumps(built)
    assert "&lt;!channel&gt; &amp; co" in text and "<!channel>" not in text  # never pings
    assert "corrected by <@UEXPERT>" in text and "approved by <@UA>" in text
    assert "rejected by <@UB>: &lt;wrong&gt;" in text and "too long" in text
    assert "base model" in text and "1.2 s" in text
    assert check_message(text="x", blocks=built, attachments=None)[0] is None


@pytest.mark.parametrize("version, label", [(None, "base model"), ("v0003", "adapter v0003")])
def test_version_label(version, label):
    assert blocks.version_label(version) == label


def test_modals_and_home_are_valid_views():
    long = "z" * 5000
    correct = blocks.correction_modal(answer_id=7, answer_text=long, metadata={"channel": "C1"})
    element = correct["blocks"][0]["element"]
    assert len(element["initial_value"]) == blocks.INPUT_TEXT_LIMIT
    assert json.loads(correct["private_metadata"]) == {"answer_id": 7, "channel": "C1"}
    assert len(correct["title"]["text"]) <= blocks.MODAL_TITLE_LIMIT
    reject = blocks.reject_modal(answer_id=7, metadata={})
    home = blocks.home_view(
        blocks.HomeSummary(
            questions_this_week=3,
            answers_this_week=3,
            approval_rate=0.5,
            correction_rate=None,
            pending_reviews=1,
            active_adapter="v0002",
            pending_examples=(("q " * 500, "<#C1>"),),
        )
    )
    for view in (correct, reject, home):
        assert check_view(view)[0] is None, view
    text = json.dumps(home, ensure_ascii=False)
    assert "50%" in text and "adapter v0002" in text and "—" in text


def test_streaming_and_error_blocks_fit():
    assert len(blocks.streaming_blocks("a" * 300_000)) <= blocks.MESSAGE_BLOCK_LIMIT
    assert len(blocks.error_blocks("e" * 5000)[0]["text"]["text"]) <= blocks.SECTION_TEXT_LIMIT
