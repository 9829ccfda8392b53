"""Slash commands: `/ask` (anyone) and `/apprentice` (admins).

`/ask` acknowledges at once, echoes the question in the channel (a slash command is invisible to
everyone else) and answers in that message's thread. `/apprentice` checks the admin on every
call, carries out the command (committing before it answers) and replies ephemerally through the
acknowledgement; slow commands report later through the response_url from their own thread.
"""

from __future__ import annotations

import logging
import threading
import time

from slack_bolt import App
from slack_sdk.errors import SlackApiError

from bot.slack import manifest_spec
from bot.slack.admin import run_command
from bot.slack.asking import IncomingQuestion, ask
from bot.slack.people import NOT_ADMIN
from bot.slack.services import Services

log = logging.getLogger(__name__)

ECHO_LIMIT = 2900
CHANNEL_TYPES = {"directmessage": "im", "privategroup": "group", "mpdm": "mpim"}
NOT_IN_CHANNEL = (
    "I can't post in this channel. Invite me with `/invite @Apprentice`, or ask me in a DM."
)


def register(app: App, services: Services) -> None:
    @app.command(manifest_spec.ASK_COMMAND)
    def on_ask(ack, command, client, respond):
        received = time.monotonic()
        text = (command.get("text") or "").strip()
        if not text:
            ack("Type the question after the command, e.g. `/ask How do we deploy?`")
            return
        ack()
        user, channel = command["user_id"], command["channel_id"]
        shown = text if len(text) <= ECHO_LIMIT else text[:ECHO_LIMIT] + "…"
        try:
            echo = client.chat_postMessage(channel=channel, text=f"<@{user}> asked: {shown}")
        except SlackApiError as exc:
            log.info("/ask in %s: %s", channel, exc.response.get("error"))
            respond(text=NOT_IN_CHANNEL, response_type="ephemeral")
            return
        ask(
            services=services,
            client=client,
            question=IncomingQuestion(
                source="command",
                text=text,
                user_id=user,
                channel_id=channel,
                channel_type=CHANNEL_TYPES.get(command.get("channel_name", "")),
                team_id=command.get("team_id"),
                thread_root=echo["ts"],
                message_ts=echo["ts"],
                received_at=received,
            ),
        )

    @app.command(manifest_spec.ADMIN_COMMAND)
    def on_admin(ack, command, respond):
        user = command["user_id"]
        if not services.people.is_admin(user):
            ack(NOT_ADMIN.format(admins=services.people.admin_mentions()))
            return
        reply = run_command(
            services=services,
            text=command.get("text") or "",
            user_id=user,
            channel_id=command["channel_id"],
        )
        ack(reply.text)
        if reply.followup is not None:
            threading.Thread(
                target=_follow_up, args=(reply.followup, respond), name="admin-followup"
            ).start()


def _follow_up(followup, respond) -> None:
    try:
        text = followup.run()
    except Exception as exc:  # say what failed; the details are in the log
        log.exception("admin command failed")
        text = f"That failed: {exc}"
    try:
        respond(text=text, response_type="ephemeral", replace_original=False)
    except Exception:
        log.exception("could not report the admin command's result")
