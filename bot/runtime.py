"""Putting the running bot together: database, model, engine, adapter follower, Slack app.

`build_bot(settings)` does what `apprentice run` needs, in order — database (marking training
runs of dead processes failed), model and engine, the adapter follower (every replica swaps to
the active version), the Slack app, the learning schedule — and `Bot.close()` undoes it in
reverse (a cycle this process runs is stopped; its run ends failed, nothing is promoted).
Parts written elsewhere (the adapter registry and follower, the learning hooks) are picked up
when present and skipped with a log line when not, so the bot runs at every stage.
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
    recover_interrupted_runs(settings, db)
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
    """`run_training(trigger, actor)`: start a cycle in the background and return its handle
    (`run_id`, `wait()`); raises `LockBusy` when one is running anywhere."""
    start_cycle = _optional("bot.learning.cycle", "start_cycle")
    if start_cycle is None:
        return None

    def run_training(trigger: str, actor: str | None = None):
        return start_cycle(settings=settings, db=db, trigger=trigger, actor=actor)

    return run_training


def _export_hook(settings: Settings, db):
    export = _optional("bot.learning.export", "export_dataset")
    if export is None:
        return None

    def export_dataset(user_id: str | None = None, channel_id: str | None = None):
        return export(settings=settings, db=db, user_id=user_id, channel_id=channel_id)

    return export_dataset


SCHEDULED_CYCLE = "bot.learning.cycle:scheduled_cycle"


def recover_interrupted_runs(settings: Settings, db) -> None:
    """Runs left "running" by a process that died (kill -9, power cut) are marked failed."""
    recover = _optional("bot.learning.cycle", "recover_interrupted_runs")
    if recover is not None:
        try:
            recover(db=db, settings=settings)
        except Exception:  # a start-up nicety: never keep the bot from answering
            log.exception("could not check for interrupted training runs")


def start_scheduler(settings: Settings):
    """The learning schedule (cron + verdict threshold), started; None when not installed.

    `settings` must be the ones the bot talks to Slack with: the cycle's report uses them.
    """
    build_scheduler = _optional("bot.scheduler", "build_scheduler")
    if build_scheduler is None or _optional("bot.learning.cycle", "scheduled_cycle") is None:
        log.info("learning schedule not installed: train with `apprentice train`")
        return None
    scheduler = build_scheduler(
        settings=settings, db_url=settings.database_url, run_cycle=SCHEDULED_CYCLE
    )
    scheduler.start()
    log.info(
        "learning schedule: cron %r, or after %d new expert verdicts (checked every %.0f s)",
        settings.train_cron or "off",
        settings.train_min_new_verdicts,
        settings.train_check_s,
    )
    return scheduler


def stop_learning(scheduler) -> None:
    """Stop the schedule, then any cycle this process runs (its run ends failed, the active
    version stays)."""
    if scheduler is not None:
        try:
            scheduler.shutdown(wait=False)
        except Exception:
            log.exception("could not stop the learning schedule")
    stop = _optional("bot.learning.cycle", "stop_running_cycles")
    if stop is not None:
        stop()


@dataclass
class Bot:
    settings: Settings
    services: Services
    app: App
    follower: Any = None
    scheduler: Any = None  # the learning schedule (APScheduler), None when off
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
        stop_learning(self.scheduler)
        self.scheduler = None
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
    registry = services.registry
    if registry is None:
        from bot.adapter_store.registry import AdapterRegistry

        registry = AdapterRegistry(db=services.db, root=settings.adapters_dir)
    try:
        follower = follower_cls(
            registry=registry, engine=services.engine, poll_s=settings.adapter_poll_s
        )
    except TypeError as exc:  # an API this build does not know: run without hot swaps
        log.warning("adapter follower not started: %s", exc)
        return None
    follower.start()
    return follower


def build_bot(
    settings: Settings, *, services: Services | None = None, schedule: bool = True
) -> Bot:
    """The running bot: services, the adapter follower, the Slack app and the schedule."""
    from bot.slack.app import create_app

    services = services or build_services(settings)
    follower = start_follower(services, settings)
    app = create_app(settings, services)
    scheduler = start_scheduler(services.settings) if schedule else None
    return Bot(
        settings=settings, services=services, app=app, follower=follower, scheduler=scheduler
    )
