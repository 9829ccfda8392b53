"""What people do in the bot's Slack UI, played on the local emulator (`bot.slack.local`).

Tests and benchmarks drive the bot as a person would: click its buttons, fill its modals, read
its private replies. Each flow is written here once, with the bot's own action, callback and
block ids, so a change to the UI changes one place. A test that examines a step itself (what
the modal shows, who is refused) still writes that step out.

This lives beside `LocalSlack` rather than in `bot.emulator`, which knows Slack, not this bot.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from bot.slack import blocks
from bot.slack.reviewing import SAVED
from bot.store.models import VerdictKind

if TYPE_CHECKING:
    from bot.emulator import DeliveryResult, SlackEmulator


def correct_answer(
    emulator: SlackEmulator, *, user: str, answer: dict, text: str, timeout: float = 10.0
) -> dict:
    """`user` corrects the bot's answer in Slack and sees the correction saved.

    As a person would: click ✏️ Correct under `answer` (the bot's answer message as
    `wait_for_message` returns it, which carries its `channel`), wait for the correction modal,
    type `text`, submit, read the bot's private confirmation, and see the answer message show
    the correction. Returns that message as it now shows.

    Raises `RuntimeError` with the bot's own words when it refuses a step (the user is not an
    expert, the answer is not finished, the modal shows an error), and `TimeoutError` when a
    step does not happen within `timeout` seconds.
    """
    if not text.strip():
        # an emptied correction withdraws one (bot.slack.listeners.views): a different flow
        raise ValueError("a correction needs text")
    channel, ts = answer["channel"], answer["ts"]

    seen = _ephemeral_ts(emulator, channel=channel, user=user)
    _acknowledged(
        emulator.click_button(user=user, channel=channel, message_ts=ts, action_id=blocks.CORRECT),
        step="the ✏️ Correct click",
    )
    # the bot acks the click first, then either opens the modal or tells the user why not
    shown = emulator.wait_until(
        lambda: (
            _top_modal(emulator, user=user, callback_id=blocks.CORRECT_VIEW)
            or _new_ephemeral(emulator, channel=channel, user=user, seen=seen)
        ),
        timeout=timeout,
        describe=lambda: f"no correction modal opened for {user} after {timeout} s",
    )
    if shown.get("type") != "modal":
        raise RuntimeError(f"the bot did not open the correction modal: {shown['text']}")

    seen = _ephemeral_ts(emulator, channel=channel, user=user)
    submitted = emulator.submit_view(
        user=user,
        view_id=shown["id"],
        values={blocks.CORRECTION_BLOCK: {blocks.CORRECTION_INPUT: text}},
    )
    _acknowledged(submitted, step="the correction modal's submission")
    reply = submitted.json()
    if isinstance(reply, dict) and reply.get("response_action") == "errors":
        raise RuntimeError(f"the correction modal showed errors: {reply.get('errors')}")

    note = emulator.wait_until(
        lambda: _new_ephemeral(emulator, channel=channel, user=user, seen=seen),
        timeout=timeout,
        describe=lambda: f"the bot never confirmed {user}'s correction after {timeout} s",
    )
    if SAVED[VerdictKind.CORRECT] not in note["text"]:
        raise RuntimeError(f"the bot did not save the correction: {note['text']}")
    return emulator.wait_for_message(
        channel=channel,
        thread_ts=answer.get("thread_ts"),
        predicate=lambda m: (
            m["ts"] == ts and f"corrected by <@{user}>" in json.dumps(m.get("blocks"))
        ),
        timeout=timeout,
    )


def _acknowledged(result: DeliveryResult, *, step: str) -> None:
    if not result.ok:
        raise RuntimeError(f"the bot did not acknowledge {step}: HTTP {result.status}")


def _top_modal(emulator: SlackEmulator, *, user: str, callback_id: str) -> dict | None:
    stack = emulator.view_stack(user)
    return stack[-1] if stack and stack[-1].get("callback_id") == callback_id else None


def _ephemeral_ts(emulator: SlackEmulator, *, channel: str, user: str) -> set[str]:
    return {e["ts"] for e in emulator.ephemerals(channel=channel, user=user)}


def _new_ephemeral(
    emulator: SlackEmulator, *, channel: str, user: str, seen: set[str]
) -> dict | None:
    found = emulator.ephemerals(channel=channel, user=user)
    return next((e for e in found if e["ts"] not in seen), None)
