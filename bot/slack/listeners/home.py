"""App Home: this week's questions, approval and correction rates, pending reviews, adapter."""

from __future__ import annotations

from datetime import timedelta

from slack_bolt import App

from bot.slack import blocks, manifest_spec
from bot.slack.services import Services
from bot.store import session_scope
from bot.store.models import utcnow
from bot.store.stats import pending_reviews, review_stats


def home_summary(*, services: Services, user_id: str) -> blocks.HomeSummary:
    with session_scope(services.db) as session:
        stats = review_stats(session=session, since=utcnow() - timedelta(days=7))
        waiting = [
            (question.text, f"<#{question.channel_id}>" if question.channel_id else "")
            for question, _ in pending_reviews(session=session, limit=5)
        ]
    return blocks.HomeSummary(
        questions_this_week=stats.questions,
        answers_this_week=stats.answers,
        approval_rate=stats.approval_rate,
        correction_rate=stats.correction_rate,
        pending_reviews=stats.pending_reviews,
        active_adapter=services.active_version(),
        pending_examples=tuple(waiting),
        is_expert=services.people.is_expert(user_id),
    )


def register(app: App, services: Services) -> None:
    @app.event(manifest_spec.APP_HOME_OPENED)
    def on_home_opened(event, client):
        if event.get("tab", "home") != "home":
            return
        user = event["user"]
        client.views_publish(
            user_id=user, view=blocks.home_view(home_summary(services=services, user_id=user))
        )
