"""Prometheus metrics for one bot instance, on their own registry.

A registry per instance (not prometheus_client's global one) lets tests and `bot.register`
build several apps in one process without "Duplicated timeseries" errors.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, *, queue_depth: Callable[[], float] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.questions = Counter(
            "apprentice_questions", "Questions received", ["source"], registry=self.registry
        )
        self.answers = Counter(
            "apprentice_answers", "Answers finished", ["state"], registry=self.registry
        )
        self.verdicts = Counter(
            "apprentice_verdicts", "Verdicts recorded", ["kind"], registry=self.registry
        )
        self.skipped = Counter(
            "apprentice_events_skipped",
            "Messages not answered: duplicate (a retried event) or not_a_question",
            ["reason"],
            registry=self.registry,
        )
        self.answer_latency = Histogram(
            "apprentice_answer_latency_seconds",
            "From the question's arrival to the final answer",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "apprentice_engine_queue_depth",
            "Questions waiting for the engine",
            registry=self.registry,
        )
        if queue_depth is not None:
            self.queue_depth.set_function(queue_depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
