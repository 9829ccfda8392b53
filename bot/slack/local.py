"""The bot wired to the local Slack emulator over real HTTP: for tests, benchmarks and a sandbox.

Everything is real but Slack: the emulator serves the Web API and delivers signed events to
the bot's own HTTP server (`bot.web`), exactly as Slack would. Build it with an engine (or let
it load one from the settings) and a database URL in the settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bot.settings import Settings
from bot.slack.services import Services


@dataclass
class LocalSlack:
    settings: Settings
    services: Services
    emulator: Any  # bot.emulator.SlackEmulator
    app: Any
    server: Any  # bot.web.HttpServer

    @classmethod
    def start(
        cls,
        settings: Settings,
        *,
        engine=None,
        retrieval: bool = False,
        emulator_options: dict | None = None,
        **hooks,
    ) -> LocalSlack:
        """Start the emulator, the engine (unless given), the app and its HTTP server.

        Retrieval is off unless `retrieval=True` (a knowledge base built from the settings, as
        `apprentice run` builds it) or a `knowledge=` base is passed in `hooks`.
        """
        from bot.emulator import SlackEmulator
        from bot.slack.app import create_app
        from bot.store import open_database
        from bot.web import create_wsgi_app, serve

        emulator = SlackEmulator(
            signing_secret=settings.slack_signing_secret,
            bot_token=settings.slack_bot_token,
            **(emulator_options or {}),
        ).start()
        settings = settings.model_copy(update={"slack_api_url": emulator.api_url})
        if engine is None:
            from bot.engine.worker import AnswerEngine

            engine = AnswerEngine.from_settings(settings).start()
        db = open_database(settings.database_url)
        if retrieval and hooks.get("knowledge") is None:
            from bot.runtime import build_knowledge

            hooks["knowledge"] = build_knowledge(settings, db=db)
        services = Services(settings=settings, db=db, engine=engine, **hooks)
        app = create_app(settings, services)
        server = serve(create_wsgi_app(app, services), host="127.0.0.1", port=0)
        emulator.events_url = f"{server.url}/slack/events"
        return cls(settings=settings, services=services, emulator=emulator, app=app, server=server)

    def close(self) -> None:
        self.server.shutdown()
        if hasattr(self.services.engine, "stop"):
            self.services.engine.stop()
        self.services.close()
        self.emulator.stop()
        self.services.db.dispose()

    def __enter__(self) -> LocalSlack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
