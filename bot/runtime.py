"""Putting the running bot together: database, model, engine, adapter follower, Slack app.

`build_bot(settings)` does what `apprentice run` needs, in order, and `Bot.close()` undoes it in
reverse. Parts written elsewhere (the adapter registry and follower, the learning hooks) are
picked up when present and skipped with a log line when not, so the bot runs at every stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from slack_bolt import App

from bot.settings import Settings
from bot.slack.services import Services

log = logging.getLogger(__name__)


def _optional(module: str, name: str):
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError):
        return None


def build_services(settings: Settings) -> Services:
    """Open the database, load the model and start the engine; the learning hooks if present."""
    from bot.engine.worker import AnswerEngine
    from bot.store import open_database

    db = open_database(settings.database_url)
    engine = AnswerEngine.from_settings(settings).start()
    registry = None
    registry_cls = _optional("bot.adapter_store.registry", "AdapterRegistry")
    if registry_cls is not None:
        registry = registry_cls(db=db, root=settings.adapters_dir)
    else:
        log.info("adapter store not installed: /apprentice adapters and rollback are off")
    return Services(
        settings=settings,
        db=db,
        engine=engine,
        registry=registry,
        run_training=_training_hook(settings, db),
        export_dataset=_export_hook(settings, db),
        knowledge=build_knowledge(settings, db=db),
    )


def build_knowledge(settings: Settings, *, db):
    """The knowledge base the answers retrieve from, loaded and filled; None when turned off.

    Filled here rather than on the first question so the first asker does not pay for embedding
    every approved answer. A missing embedding model turns retrieval off with a warning instead
    of keeping the bot from starting.
    """
    if not settings.retrieval_enabled:
        log.info(
            "retrieval is off (APPRENTICE_RETRIEVAL_ENABLED=false): answers use the model alone"
        )
        return None
    from bot.knowledge import EmbedderUnavailable, KnowledgeBase, load_embedder

    try:
        embedder = load_embedder()
    except EmbedderUnavailable as exc:
        log.warning("retrieval is off: %s", exc)
        return None
    knowledge = KnowledgeBase(
        db=db,
        embedder=embedder,
        threshold=settings.retrieval_threshold,
        exact_threshold=settings.retrieval_exact_threshold,
    )
    report = knowledge.refresh()
    log.info("knowledge base: %d approved answers (%.1f s)", report.entries, report.seconds)
    return knowledge


def _training_hook(settings: Settings, db):
    run_cycle = _optional("bot.learning.cycle", "run_cycle")
    if run_cycle is None:
        return None

    def run_training(trigger: str, actor: str | None = None):
        return run_cycle(settings=settings, db=db, trigger=trigger, actor=actor)

    return run_training


def _export_hook(settings: Settings, db):
    export = _optional("bot.learning.export", "export_dataset")
    if export is None:
        return None
    return lambda: export(settings=settings, db=db)


@dataclass
class Bot:
    settings: Settings
    services: Services
    app: App
    follower: Any = None
    _servers: list = field(default_factory=list)

    def serve_http(self, host: str | None = None, port: int | None = None):
        """Serve /slack/events, /healthz and /metrics in a thread; returns the server."""
        from bot.web import create_wsgi_app, serve

        server = serve(
            create_wsgi_app(self.app, self.services),
            host=host if host is not None else self.settings.host,
            port=port if port is not None else self.settings.port,
        )
        self._servers.append(server)
        return server

    def serve_socket_mode(self, *, block: bool = True):
        """Connect to Slack over Socket Mode (SLACK_APP_TOKEN); blocks unless told not to."""
        from slack_bolt.adapter.socket_mode import SocketModeHandler

        handler = SocketModeHandler(self.app, app_token=self.settings.slack_app_token)
        self._servers.append(handler)
        if block:
            handler.start()
        else:
            handler.connect()
        return handler

    def close(self) -> None:
        for server in reversed(self._servers):
            try:
                if hasattr(server, "shutdown"):
                    server.shutdown()
                else:
                    server.close()
            except Exception:
                log.exception("could not stop %r", server)
        self._servers.clear()
        if self.follower is not None:
            self.follower.stop()
        engine = self.services.engine
        if hasattr(engine, "stop"):
            engine.stop()  # fails what is queued: the dispatcher shows it, not "thinking…"
        self.services.close()
        self.services.db.dispose()


def start_follower(services: Services, settings: Settings):
    follower_cls = _optional("bot.adapter_store.follower", "AdapterFollower")
    if follower_cls is None:
        log.info("adapter follower not installed: the bot keeps the adapter it started with")
        return None
    try:
        follower = follower_cls(
            db=services.db,
            engine=services.engine,
            root=settings.adapters_dir,
            poll_s=settings.adapter_poll_s,
        )
        follower.start()
        return follower
    except TypeError as exc:  # an API this build does not know: run without hot swaps
        log.warning("adapter follower not started: %s", exc)
        return None


def build_bot(settings: Settings, *, services: Services | None = None) -> Bot:
    from bot.slack.app import create_app

    services = services or build_services(settings)
    follower = start_follower(services, settings)
    app = create_app(settings, services)
    return Bot(settings=settings, services=services, app=app, follower=follower)
