"""Verdicts from Slack: record or withdraw one, then show it on the answer message.

Clicking your current verdict again withdraws it; clicking another replaces it (the latest one
counts). The row is committed before anyone is told, and the message is rebuilt from the rows
(`bot.slack.cards`), so what Slack shows is what the database holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot.slack import blocks
from bot.slack.cards import answer_card
from bot.slack.services import Services
from bot.store import session_scope
from bot.store.models import VerdictKind
from bot.store.questions import get_answer
from bot.store.verdicts import current_verdict, record_verdict, withdraw_verdict

log = logging.getLogger(__name__)

NOUNS = {
    VerdictKind.APPROVE: "approval",
    VerdictKind.CORRECT: "correction",
    VerdictKind.REJECT: "rejection",
    VerdictKind.UP: "👍",
    VerdictKind.DOWN: "👎",
}
SAVED = {
    VerdictKind.APPROVE: "Approved: the bot will learn from this answer at its next training.",
    VerdictKind.CORRECT: "Saved your correction; the message now shows it.",
    VerdictKind.REJECT: "Rejected; thanks for saying why.",
    VerdictKind.UP: "Thanks for the 👍.",
    VerdictKind.DOWN: "Thanks for the 👎. 🙋 Ask an expert if you know it's wrong.",
}
NOT_READY = "This answer isn't finished (or failed), so there is nothing to judge yet."


@dataclass(frozen=True)
class Outcome:
    note: str
    changed: bool  # whether a row was written (and the message needs a refresh)


def answer_is_judgeable(*, services: Services, answer_id: int) -> bool:
    with session_scope(services.db) as session:
        answer = get_answer(session=session, answer_id=answer_id)
        return answer is not None and answer.state == "done"


def toggle_verdict(
    *, services: Services, answer_id: int, kind: VerdictKind, user_id: str, text: str | None = None
) -> Outcome:
    """Record `kind`, or withdraw it when it already is the user's current verdict."""
    with session_scope(services.db) as session:
        answer = get_answer(session=session, answer_id=answer_id)
        if answer is None or answer.state != "done":
            return Outcome(NOT_READY, changed=False)
        current = current_verdict(
            session=session, answer_id=answer_id, author_id=user_id, kind=kind
        )
        if current is not None and current.kind == kind and kind is not VerdictKind.CORRECT:
            withdraw_verdict(session=session, answer_id=answer_id, author_id=user_id, kind=kind)
            note = f"You withdrew your {NOUNS[kind]}. Click again to give it back."
        else:
            record_verdict(
                session=session, answer_id=answer_id, kind=kind, author_id=user_id, text=text
            )
            note = SAVED[kind]
            if current is not None and current.kind != kind:
                note = f"Your {NOUNS[VerdictKind(current.kind)]} is replaced. " + note
    if services.metrics is not None:
        services.metrics.verdicts.labels(kind=kind.value).inc()
    return Outcome(note, changed=True)


def withdraw(*, services: Services, answer_id: int, kind: VerdictKind, user_id: str) -> Outcome:
    with session_scope(services.db) as session:
        gone = withdraw_verdict(session=session, answer_id=answer_id, author_id=user_id, kind=kind)
    if gone is None:
        return Outcome(f"You had no {NOUNS[kind]} to withdraw.", changed=False)
    return Outcome(f"You withdrew your {NOUNS[VerdictKind(gone.kind)]}.", changed=True)


def refresh_message(*, services: Services, client: WebClient, answer_id: int) -> None:
    """Re-render the answer message from the rows (text, correction, verdicts)."""
    with session_scope(services.db) as session:
        answer = get_answer(session=session, answer_id=answer_id)
        if answer is None or not answer.message_ts or not answer.channel_id:
            return
        card = answer_card(session=session, answer=answer)
        channel, ts = answer.channel_id, answer.message_ts
    try:
        client.chat_update(
            channel=channel,
            ts=ts,
            text=blocks.fallback_text(card.text),
            blocks=blocks.answer_blocks(card),
        )
    except SlackApiError as exc:
        log.warning("could not refresh answer %s: %s", answer_id, exc.response.get("error"))


def tell(
    *, client: WebClient, channel: str, user: str, text: str, thread_ts: str | None = None
) -> None:
    """An ephemeral note to one user; failing to send it must not undo what was saved."""
    try:
        kwargs = {"thread_ts": thread_ts} if thread_ts else {}
        client.chat_postEphemeral(channel=channel, user=user, text=text, **kwargs)
    except SlackApiError as exc:
        log.warning("could not tell %s: %s", user, exc.response.get("error"))
