"""How much an adapter learns and forgets on the real model, for a training config.

    python bench/forgetting_probe.py                          # the defaults, the test's 12 facts
    python bench/forgetting_probe.py --set '{"anchor_weight": 0}' --set '{"anchor_weight": 5}'
    python bench/forgetting_probe.py --facts 20               # 20 facts of bench/data

Each `--set` is a JSON object of `TrainingConfig` overrides; every config trains one version
through `bot.learning.pipeline.train_new_version` (the same path as `apprentice train`, not
promoted) in a scratch store and prints one row: steps, recall of the trained facts before
and after, the regression score (20 general questions) before and after, the held-out loss
against the base model's, and the gate's decision. The facts are the 12 of
tests/test_real_model.py, or the first N of bench/data/team_facts.jsonl. A script, not a test:
a few minutes per config on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.engine.loading import load_from_settings  # noqa: E402
from bot.learning.config import TrainingConfig  # noqa: E402
from bot.learning.examples import Example  # noqa: E402
from bot.learning.pipeline import train_new_version  # noqa: E402
from bot.settings import Settings  # noqa: E402


def facts(count: int | None) -> list[Example]:
    if count is None:
        from tests.test_real_model import TEAM_FACTS

        return [Example(q, a) for q, a in TEAM_FACTS]
    rows = [
        json.loads(line)
        for line in (ROOT / "bench" / "data" / "team_facts.jsonl").read_text().splitlines()
        if line.strip()
    ]
    return [Example(row["question"], row["answer"]) for row in rows[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], help="JSON TrainingConfig overrides")
    parser.add_argument("--facts", type=int, help="first N facts of bench/data (default: 12)")
    args = parser.parse_args()
    configs = [json.loads(text) for text in args.set] or [{}]
    examples = facts(args.facts)
    cache = Settings(_env_file=None).model_cache_dir
    print("| overrides | facts | steps | recall trained | regression | held-out loss | gate |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for overrides in configs:
        with tempfile.TemporaryDirectory(prefix="forgetting-") as scratch:
            settings = Settings(
                _env_file=None,
                database_url=f"sqlite:///{Path(scratch) / 'probe.db'}",
                adapters_dir=Path(scratch) / "adapters",
                model_cache_dir=cache,
            )
            report = train_new_version(
                settings=settings,
                examples=examples,
                loaded=load_from_settings(settings),
                progress=False,
                config=TrainingConfig(**overrides),
                promote=False,
                trigger="probe",
            )
        m = report.metrics
        loss = (
            f"{m['eval_loss_base']:.2f} -> {m['eval_loss']:.2f}"
            if m.get("eval_loss") is not None
            else "-"
        )
        print(
            f"| {json.dumps(overrides)} | {m['train_examples']}+{m['held_out_examples']} "
            f"| {m['steps']} | {m['recall_train_before']:.0%} -> {m['recall_train']:.0%} "
            f"| {m['regression_before']:.0%} -> {m['regression']:.0%} | {loss} "
            f"| {'passed' if m['gate_passed'] else 'refused'} |",
            flush=True,
        )
        if m.get("regression_lost"):
            print(f"|  forgot: {'; '.join(m['regression_lost'])} |||||||", flush=True)


if __name__ == "__main__":
    main()
