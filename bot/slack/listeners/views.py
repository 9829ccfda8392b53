"""Modal submissions: the correction (✏️) and the rejection reason (✗).

The permission check runs again here (a modal can outlive a role change). The verdict is
committed, then the modal closes (ack), then the message is re-rendered and the expert told.
An emptied correction withdraws the expert's earlier correction.
"""

from __future__ import annotations

import json

from slack_bolt import App

from bot.slack import blocks
from bot.slack.people import NOT_EXPERT
from bot.slack.reviewing import refresh_message, tell, toggle_verdict, withdraw
from bot.slack.services import Services
from bot.store.models import VerdictKind


def _value(view: dict, block_id: str, action_id: str) -> str:
    state = view.get("state", {}).get("values", {})
    return ((state.get(block_id) or {}).get(action_id) or {}).get("value") or ""


def register(app: App, services: Services) -> None:
    people = services.people

    def submit(ack, body, view, client, *, kind: VerdictKind, block_id: str, action_id: str):
        user = body["user"]["id"]
        if not people.is_expert(user):
            ack(response_action="errors", errors={block_id: NOT_EXPERT[:150]})
            return
        meta = json.loads(view.get("private_metadata") or "{}")
        answer_id = int(meta["answer_id"])
        text = _value(view, block_id, action_id).strip()
        if kind is VerdictKind.CORRECT and not text:
            outcome = withdraw(services=services, answer_id=answer_id, kind=kind, user_id=user)
        elif not text:
            ack(response_action="errors", errors={block_id: "Say briefly what is wrong."})
            return
        else:
            outcome = toggle_verdict(
                services=services, answer_id=answer_id, kind=kind, user_id=user, text=text
            )
        ack()
        if outcome.changed:
            refresh_message(services=services, client=client, answer_id=answer_id)
        if meta.get("channel"):
            tell(
                client=client,
                channel=meta["channel"],
                user=user,
                text=outcome.note,
                thread_ts=meta.get("thread_ts"),
            )

    @app.view(blocks.CORRECT_VIEW)
    def on_correction(ack, body, view, client):
        submit(
            ack,
            body,
            view,
            client,
            kind=VerdictKind.CORRECT,
            block_id=blocks.CORRECTION_BLOCK,
            action_id=blocks.CORRECTION_INPUT,
        )

    @app.view(blocks.REJECT_VIEW)
    def on_rejection(ack, body, view, client):
        submit(
            ack,
            body,
            view,
            client,
            kind=VerdictKind.REJECT,
            block_id=blocks.REASON_BLOCK,
            action_id=blocks.REASON_INPUT,
        )
