"""Benchmark how well Apprentice learns made-up team facts: retrieval, the adapter, and both.

    python bench/learning_bench.py [--facts N | --quick] [--base-model NAME_OR_PATH | --tiny]
                                   [--out bench/LEARNING.md]

Experts correct the bot through the same code path as Slack: the bot runs behind
`bot.slack.local.LocalSlack` (real Bolt over signed HTTP, the emulator as Slack, SQLite in a
temp folder), a user @-mentions it with each fact's original question, and an expert clicks
"✏️ Correct" and submits the modal with the fact. Then one learning cycle runs
(`bot.learning.cycle.run_cycle`, the code the schedule runs: child process, gate, publish).

Every question is then asked through Slack again under four conditions, toggled on the one
running bot so that nothing else differs:

- base model: no knowledge base (`services.knowledge` set to None: the dispatcher reads it),
  no adapter;
- retrieval only: the knowledge base on (an original question is answered verbatim from the
  correction as an exact repeat; a paraphrase gets the correction as a note), no adapter;
- adapter only: the cycle's adapter swapped into the engine (`engine.set_adapter`), no
  retrieval. If the gate refused the candidate its folder is still evaluated when it exists,
  and the table says so;
- both.

Scores: the share of paraphrases and of originals whose answer carries the fact
(`bot.learning.evaluate.carries_fact`), and the share of the gate's general-knowledge questions
answered right (`bot.learning.regression.gate_items`, `has_keyword`), which shows forgetting.

Questions of one condition are posted together so the engine batches them. A script, not a
test: with the real default model on 2 CPU cores the cycle alone takes many minutes; `--tiny`
checks the plumbing in about a minute with a random tiny model (its scores are noise).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.learning.cycle import run_cycle  # noqa: E402
from bot.learning.evaluate import carries_fact, has_keyword  # noqa: E402
from bot.learning.regression import gate_items  # noqa: E402
from bot.settings import Settings  # noqa: E402
from bot.slack.local import LocalSlack  # noqa: E402
from bot.slack.local_flows import correct_answer  # noqa: E402
from bot.store import session_scope  # noqa: E402
from bot.store.models import Answer  # noqa: E402

FACTS_FILE = Path(__file__).resolve().parent / "data" / "team_facts.jsonl"
USER, EXPERT, ADMIN = "UALICE", "UEXPERT", "UADMIN"
CHANNEL = "CGENERAL"
QUICK_FACTS = 10
# the tiny model learns a short answer only at a high learning rate (as in tests/test_cycle.py)
TINY_TRAINING = {
    "max_steps": 60,
    "learning_rate": 1e-2,
    "general_mix": 0,
    "eval_fraction": 0.0,
    "min_steps": 1,
}
CONDITIONS = (
    ("base model", False, False),
    ("retrieval only", True, False),
    ("adapter only", False, True),
    ("retrieval + adapter", True, True),
)


@dataclass(frozen=True)
class Fact:
    id: str
    question: str
    answer: str
    paraphrases: tuple[str, ...]


def load_facts(path: Path = FACTS_FILE) -> list[Fact]:
    facts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            facts.append(Fact(row["id"], row["question"], row["answer"], tuple(row["paraphrases"])))
    return facts


def _has_buttons(message: dict) -> bool:
    return any(b.get("type") == "actions" for b in message.get("blocks") or [])


def _answer_id(message: dict) -> int:
    actions = next(b for b in message["blocks"] if b["type"] == "actions")
    return int(actions["elements"][0]["value"])


def _stored_text(bot: LocalSlack, message: dict) -> str:
    with session_scope(bot.services.db) as session:
        return session.get(Answer, _answer_id(message)).text or ""


def ask_all(bot: LocalSlack, questions: list[str], *, timeout: float) -> list[tuple[dict, str]]:
    """Post every question as a mention at once (the engine batches them); wait for each
    answer card; return (message, stored answer text) in question order."""
    emulator = bot.emulator
    posted = [
        emulator.post_message(user=USER, channel=CHANNEL, text=f"<@UBOT> {q}") for q in questions
    ]
    answers = []
    for ts in posted:
        message = emulator.wait_for_message(
            channel=CHANNEL, thread_ts=ts, user="UBOT", predicate=_has_buttons, timeout=timeout
        )
        answers.append((message, _stored_text(bot, message)))
    return answers


def use_retrieval(bot: LocalSlack, knowledge) -> None:
    """Turn retrieval on (a knowledge base) or off (None) in the running bot; the dispatcher
    reads `services.knowledge` for every question."""
    bot.services.knowledge = knowledge


def share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def measure(bot: LocalSlack, facts: list[Fact], *, timeout: float) -> dict[str, float]:
    """Ask paraphrases, originals and the general questions; score each group."""
    general = gate_items()
    paraphrases = [(f, p) for f in facts for p in f.paraphrases]
    questions = (
        [p for _, p in paraphrases] + [f.question for f in facts] + [g.question for g in general]
    )
    texts = [text for _, text in ask_all(bot, questions, timeout=timeout)]
    n_para, n_orig = len(paraphrases), len(facts)
    para = [
        carries_fact(text, expected=f.answer, question=p)
        for (f, p), text in zip(paraphrases, texts[:n_para], strict=True)
    ]
    orig = [
        carries_fact(text, expected=f.answer, question=f.question)
        for f, text in zip(facts, texts[n_para : n_para + n_orig], strict=True)
    ]
    gen = [
        has_keyword(text, g.keywords)
        for g, text in zip(general, texts[n_para + n_orig :], strict=True)
    ]
    return {"paraphrases": share(para), "originals": share(orig), "general": share(gen)}


def build_settings(args, tmp: Path) -> Settings:
    overrides = {
        "slack_bot_token": "xoxb-learning-bench",
        "slack_signing_secret": "learning-bench-secret",
        "database_url": f"sqlite:///{tmp / 'bench.db'}",
        "adapters_dir": tmp / "adapters",
        "admins": [ADMIN],
        "experts": [EXPERT],
        "admin_channel": "",
        "train_cron": "",
        "retrieval_enabled": True,
        "max_new_tokens": args.max_new_tokens,
    }
    if args.base_model:
        overrides["base_model"] = args.base_model
    if args.device:
        overrides["device"] = args.device
    if args.tiny:
        from tests.support.tiny_model import build_tiny_model

        overrides["base_model"] = str(build_tiny_model(tmp / "tiny-model"))
        overrides["train_overrides"] = TINY_TRAINING
        overrides["train_threads"] = 1
    return Settings(**overrides)


def start_bot(settings: Settings, *, tiny: bool) -> LocalSlack:
    engine = None
    if tiny:  # the random tiny model needs blank tokens suppressed to say anything at all
        from tests.support.tiny_model import tiny_engine

        engine = tiny_engine(settings)
    bot = LocalSlack.start(settings, engine=engine, retrieval=True)
    for user in (USER, EXPERT, ADMIN):
        bot.emulator.add_user(user, name=user.lower())
    bot.emulator.add_channel(CHANNEL, name="general", members=[USER, EXPERT, ADMIN, "UBOT"])
    if bot.services.knowledge is None:
        bot.close()
        raise SystemExit("retrieval is off (no embedding model?): the benchmark needs it")
    return bot


def render(
    *, results: dict, facts: int, adapter_note: str, settings: Settings, command: str, wall: float
) -> str:
    lines = [
        "# Learning benchmark: what Apprentice knows after expert corrections",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()} · {platform.platform()} · {platform.machine()}"
        f" · python {platform.python_version()}",
        f"- command: `{command}`",
        f"- base model: `{settings.base_model}` · device {settings.device}"
        f" · max_new_tokens {settings.max_new_tokens}",
        f"- facts: {facts} (each corrected once through the ✏️ modal; scored on 3 paraphrases"
        " and the original question)",
        f"- adapter: {adapter_note}",
        f"- general knowledge: the {len(gate_items())} gate questions of"
        " `bot/learning/regression.jsonl` (keywords)",
        f"- wall time: {wall:.0f} s",
        "",
        "| condition | facts on paraphrases | facts on originals | general knowledge |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, scores in results.items():
        if scores is None:
            lines.append(f"| {name} | n/a | n/a | n/a |")
        else:
            lines.append(
                f"| {name} | {scores['paraphrases']:.0%} | {scores['originals']:.0%}"
                f" | {scores['general']:.0%} |"
            )
    lines += [
        "",
        "Facts are scored with `bot.learning.evaluate.carries_fact`; under retrieval an original"
        " question is an exact repeat, answered verbatim from the correction without the model.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=None, help="facts to use (default: all)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_FACTS} facts")
    parser.add_argument("--base-model", default=None, help="model name or folder")
    parser.add_argument("--tiny", action="store_true", help="build and use the tiny test model")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per answer")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "LEARNING.md")
    args = parser.parse_args(argv)

    facts = load_facts()
    count = QUICK_FACTS if args.quick else (args.facts or len(facts))
    facts = facts[:count]
    command = "python bench/learning_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="learning-bench-") as folder:
        settings = build_settings(args, Path(folder))
        bot = start_bot(settings, tiny=args.tiny)
        try:
            knowledge, engine = bot.services.knowledge, bot.services.engine
            print(f"asking {len(facts)} original questions; the expert corrects each", flush=True)
            for fact, (message, _) in zip(
                facts, ask_all(bot, [f.question for f in facts], timeout=args.timeout), strict=True
            ):
                correct_answer(bot.emulator, user=EXPERT, answer=message, text=fact.answer)

            results: dict[str, dict | None] = {}
            for name, retrieval, _ in CONDITIONS[:2]:
                use_retrieval(bot, knowledge if retrieval else None)
                print(f"measuring: {name}", flush=True)
                results[name] = measure(bot, facts, timeout=args.timeout)

            print("running one learning cycle", flush=True)
            outcome = run_cycle(
                settings=bot.settings, db=bot.services.db, trigger="cli", report=False
            )
            print(f"cycle: {outcome.summary()}", flush=True)
            adapter_dir = outcome.adapter_dir
            if adapter_dir is not None and Path(adapter_dir).is_dir():
                adapter_note = f"{outcome.version} ({outcome.state}"
                if outcome.reasons:
                    adapter_note += "; " + "; ".join(outcome.reasons)
                adapter_note += ")"
                engine.set_adapter(outcome.version, Path(adapter_dir)).result(timeout=600)
            else:
                adapter_note = f"none: the cycle ended {outcome.state} ({outcome.error or ''})"
                adapter_dir = None
            for name, retrieval, _ in CONDITIONS[2:]:
                if adapter_dir is None:
                    results[name] = None
                    continue
                use_retrieval(bot, knowledge if retrieval else None)
                print(f"measuring: {name}", flush=True)
                results[name] = measure(bot, facts, timeout=args.timeout)
        finally:
            bot.close()

        report = render(
            results=results,
            facts=len(facts),
            adapter_note=adapter_note,
            settings=settings,
            command=command,
            wall=time.monotonic() - started,
        )
    print(report)
    args.out.write_text(report, encoding="utf-8")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
