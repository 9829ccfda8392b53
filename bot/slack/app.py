"""Building the Bolt app and attaching Apprentice's listeners to it.

`create_app` makes a fresh `App` whose WebClient talks to `settings.slack_api_base` (Slack, or the
local emulator); `register` attaches the listeners to any `App`, which is how a team that already
runs Bolt adds Apprentice (`bot.register(app, settings)`).
"""

from __future__ import annotations

from slack_bolt import App
from slack_sdk import WebClient
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
)

from bot.settings import Settings
from bot.slack.channel_kinds import ChannelKinds
from bot.slack.dispatcher import AnswerDispatcher
from bot.slack.metrics import Metrics
from bot.slack.people import People
from bot.slack.services import Services


def make_client(settings: Settings) -> WebClient:
    # chat.update is rate limited (~1/s per message): wait and retry instead of dropping one
    return WebClient(
        token=settings.slack_bot_token,
        base_url=settings.slack_api_base,
        retry_handlers=[
            ConnectionErrorRetryHandler(),
            RateLimitErrorRetryHandler(max_retry_count=2),
        ],
    )


def create_app(settings: Settings, services: Services) -> App:
    """A Bolt app with every Apprentice listener (calls auth.test while it is built)."""
    app = App(signing_secret=settings.slack_signing_secret, client=make_client(settings))
    register(app, settings, services)
    return app


def register(app: App, settings: Settings | None = None, services: Services | None = None) -> App:
    """Attach Apprentice's listeners to `app`; builds the services from settings when not given."""
    from bot.slack.listeners import register_all

    if services is None:
        from bot.runtime import build_services, start_follower

        settings = settings or Settings()
        services = build_services(settings)
        start_follower(services, settings)
    settings = settings or services.settings
    if services.metrics is None:
        services.metrics = Metrics(queue_depth=services.queue_depth)
    if services.people is None:
        services.people = People(settings=settings, db=services.db, client=app.client)
    if services.channel_kinds is None:
        services.channel_kinds = ChannelKinds()
    if services.dispatcher is None:
        services.dispatcher = AnswerDispatcher(
            client=app.client,
            db=services.db,
            engine=services.engine,
            metrics=services.metrics,
            timeout_s=settings.answer_timeout_s,
            knowledge=lambda: services.knowledge,
            retrieval_k=settings.retrieval_k,
        )
    register_all(app, services)
    return app
