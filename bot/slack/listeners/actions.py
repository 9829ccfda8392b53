"""The answer buttons: ✅ Approve, ✏️ Correct, ✗ Reject (experts), 👍 / 👎, 🙋 Ask an expert.

Every handler acknowledges first, then checks the clicker's permission on every click (anyone
who can see a button can click it); a refused click writes nothing. ✏️ and ✗ open their modal
before anything slow: a trigger_id lives three seconds.
"""

from __future__ import annotations

import logging

from slack_bolt import App
from slack_sdk.errors import SlackApiError

from bot.slack import blocks
from bot.slack.cards import answer_card
from bot.slack.people import NOT_EXPERT
from bot.slack.reviewing import (
    NOT_READY,
    refresh_message,
    tell,
    toggle_verdict,
    withdraw,
)
from bot.slack.services import Services
from bot.store import session_scope
from bot.store.models import VerdictKind
from bot.store.questions import get_answer
from bot.store.verdicts import current_verdict

log = logging.getLogger(__name__)


def _where(body: dict) -> tuple[str, str, str]:
    """(user, channel, thread root) of a click on an answer message."""
    message = body.get("message") or {}
    thread = message.get("thread_ts") or message.get("ts") or body["container"].get("message_ts")
    return body["user"]["id"], body["channel"]["id"], thread


def register(app: App, services: Services) -> None:
    people = services.people

    def judge(body, action, client, kind: VerdictKind) -> None:
        user, channel, thread = _where(body)
        if kind.expert_only and not people.is_expert(user):
            tell(client=client, channel=channel, user=user, text=NOT_EXPERT, thread_ts=thread)
            return
        answer_id = int(action["value"])
        outcome = toggle_verdict(services=services, answer_id=answer_id, kind=kind, user_id=user)
        if outcome.changed:
            refresh_message(services=services, client=client, answer_id=answer_id)
        tell(client=client, channel=channel, user=user, text=outcome.note, thread_ts=thread)

    @app.action(blocks.APPROVE)
    def on_approve(ack, body, action, client):
        ack()
        judge(body, action, client, VerdictKind.APPROVE)

    @app.action(blocks.THUMBS_UP)
    def on_thumbs_up(ack, body, action, client):
        ack()
        judge(body, action, client, VerdictKind.UP)

    @app.action(blocks.THUMBS_DOWN)
    def on_thumbs_down(ack, body, action, client):
        ack()
        judge(body, action, client, VerdictKind.DOWN)

    @app.action(blocks.CORRECT)
    def on_correct(ack, body, action, client):
        ack()
        user, channel, thread = _where(body)
        if not people.is_expert(user):
            tell(client=client, channel=channel, user=user, text=NOT_EXPERT, thread_ts=thread)
            return
        answer_id = int(action["value"])
        with session_scope(services.db) as session:  # one indexed read, then the modal
            answer = get_answer(session=session, answer_id=answer_id)
            text = answer_card(session=session, answer=answer).text if answer else ""
            ready = answer is not None and answer.state == "done"
        if not ready:
            tell(client=client, channel=channel, user=user, text=NOT_READY, thread_ts=thread)
            return
        metadata = {"channel": channel, "thread_ts": thread}
        client.views_open(
            trigger_id=body["trigger_id"],
            view=blocks.correction_modal(answer_id=answer_id, answer_text=text, metadata=metadata),
        )

    @app.action(blocks.REJECT)
    def on_reject(ack, body, action, client):
        ack()
        user, channel, thread = _where(body)
        if not people.is_expert(user):
            tell(client=client, channel=channel, user=user, text=NOT_EXPERT, thread_ts=thread)
            return
        answer_id = int(action["value"])
        with session_scope(services.db) as session:
            current = current_verdict(
                session=session, answer_id=answer_id, author_id=user, kind=VerdictKind.REJECT
            )
            already = current is not None and current.kind == VerdictKind.REJECT
        if already:  # clicking your current verdict again withdraws it
            outcome = withdraw(
                services=services, answer_id=answer_id, kind=VerdictKind.REJECT, user_id=user
            )
            if outcome.changed:
                refresh_message(services=services, client=client, answer_id=answer_id)
            tell(client=client, channel=channel, user=user, text=outcome.note, thread_ts=thread)
            return
        metadata = {"channel": channel, "thread_ts": thread}
        client.views_open(
            trigger_id=body["trigger_id"],
            view=blocks.reject_modal(answer_id=answer_id, metadata=metadata),
        )

    @app.action(blocks.ASK_EXPERT)
    def on_ask_expert(ack, body, action, client):
        ack()
        user, channel, thread = _where(body)
        experts = people.expert_ids()
        group = services.settings.expert_usergroup
        tags = " ".join([f"<@{u}>" for u in experts] + ([f"<!subteam^{group}>"] if group else []))
        if not tags:
            tell(
                client=client,
                channel=channel,
                user=user,
                text="No experts are configured yet; ask an admin to add some.",
                thread_ts=thread,
            )
            return
        try:
            client.chat_postMessage(
                channel=channel,
                thread_ts=thread,
                text=f"{tags}: <@{user}> would like an expert to check this answer.",
            )
        except SlackApiError as exc:
            log.warning("could not call the experts: %s", exc.response.get("error"))
