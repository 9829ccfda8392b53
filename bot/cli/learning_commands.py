"""`apprentice export`: the training set as the cycle would build it, as chat JSONL.

Parses arguments and delegates to `bot.learning.dataset`. The data goes to stdout (or
`--out`); counts and exclusions go to stderr, so `apprentice export > data.jsonl` stays clean.
The split uses the training configuration's defaults, so `--split eval` is exactly the
held-out set a cycle would evaluate on.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from bot.cli.common import fail, load_settings


class SplitChoice(StrEnum):
    TRAIN = "train"
    EVAL = "eval"
    ALL = "all"


def export(
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="write here instead of stdout")
    ] = None,
    split_name: Annotated[
        SplitChoice, typer.Option("--split", help="which part: train, eval (held out) or all")
    ] = SplitChoice.ALL,
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="default: APPRENTICE_DATABASE_URL"),
    ] = None,
) -> None:
    """Export the scrubbed training set (approved and corrected answers) as chat JSONL."""
    from bot.learning.config import TrainingConfig
    from bot.learning.dataset import build_training_set, split, to_chat_jsonl
    from bot.store import open_database, session_scope

    settings = load_settings(database_url=database_url)
    try:
        engine = open_database(settings.database_url)
    except Exception as exc:  # a wrong URL, a server down: say which database
        fail(f"cannot open the database {settings.database_url!r}: {exc}")
    try:
        with session_scope(engine) as session:
            training_set = build_training_set(session=session, settings=settings)
    finally:
        engine.dispose()

    config = TrainingConfig()
    parts = split(
        training_set,
        eval_fraction=config.eval_fraction,
        seed=config.seed,
        min_eval_examples=config.min_eval_examples,
    )
    chosen = {
        SplitChoice.ALL: training_set.examples,
        SplitChoice.TRAIN: parts.train,
        SplitChoice.EVAL: parts.eval,
    }[split_name]

    lines = [line + "\n" for line in to_chat_jsonl(chosen)]
    if out is None:
        sys.stdout.writelines(lines)
        sys.stdout.flush()
        where = "stdout"
    else:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("".join(lines), encoding="utf-8")
        except OSError as exc:
            fail(f"cannot write {out}: {exc.strerror}; choose another --out")
        where = str(out)

    excluded = ", ".join(f"{reason} {n}" for reason, n in training_set.excluded.items()) or "none"
    typer.echo(
        f"exported {len(chosen)} examples ({split_name.value}; {len(parts.train)} train, "
        f"{len(parts.eval)} eval) to {where}\n"
        f"excluded answers: {excluded}\n"
        f"preference pairs: {len(training_set.preference_pairs)}; "
        f"answers with 👍/👎: {len(training_set.signals)}\n"
        f"dataset hash: {training_set.dataset_hash[:16]}",
        err=True,
    )


def register(app: typer.Typer) -> None:
    app.command("export")(export)
