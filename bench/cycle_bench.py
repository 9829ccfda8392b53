"""Benchmark the learning cycle on the real default model (SmolLM2-135M-Instruct).

    python bench/cycle_bench.py [--corrections 20] [--train-threads 1] [--serve-threads 0]

Measures, in one run and one process, side by side:
- the wall time of one learning cycle (`bot.learning.cycle.run_cycle`, the code the schedule
  runs: lease, snapshot, child process, evaluate, train, gate, publish) on N expert
  corrections of made-up team facts, stored as Slack verdicts in a fresh SQLite database;
- the serving latency (p50/p90 of one question, batch 1, 32 new tokens, `--gap` seconds
  apart) of an answer engine in this process: first with no cycle, then while the cycle's
  child trains, and the ratio.
Prints a markdown table. A script, not a test: several minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.engine.types import AnswerRequest  # noqa: E402
from bot.engine.worker import AnswerEngine  # noqa: E402
from bot.learning.cycle import start_cycle, training_threads  # noqa: E402
from bot.settings import Settings  # noqa: E402
from bot.store.db import open_database, session_scope  # noqa: E402
from bot.store.models import Answer, Question, Verdict  # noqa: E402

THINGS = [
    "deploy bot",
    "release train",
    "staging gateway",
    "billing service",
    "coffee machine",
    "analytics cluster",
    "feature flag service",
    "on-call rotation",
    "VPN gateway",
    "wiki",
    "build farm",
    "incident channel",
    "design system",
    "data warehouse",
    "pager tool",
    "load balancer",
    "secrets vault",
    "test lab",
    "mobile app",
    "status page",
]
NAMES = [
    "Marvin",
    "Lanternfish",
    "Heron",
    "Quillbox",
    "Bruno",
    "Tollgate",
    "Zephyr",
    "Okapi",
    "Brambles",
    "Cinder",
    "Juniper",
    "Marlin",
    "Pebble",
    "Saffron",
    "Tundra",
    "Wicket",
    "Yarrow",
    "Ember",
    "Nimbus",
    "Falcon",
]
PROBE = AnswerRequest(question="What is the capital of France?", max_new_tokens=32)


def seed_corrections(db, count: int) -> None:
    """`count` answered questions in a public channel, each corrected by an expert."""
    with session_scope(db) as session:
        for i in range(count):
            thing, name = THINGS[i % len(THINGS)], NAMES[i % len(NAMES)]
            question = Question(
                source="mention",
                channel_id="CGENERAL",
                channel_type="channel",
                user_id="UALICE",
                text=f"What is the {thing} called?",
            )
            session.add(question)
            session.flush()
            answer = Answer(question_id=question.id, text="I am not sure.", state="done")
            session.add(answer)
            session.flush()
            session.add(
                Verdict(
                    answer_id=answer.id,
                    kind="correct",
                    author_id="UEXPERT",
                    text=f"The {thing} is called {name}-{i + 3}.",
                )
            )


def latencies(engine, *, until, minimum: int, gap: float) -> list[float]:
    """Ask the probe question one at a time, `gap` seconds apart, until `until()` (and at
    least `minimum` times)."""
    seconds = []
    while len(seconds) < minimum or not until():
        started = time.perf_counter()
        engine.submit(PROBE).result()
        seconds.append(time.perf_counter() - started)
        if gap and not until():
            time.sleep(gap)
    return seconds


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corrections", type=int, default=20)
    parser.add_argument("--train-threads", type=int, default=0, help="0 = half the cores")
    parser.add_argument("--serve-threads", type=int, default=0, help="0 = torch's default")
    parser.add_argument("--idle-samples", type=int, default=12)
    parser.add_argument(
        "--gap",
        type=float,
        default=1.0,
        help="seconds between questions (a busy team; 0 = back to back, which leaves a "
        "nice-19 training process almost no CPU)",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cycle-bench-"))
    settings = Settings(
        _env_file=None,
        database_url=f"sqlite:///{work / 'apprentice.db'}",
        adapters_dir=work / "adapters",
        device="cpu",
        threads=args.serve_threads,
        train_threads=args.train_threads,
        admin_channel="",  # no Slack here: the report is not posted
    )
    db = open_database(settings.database_url)
    seed_corrections(db, args.corrections)
    engine = AnswerEngine.from_settings(settings).start()
    engine.submit(PROBE).result()  # warm-up

    idle = latencies(engine, until=lambda: True, minimum=args.idle_samples, gap=args.gap)

    started = time.perf_counter()
    handle = start_cycle(settings=settings, db=db, trigger="bench", report=False)
    finished = threading.Event()
    threading.Thread(target=lambda: (handle.wait(), finished.set()), daemon=True).start()
    busy = latencies(engine, until=finished.is_set, minimum=3, gap=args.gap)
    outcome = handle.wait()
    cycle_s = time.perf_counter() - started
    engine.stop()

    m = outcome.metrics
    print(f"\n## Learning cycle, {args.corrections} corrections (real model, this machine)\n")
    print("| measure | value |\n| --- | --- |")
    print(f"| cycle wall time (start to promoted/refused) | {cycle_s:.0f} s |")
    print(f"| outcome | {outcome.summary()} |")
    if "steps" in m:
        print(f"| training | {m['steps']} steps in {m['train_seconds']:.0f} s |")
        print(
            f"| fact recall (all / trained / held out) | {m['recall_before']:.0%} -> "
            f"{m['recall']:.0%} / {m['recall_train']:.0%} / "
            f"{'-' if m['recall_held_out'] is None else format(m['recall_held_out'], '.0%')} |"
        )
        print(f"| regression | {m['regression_before']:.0%} -> {m['regression']:.0%} |")
    print(
        f"| training process | {training_threads(settings)} thread(s), nice {settings.train_nice} |"
    )
    print(f"| serving load | one question at a time, {args.gap:g} s apart |")
    print(f"| serving p50 idle ({len(idle)} answers) | {p(idle, 0.5):.2f} s |")
    print(f"| serving p50 during the cycle ({len(busy)} answers) | {p(busy, 0.5):.2f} s |")
    print(f"| serving p90 idle / during | {p(idle, 0.9):.2f} s / {p(busy, 0.9):.2f} s |")
    print(f"| p50 ratio (during / idle) | {p(busy, 0.5) / p(idle, 0.5):.2f}x |")


if __name__ == "__main__":
    main()
