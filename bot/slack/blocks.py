"""Block Kit builders: pure functions from plain data to the dicts Slack expects.

They know Slack's limits so callers never have to: a section holds at most 3,000 characters, a
message at most 50 blocks, a button's text 75 and its value 2,000, a modal's title 24, a
plain-text input 3,000. Long answers are split on paragraph, line and word boundaries; what
still does not fit is cut with a visible note rather than refused by Slack.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

SECTION_TEXT_LIMIT = 3000
MESSAGE_BLOCK_LIMIT = 50
FALLBACK_TEXT_LIMIT = 3000  # notification text: keep it short, the blocks carry the answer
MODAL_TITLE_LIMIT = 24
INPUT_TEXT_LIMIT = 3000

# action ids (buttons) and callback ids (modals): the listeners match on these
APPROVE = "answer_approve"
CORRECT = "answer_correct"
REJECT = "answer_reject"
THUMBS_UP = "answer_up"
THUMBS_DOWN = "answer_down"
ASK_EXPERT = "answer_ask_expert"
ANSWER_ACTIONS = (APPROVE, CORRECT, REJECT, THUMBS_UP, THUMBS_DOWN, ASK_EXPERT)
CORRECT_VIEW = "answer_correct_view"
REJECT_VIEW = "answer_reject_view"
CORRECTION_BLOCK, CORRECTION_INPUT = "correction", "correction_text"
REASON_BLOCK, REASON_INPUT = "reason", "reason_text"

THINKING_TEXT = "thinking…"
APPROVED_TEXT_LABEL = "approved text, not generated"
CITATION_LIMIT = 10  # elements in one context block
TRUNCATED_NOTE = "(answer cut to fit Slack's message limit)"


@dataclass(frozen=True)
class AnswerCard:
    """Everything an answer message shows; built from the database by the listeners."""

    answer_id: int
    text: str
    adapter_version: str | None
    latency_ms: int | None
    truncated_input: bool = False
    corrected_by: str | None = None  # user id of the correction shown instead of the answer
    approved_by: tuple[str, ...] = ()
    rejected_by: tuple[tuple[str, str | None], ...] = ()  # (user id, reason)
    thumbs_up: int = 0
    thumbs_down: int = 0
    notes_used: int = 0
    # team knowledge (mrkdwn citations from `bot.slack.citing`): the notes the model was given,
    # or the approved answer repeated verbatim instead of generating
    citations: tuple[str, ...] = ()
    answered_from: str | None = None


def version_label(version: str | None) -> str:
    return "base model" if not version else f"adapter {version}"


def escape(text: str) -> str:
    """Slack's escaping for text we did not write: model output must never ping <!channel>."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def split_text(text: str, limit: int = SECTION_TEXT_LIMIT) -> list[str]:
    """Split `text` into chunks of at most `limit` characters, preferring natural breaks."""
    text = text.strip() or " "
    chunks = []
    while len(text) > limit:
        window = text[:limit]
        cut = max(window.rfind("\n\n"), window.rfind("\n"), window.rfind(" "))
        if cut < limit // 2:  # no good break: cut hard rather than make tiny chunks
            cut = limit
            entity = window.rfind("&", limit - 5)
            if entity > 0 and ";" not in window[entity:]:
                cut = entity  # never split "&amp;"
        chunks.append(text[:cut].rstrip() or text[:limit])
        text = text[cut:].lstrip() if cut < len(text) else ""
    if text:
        chunks.append(text)
    return chunks


def _section(text: str) -> dict:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def _context(*lines: str) -> dict:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": s} for s in lines]}


def _button(label: str, action_id: str, value: str, style: str | None = None) -> dict:
    button = {
        "type": "button",
        "text": {"type": "plain_text", "text": label[:75], "emoji": True},
        "action_id": action_id,
        "value": value[:2000],
    }
    if style:
        button["style"] = style
    return button


def text_sections(text: str, *, max_blocks: int) -> list[dict]:
    """The answer text (escaped) as sections, at most `max_blocks` (the last says it was cut)."""
    chunks = split_text(escape(text))
    if len(chunks) > max_blocks:
        chunks = chunks[:max_blocks]
        room = SECTION_TEXT_LIMIT - len(TRUNCATED_NOTE) - 2
        chunks[-1] = chunks[-1][:room].rstrip() + "\n" + TRUNCATED_NOTE
    return [_section(chunk) for chunk in chunks]


def fallback_text(text: str) -> str:
    """The message's top-level `text` (notifications, screen readers)."""
    text = escape(text.strip()) or " "
    return text if len(text) <= FALLBACK_TEXT_LIMIT else text[: FALLBACK_TEXT_LIMIT - 1] + "…"


def answer_blocks(card: AnswerCard) -> list[dict]:
    """A finished answer: text, provenance line, review status, and the buttons."""
    value = str(card.answer_id)
    # an approved answer repeated verbatim was not generated: no model version to name
    context = [APPROVED_TEXT_LABEL if card.answered_from else version_label(card.adapter_version)]
    if card.latency_ms is not None:
        context.append(f"{card.latency_ms / 1000:.1f} s")
    if card.notes_used and not card.citations:
        context.append(f"{card.notes_used} team note(s) used")
    trailer = [_context(" · ".join(context))]
    if card.answered_from:
        trailer.append(_context(f"✅ Answered {card.answered_from}"[:3000]))
    if card.citations:
        trailer.append(_context(*[f"📚 {line}"[:3000] for line in card.citations[:CITATION_LIMIT]]))
    if card.truncated_input:
        trailer.append(
            _context(
                ":warning: Your question was too long for me to read in full; I answered from "
                "its beginning. Shorter questions get better answers."
            )
        )
    status = []
    if card.corrected_by:
        status.append(f":pencil2: corrected by <@{card.corrected_by}>")
    if card.approved_by:
        status.append(
            ":white_check_mark: approved by " + ", ".join(f"<@{u}>" for u in card.approved_by)
        )
    for user, reason in card.rejected_by:
        status.append(f":x: rejected by <@{user}>" + (f": {escape(reason)}" if reason else ""))
    if card.thumbs_up or card.thumbs_down:
        status.append(f":+1: {card.thumbs_up}  :-1: {card.thumbs_down}")
    if status:
        trailer.append(_context(*[s[:3000] for s in status[:10]]))
    actions = {
        "type": "actions",
        "block_id": f"answer_actions_{card.answer_id}",
        "elements": [
            _button("✅ Approve", APPROVE, value, "primary"),
            _button("✏️ Correct", CORRECT, value),
            _button("✗ Reject", REJECT, value, "danger"),
            _button("👍", THUMBS_UP, value),
            _button("👎", THUMBS_DOWN, value),
            _button("🙋 Ask an expert", ASK_EXPERT, value),
        ],
    }
    room = MESSAGE_BLOCK_LIMIT - len(trailer) - 1
    return text_sections(card.text, max_blocks=room) + trailer + [actions]


def thinking_blocks() -> list[dict]:
    return [_context(f"_{THINKING_TEXT}_")]


def streaming_blocks(partial: str) -> list[dict]:
    """An answer still being written: the text so far, no buttons yet."""
    return text_sections(partial + " …", max_blocks=MESSAGE_BLOCK_LIMIT - 1) + [
        _context(f"_still {THINKING_TEXT}_")
    ]


def error_blocks(message: str) -> list[dict]:
    return [_section(f":warning: {message}"[:SECTION_TEXT_LIMIT])]


def _modal(*, title: str, callback_id: str, metadata: dict, blocks: list, submit: str) -> dict:
    return {
        "type": "modal",
        "callback_id": callback_id,
        "private_metadata": json.dumps(metadata),
        "title": {"type": "plain_text", "text": title[:MODAL_TITLE_LIMIT]},
        "submit": {"type": "plain_text", "text": submit[:24]},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": blocks,
    }


def correction_modal(*, answer_id: int, answer_text: str, metadata: dict) -> dict:
    """✏️ Correct: the answer prefilled, for the expert to edit."""
    return _modal(
        title="Correct the answer",
        callback_id=CORRECT_VIEW,
        metadata={"answer_id": answer_id, **metadata},
        submit="Save correction",
        blocks=[
            {
                "type": "input",
                "block_id": CORRECTION_BLOCK,
                "optional": True,  # emptied and saved = withdraw your correction
                "label": {"type": "plain_text", "text": "The right answer"},
                "element": {
                    "type": "plain_text_input",
                    "action_id": CORRECTION_INPUT,
                    "multiline": True,
                    "max_length": INPUT_TEXT_LIMIT,
                    "initial_value": answer_text[:INPUT_TEXT_LIMIT],
                },
            },
            _context(
                "The bot learns from corrections at its next training cycle. "
                "Empty the box and save to withdraw your correction."
            ),
        ],
    )


def reject_modal(*, answer_id: int, metadata: dict) -> dict:
    """✗ Reject: ask why, so the rejection can teach something."""
    return _modal(
        title="Reject the answer",
        callback_id=REJECT_VIEW,
        metadata={"answer_id": answer_id, **metadata},
        submit="Reject",
        blocks=[
            {
                "type": "input",
                "block_id": REASON_BLOCK,
                "label": {"type": "plain_text", "text": "What is wrong with it?"},
                "element": {
                    "type": "plain_text_input",
                    "action_id": REASON_INPUT,
                    "multiline": True,
                    "max_length": INPUT_TEXT_LIMIT,
                },
            }
        ],
    )


@dataclass(frozen=True)
class HomeSummary:
    questions_this_week: int
    answers_this_week: int
    approval_rate: float | None
    correction_rate: float | None
    pending_reviews: int
    active_adapter: str | None
    pending_examples: Sequence[tuple[str, str]] = field(default_factory=tuple)  # (question, link)
    is_expert: bool = False


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def home_view(summary: HomeSummary) -> dict:
    """App Home: this week's numbers, what is waiting for review, the active adapter."""
    blocks: list[dict] = [
        {"type": "header", "text": {"type": "plain_text", "text": "Apprentice"}},
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": f"*Questions this week*\n{summary.questions_this_week}"},
                {"type": "mrkdwn", "text": f"*Answers this week*\n{summary.answers_this_week}"},
                {"type": "mrkdwn", "text": f"*Approval rate*\n{_rate(summary.approval_rate)}"},
                {"type": "mrkdwn", "text": f"*Correction rate*\n{_rate(summary.correction_rate)}"},
                {"type": "mrkdwn", "text": f"*Pending reviews*\n{summary.pending_reviews}"},
                {
                    "type": "mrkdwn",
                    "text": f"*Active adapter*\n{version_label(summary.active_adapter)}",
                },
            ],
        },
    ]
    if summary.pending_examples:
        blocks.append({"type": "divider"})
        blocks.append(_section("*Waiting for an expert*"))
        for question, where in list(summary.pending_examples)[:10]:
            line = question.replace("\n", " ")
            line = line if len(line) <= 200 else line[:199] + "…"
            blocks.append(_section(f"• {line}" + (f"  {where}" if where else "")))
    hint = (
        "Review answers with ✅ / ✏️ / ✗ in their threads."
        if summary.is_expert
        else "Mention me, DM me or use `/ask` to ask a question."
    )
    blocks.append(_context(hint))
    return {"type": "home", "blocks": blocks}
