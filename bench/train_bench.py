"""Benchmark one learning cycle on the real default model (SmolLM2-135M-Instruct).

    python bench/train_bench.py [--lr 1e-3] [--max-steps N] [--general-mix 20] [--batch-size 4]
                                [--recall-check-steps 5] [--threads 0] [--json PATH]

Trains the 12 made-up team facts of `tests/test_real_model.py` (10 trained, 2 held out by the
stable split) through `bot.learning.pipeline.train_new_version`, the path `apprentice train
--data` takes, on a throw-away database and adapter folder, and prints a markdown table:
training time, steps, fact recall on the trained questions before and after, the regression
score (20 general gate questions) before and after, and whether the gate promoted the version.
Options override `TrainingConfig` fields, so the bench also measures other settings. A script,
not a test: a few minutes on 2 CPU cores. The base model's replay answers are cached in the
model cache folder (the first run on a machine generates them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_real_model import TEAM_FACTS  # noqa: E402  (the test's made-up facts)

from bot.learning.config import TrainingConfig  # noqa: E402
from bot.learning.examples import Example  # noqa: E402
from bot.settings import Settings  # noqa: E402

OPTIONS = {  # flag -> TrainingConfig field
    "lr": "learning_rate",
    "max_steps": "max_steps",
    "general_mix": "general_mix",
    "batch_size": "batch_size",
    "recall_check_steps": "recall_check_steps",
    "weight_decay": "weight_decay",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--general-mix", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--recall-check-steps", type=int)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = default")
    parser.add_argument("--json", type=Path, help="also write the metrics here")
    args = parser.parse_args()

    from bot.engine.loading import load_base_model
    from bot.learning.pipeline import train_new_version
    from bot.store.db import open_database

    given = {flag: getattr(args, flag) for flag in OPTIONS}
    overrides = {OPTIONS[flag]: value for flag, value in given.items() if value is not None}
    config = TrainingConfig(**overrides)
    examples = [Example(q, a) for q, a in TEAM_FACTS]
    with tempfile.TemporaryDirectory(prefix="train-bench-") as work:
        work = Path(work)
        settings = Settings(
            _env_file=None,
            database_url=f"sqlite:///{work / 'bench.db'}",
            adapters_dir=work / "adapters",
        )
        started = time.perf_counter()
        loaded = load_base_model(
            settings.base_model,
            device="cpu",
            cache_dir=settings.model_cache_dir,
            threads=args.threads,
        )
        report = train_new_version(
            settings=settings,
            examples=examples,
            trigger="bench",
            loaded=loaded,
            progress=False,
            config=config,
            db=open_database(settings.database_url),
        )
        total = time.perf_counter() - started
    m = report.metrics
    rows = [
        ("model", loaded.name),
        ("config", json.dumps(overrides) if overrides else "defaults"),
        ("facts trained / held out", f"{m['train_examples']} / {m['held_out_examples']}"),
        ("general examples mixed in", str(m["general_examples"])),
        ("steps (planned)", f"{m['steps']} ({m['planned_steps']})"),
        ("training time", f"{m['train_seconds']:.0f} s"),
        ("cycle time (load, evaluate, train, gate)", f"{total:.0f} s"),
        ("recall, trained facts", f"{m['recall_train_before']:.0%} -> {m['recall_train']:.0%}"),
        ("regression (gate questions)", f"{m['regression_before']:.0%} -> {m['regression']:.0%}"),
        ("gate", "promoted" if report.promoted else "refused"),
    ]
    print("\n| measure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    for reason in report.reasons:
        print(f"- {reason}")
    if args.json:
        args.json.write_text(json.dumps({**m, "cycle_seconds": total, "promoted": report.promoted}))


if __name__ == "__main__":
    main()
