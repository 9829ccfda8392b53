"""Putting the running bot together: database, model, engine, adapter follower, Slack app.

`build_bot(settings)` does what `apprentice run` needs, in order — database (marking training
runs of dead processes failed), model and engine, the adapter follower (every replica swaps to
the active version), the Slack app, the learning schedule — and `Bot.close()` undoes it in
reverse (a cycle this process runs is stopped; its run ends failed, nothing is promoted).
`attach_learning(services)` gives any `Services` (the sandbox's and the tests' too) the same
adapter registry and learning hooks `apprentice run` has.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from slack_bolt import App

from bot.settings import Settings
from bot.slack.services import Services

log = logging.getLogger(__name__)


def build_services(settings: Settings) -> Services:
    """Open the database, load the model and start the engine, with the learning hooks."""
    from bot.engine.worker import AnswerEngine
    from bot.store import open_database

    db = open_database(settings.database_url)
    recover_interrupted_runs(settings, db)
    engine = AnswerEngine.from_settings(settings).start()
    services = Services(
        settings=settings, db=db, engine=engine, knowledge=build_knowledge(settings, db=db)
    )
    return attach_learning(services)


def attach_learning(services: Services) -> Services:
    """Give `services` the adapter registry and the hooks `/apprentice train` and
    `/apprentice export` call: a cycle in a child process, a scrubbed JSONL export."""
    from bot.adapter_store.registry import AdapterRegistry

    services.registry = AdapterRegistry(db=services.db, root=services.settings.adapters_dir)
    services.run_training = training_hook(services.settings, services.db)
    services.export_dataset = export_hook(services.settings, services.db)
    return services


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


def training_hook(settings: Settings, db):
    """`run_training(trigger, actor)`: start a cycle in the background and return its handle
    (`run_id`, `wait()`); raises `LockBusy` when one is running anywhere."""
    from bot.learning.cycle import start_cycle

    def run_training(trigger: str, actor: str | None = None):
        return start_cycle(settings=settings, db=db, trigger=trigger, actor=actor)

    return run_training


def export_hook(settings: Settings, db):
    """`export_dataset(user_id, channel_id)`: the training set as scrubbed chat JSONL."""
    from bot.learning.export import export_dataset as export

    def export_dataset(user_id: str | None = None, channel_id: str | None = None):
        return export(settings=settings, db=db, user_id=user_id, channel_id=channel_id)

    return export_dataset


SCHEDULED_CYCLE = "bot.learning.cycle:scheduled_cycle"


def recover_interrupted_runs(settings: Settings, db) -> None:
    """Runs left "running" by a process that died (kill -9, power cut) are marked failed."""
    from bot.learning.cycle import recover_interrupted_runs as recover

    try:
        recover(db=db, settings=settings)
    except Exception:  # a start-up nicety: never keep the bot from answering
        log.exception("could not check for interrupted training runs")


def start_scheduler(settings: Settings):
    """The learning schedule (cron + verdict threshold), started.

    `settings` must be the ones the bot talks to Slack with: the cycle's report uses them.
    """
    from bot.scheduler import build_scheduler

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
    from bot.learning.cycle import stop_running_cycles

    stop_running_cycles()


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
    """Every replica follows the active-version pointer and swaps its engine to it."""
    from bot.adapter_store.follower import AdapterFollower
    from bot.adapter_store.registry import AdapterRegistry

    registry = services.registry or AdapterRegistry(db=services.db, root=settings.adapters_dir)
    follower = AdapterFollower(
        registry=registry, engine=services.engine, poll_s=settings.adapter_poll_s
    )
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
