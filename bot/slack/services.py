"""Services: what the listeners need besides Slack, built once and handed to `register`.

`engine` is anything with `submit(request, on_partial=...) -> Future[AnswerResult]` and
`active_version` (the real one is `bot.engine.worker.AnswerEngine`; the Slack side never imports
it). `run_training(trigger, actor)` and `export_dataset()` are hooks the learning side provides;
while they are None the admin commands say so instead of pretending. `knowledge` is the
`bot.knowledge.KnowledgeBase` the dispatcher searches before each answer; None turns retrieval off
and everything else works as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from bot.settings import Settings


@dataclass
class Services:
    settings: Settings
    db: Engine
    engine: Any
    registry: Any = None  # bot.adapter_store.registry.AdapterRegistry
    run_training: Callable[..., Any] | None = None
    export_dataset: Callable[[], Any] | None = None
    knowledge: Any = None  # bot.knowledge.KnowledgeBase; None = retrieval off
    # built by `bot.slack.app.register` (they need the app's WebClient)
    dispatcher: Any = field(default=None, repr=False)
    people: Any = field(default=None, repr=False)
    metrics: Any = field(default=None, repr=False)
    channel_kinds: Any = field(default=None, repr=False)

    def active_version(self) -> str | None:
        """The adapter the bot answers with: the registry's pointer, else the engine's."""
        if self.registry is not None:
            try:
                return self.registry.active_version()
            except Exception:  # the database being down must not break App Home
                pass
        return getattr(self.engine, "active_version", None)

    def queue_depth(self) -> int:
        stats = getattr(self.engine, "stats", None)
        if callable(stats):
            try:
                return int(stats().get("queue_depth", 0))
            except Exception:
                return 0
        return 0

    def close(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.close()
