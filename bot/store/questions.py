"""Questions and answers: what was asked, where, and what the bot replied.

An answer row is written *pending* the moment the "thinking…" reply is posted, so a crash or an
engine error never leaves a message that the database does not know about; the dispatcher later
marks it done (with text, adapter version and latency) or failed (with the error shown in Slack).

Slack retries an event it thinks we missed. `claim_event` inserts the event id into
`slack_event` first: the primary key makes a second delivery fail with IntegrityError, so a
retried event can never produce a second answer, even across replicas.
"""

from __future__ import annotations

from sqlmodel import Session, col, select

from bot.store.models import Answer, Question, SlackEvent


def claim_event(*, session: Session, event_id: str) -> None:
    """Record `event_id` as seen; raises sqlalchemy's IntegrityError when it already was."""
    session.add(SlackEvent(event_id=event_id[:64]))
    session.flush()


def record_question(
    *,
    session: Session,
    source: str,
    text: str,
    user_id: str | None = None,
    channel_id: str | None = None,
    channel_type: str | None = None,
    team_id: str | None = None,
    thread_ts: str | None = None,
    message_ts: str | None = None,
    event_id: str | None = None,
) -> Question:
    question = Question(
        source=source,
        text=text,
        user_id=user_id,
        channel_id=channel_id,
        channel_type=channel_type,
        team_id=team_id,
        thread_ts=thread_ts,
        message_ts=message_ts,
        event_id=event_id,
    )
    session.add(question)
    session.flush()
    return question


def record_pending_answer(
    *, session: Session, question_id: int, channel_id: str | None, message_ts: str | None
) -> Answer:
    """The row behind a "thinking…" message; its text is filled in when the engine finishes."""
    answer = Answer(
        question_id=question_id,
        text="",
        state="pending",
        channel_id=channel_id,
        message_ts=message_ts,
    )
    session.add(answer)
    session.flush()
    return answer


def finish_answer(
    *,
    session: Session,
    answer_id: int,
    text: str,
    adapter_version: str | None,
    latency_ms: int,
    truncated: bool = False,
) -> Answer:
    answer = session.get(Answer, answer_id)
    if answer is None:
        raise LookupError(f"answer {answer_id} does not exist")
    answer.text = text
    answer.adapter_version = adapter_version
    answer.latency_ms = latency_ms
    answer.truncated = truncated
    answer.state = "done"
    answer.error = None
    session.add(answer)
    session.flush()
    return answer


def fail_answer(
    *, session: Session, answer_id: int, error: str, latency_ms: int | None = None
) -> Answer:
    answer = session.get(Answer, answer_id)
    if answer is None:
        raise LookupError(f"answer {answer_id} does not exist")
    answer.state = "failed"
    answer.error = error
    answer.latency_ms = latency_ms
    session.add(answer)
    session.flush()
    return answer


def get_answer(*, session: Session, answer_id: int) -> Answer | None:
    return session.get(Answer, answer_id)


def get_question(*, session: Session, question_id: int) -> Question | None:
    return session.get(Question, question_id)


def thread_exchanges(
    *, session: Session, channel_id: str, thread_ts: str
) -> list[tuple[Question, Answer]]:
    """The finished question/answer pairs of one Slack thread, oldest first."""
    rows = session.exec(
        select(Question, Answer)
        .join(Answer, col(Answer.question_id) == col(Question.id))
        .where(Question.channel_id == channel_id, Question.thread_ts == thread_ts)
        .where(Answer.state == "done")
        .order_by(col(Question.created_at), col(Question.id))
    ).all()
    return [(question, answer) for question, answer in rows]


def bot_answered_thread(*, session: Session, channel_id: str, thread_ts: str) -> bool:
    """Whether the bot has answered in this thread (so a reply there is a follow-up)."""
    row = session.exec(
        select(Answer.id)
        .join(Question, col(Answer.question_id) == col(Question.id))
        .where(Question.channel_id == channel_id, Question.thread_ts == thread_ts)
        .limit(1)
    ).first()
    return row is not None
