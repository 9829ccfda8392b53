"""From a Slack message to an answer in flight: store, post "thinking…", hand off.

Used by every way of asking (mention, DM, `/ask`, thread follow-up, auto-answer channel). The
order matters: the event is claimed and the question stored first (a retried or doubled event
stops here), then the "thinking…" reply is posted, its ts stored as a pending answer, and only
then the dispatcher takes over. Nothing here waits for the model.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from sqlalchemy.exc import IntegrityError

from bot.engine.types import AnswerRequest, Turn
from bot.slack import blocks
from bot.slack.cards import shown_text
from bot.slack.dispatcher import AnswerJob
from bot.slack.services import Services
from bot.store import session_scope
from bot.store.questions import (
    claim_event,
    record_pending_answer,
    record_question,
    thread_exchanges,
)

log = logging.getLogger(__name__)

MENTION = re.compile(r"<@([UW][A-Z0-9]+)(?:\|[^>]*)?>")


def strip_mention(text: str, bot_user_id: str | None) -> str:
    """The question without the bot's @mention."""
    if bot_user_id:
        text = re.sub(rf"<@{re.escape(bot_user_id)}(?:\|[^>]*)?>", " ", text)
    return re.sub(r"[ \t]+", " ", text).strip()


def mentions_user(text: str, user_id: str | None) -> bool:
    return bool(user_id) and any(m == user_id for m in MENTION.findall(text or ""))


@dataclass(frozen=True)
class IncomingQuestion:
    source: str  # mention | dm | command | thread | auto
    text: str
    user_id: str
    channel_id: str
    thread_root: str  # the thread the answer goes in (a message's own ts starts one)
    channel_type: str | None = None
    team_id: str | None = None
    message_ts: str | None = None
    event_id: str | None = None
    # extra dedupe keys: the same message arrives as app_mention AND message
    claim_keys: tuple[str, ...] = field(default_factory=tuple)
    received_at: float = field(default_factory=time.monotonic)


def ask(*, services: Services, client: WebClient, question: IncomingQuestion) -> int | None:
    """Store the question, post "thinking…", dispatch; the answer id, or None when skipped."""
    channel_type = services.channel_kinds.resolve(
        client=client, channel_id=question.channel_id, hint=question.channel_type
    )
    try:
        with session_scope(services.db) as session:
            for key in filter(None, (question.event_id, *question.claim_keys)):
                claim_event(session=session, event_id=key)
            history = _history(session, question)
            stored = record_question(
                session=session,
                source=question.source,
                text=question.text,
                user_id=question.user_id,
                channel_id=question.channel_id,
                channel_type=channel_type,
                team_id=question.team_id,
                thread_ts=question.thread_root,
                message_ts=question.message_ts,
                event_id=question.event_id,
            )
            question_id = stored.id
    except IntegrityError:
        log.info("event %s already handled; skipped", question.event_id or question.claim_keys)
        services.metrics.skipped.labels(reason="duplicate").inc()
        return None
    services.metrics.questions.labels(source=question.source).inc()
    try:
        thinking = client.chat_postMessage(
            channel=question.channel_id,
            thread_ts=question.thread_root,
            text=blocks.THINKING_TEXT,
            blocks=blocks.thinking_blocks(),
        )
    except SlackApiError as exc:
        log.warning("could not post in %s: %s", question.channel_id, exc.response.get("error"))
        return None
    with session_scope(services.db) as session:
        answer = record_pending_answer(
            session=session,
            question_id=question_id,
            channel_id=question.channel_id,
            message_ts=thinking["ts"],
        )
        answer_id = answer.id
    services.dispatcher.dispatch(
        AnswerJob(
            answer_id=answer_id,
            channel=question.channel_id,
            message_ts=thinking["ts"],
            request=AnswerRequest(question=question.text, history=history),
            received_at=question.received_at,
        )
    )
    return answer_id


def _history(session, question: IncomingQuestion) -> tuple[Turn, ...]:
    """Earlier question/answer turns of the thread, oldest first (corrections win)."""
    turns: list[Turn] = []
    for earlier, answer in thread_exchanges(
        session=session, channel_id=question.channel_id, thread_ts=question.thread_root
    ):
        turns.append(Turn(role="user", text=earlier.text))
        turns.append(Turn(role="assistant", text=shown_text(session=session, answer=answer)))
    return tuple(turns)
