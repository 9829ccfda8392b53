"""Questions arriving as events: @mentions, DMs, thread follow-ups, auto-answer channels.

Bolt acknowledges events before the listener runs (lazy ack), so Slack gets its 200 at once;
the listener then parses, stores and hands off (see `bot.slack.asking`). A channel message that
mentions the bot arrives twice (app_mention and message): the message listener leaves it to
app_mention, and both claim the same message key, so even a race cannot answer twice.
"""

from __future__ import annotations

from slack_bolt import App

from bot.slack import manifest_spec
from bot.slack.asking import IncomingQuestion, ask, mentions_user, strip_mention
from bot.slack.services import Services
from bot.store import session_scope
from bot.store.channels import auto_answer_enabled
from bot.store.questions import bot_answered_thread

IGNORED_SUBTYPES = {None, "file_share", "thread_broadcast"}  # anything else is not a question


def _message_key(event: dict) -> str:
    return f"msg:{event.get('channel')}:{event.get('ts')}"


def register(app: App, services: Services) -> None:
    @app.event(manifest_spec.APP_MENTION)
    def on_mention(body, event, client, context):
        text = strip_mention(event.get("text", ""), context.bot_user_id)
        if not text or event.get("bot_id"):
            return
        ask(
            services=services,
            client=client,
            question=IncomingQuestion(
                source="mention" if not event.get("thread_ts") else "thread",
                text=text,
                user_id=event.get("user", ""),
                channel_id=event["channel"],
                channel_type=event.get("channel_type"),  # app_mention has none: resolved later
                team_id=body.get("team_id"),
                thread_root=event.get("thread_ts") or event["ts"],
                message_ts=event["ts"],
                event_id=body.get("event_id"),
                claim_keys=(_message_key(event),),
            ),
        )

    @app.event(manifest_spec.MESSAGE)
    def on_message(body, event, client, context):
        if event.get("subtype") not in IGNORED_SUBTYPES or event.get("bot_id"):
            return
        user, text = event.get("user"), event.get("text", "")
        if not user or not text.strip():
            return
        channel, channel_type = event["channel"], event.get("channel_type")
        thread_ts = event.get("thread_ts")
        is_dm = channel_type == "im"
        if not is_dm and mentions_user(text, context.bot_user_id):
            return  # app_mention answers it
        if is_dm:
            source = "dm" if not thread_ts else "thread"
        else:
            with session_scope(services.db) as session:
                if thread_ts and bot_answered_thread(
                    session=session, channel_id=channel, thread_ts=thread_ts
                ):
                    source = "thread"
                elif auto_answer_enabled(session=session, channel_id=channel):
                    source = "auto"
                else:
                    services.metrics.skipped.labels(reason="not_a_question").inc()
                    return
        question = strip_mention(text, context.bot_user_id)
        if not question:
            return
        ask(
            services=services,
            client=client,
            question=IncomingQuestion(
                source=source,
                text=question,
                user_id=user,
                channel_id=channel,
                channel_type=channel_type,
                team_id=body.get("team_id"),
                thread_root=thread_ts or event["ts"],
                message_ts=event["ts"],
                event_id=body.get("event_id"),
                claim_keys=(_message_key(event),),
            ),
        )
