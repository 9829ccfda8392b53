"""Model-side commands: `ask`, `train`, `adapters list|promote|rollback`.

Each command parses, delegates to `bot.learning` / `bot.adapter_store` / `bot.engine`, and
prints. Whatever a user can fix (an empty question, an unknown model name, unreadable data, a
corrupt adapter folder, nothing to roll back) becomes `fail(...)`: a one-line message saying
what to do, exit code 2, never a traceback; the active version is never changed by a failure.
"""

from __future__ import annotations

import getpass
import logging
from pathlib import Path

import typer

from bot.cli.common import fail, load_settings

adapters_app = typer.Typer(
    help="List, promote and roll back adapter versions.", no_args_is_help=True
)


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in some containers
        return "cli"


def _quiet_libraries() -> None:
    """transformers' warnings and load bars are noise in a terminal command."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _open_registry(settings):
    from bot.adapter_store import AdapterRegistry
    from bot.store import open_database

    try:
        db = open_database(settings.database_url)
    except Exception as exc:
        fail(
            f"cannot open the database {settings.database_url}: {exc}; "
            "check APPRENTICE_DATABASE_URL"
        )
    return db, AdapterRegistry(db=db, root=settings.adapters_dir)


def _load_model(settings, *, serving: bool = False):
    from bot.engine.loading import ModelNotFound, load_from_settings
    from bot.engine.types import EngineError

    _quiet_libraries()
    try:
        return load_from_settings(settings, serving=serving)
    except ModelNotFound as exc:
        fail(str(exc))
    except EngineError as exc:
        fail(str(exc))


def ask(
    question: str = typer.Argument(..., help="the question, in quotes"),
    timeout: float = typer.Option(None, "--timeout", help="seconds to wait for the answer"),
) -> None:
    """Answer a question from the terminal with the active adapter (no Slack)."""
    from bot.adapter_store import AdapterInvalid
    from bot.engine.types import EngineError
    from bot.engine.worker import AnswerEngine

    if not question.strip():
        fail('the question is empty: apprentice ask "how do deploys work?"')
    settings = load_settings()
    _db, registry = _open_registry(settings)
    active = registry.active_version()
    loaded = _load_model(settings, serving=True)
    with AnswerEngine.from_settings(settings, loaded=loaded) as engine:
        if active is not None:
            try:
                engine.set_adapter(active, registry.path(active)).result()
            except (EngineError, AdapterInvalid) as exc:
                fail(
                    f"the active adapter {active} does not load ({exc}); "
                    "run `apprentice adapters rollback` or promote another version"
                )
        try:
            result = engine.answer(question, timeout=timeout or settings.answer_timeout_s)
        except EngineError as exc:
            fail(str(exc))
    typer.echo(result.text)
    version = result.adapter_version
    typer.secho(f"(adapter {version})" if version else "(base model)", dim=True)


def train(
    data: Path = typer.Option(
        None,
        "--data",
        help="JSONL file: one {question, answer} a line; without it, one learning cycle on the "
        "experts' verdicts in the database (what the schedule runs)",
    ),
    max_steps: int = typer.Option(
        None, "--max-steps", min=1, help="optimizer steps (default: from the data size)"
    ),
    no_promote: bool = typer.Option(
        False, "--no-promote", help="publish, but keep the active version"
    ),
) -> None:
    """One learning cycle now (or train on a JSONL file with --data); gate, promote if it passes."""
    if data is None:
        if max_steps is not None or no_promote:
            fail(
                "--max-steps and --no-promote go with --data; a cycle uses the configured settings"
            )
        _train_cycle()
        return
    from bot.adapter_store import AdapterInvalid
    from bot.learning.config import TrainingConfig
    from bot.learning.examples import DataError, load_examples_jsonl
    from bot.learning.pipeline import train_new_version
    from bot.learning.trainer import TrainingError

    try:
        examples = load_examples_jsonl(data)
    except DataError as exc:
        fail(str(exc))
    settings = load_settings()
    db, _registry = _open_registry(settings)
    loaded = _load_model(settings)
    config = TrainingConfig(max_steps=max_steps)
    typer.echo(f"training on {len(examples)} examples from {data} ({loaded.name})")
    try:
        report = train_new_version(
            settings=settings,
            examples=examples,
            trigger="cli",
            loaded=loaded,
            progress=True,
            actor=_actor(),
            config=config,
            promote=not no_promote,
            db=db,
        )
    except (DataError, TrainingError, AdapterInvalid) as exc:
        fail(f"training failed: {exc}; the active version is unchanged")
    m = report.metrics
    typer.echo(
        f"steps {m['steps']} in {m['train_seconds']:.0f} s; "
        f"fact recall {m['recall_before']:.0%} -> {m['recall']:.0%} "
        f"(trained {m['recall_train']:.0%}"
        + (f", held-out {m['recall_held_out']:.0%}" if m["recall_held_out"] is not None else "")
        + f"); regression {m['regression_before']:.0%} -> {m['regression']:.0%}"
        + (f"; held-out loss {m['eval_loss']:.3f}" if m["eval_loss"] is not None else "")
    )
    status = "promoted: now active" if report.promoted else "not promoted"
    typer.secho(f"{report.version} {status}", bold=True)
    for reason in report.reasons:
        typer.echo(f"  - {reason}")


def _train_cycle() -> None:
    """The same cycle the schedule and `/apprentice train` run, waited for, its output shown."""
    from bot.learning.cycle import LockBusy, run_cycle

    settings = load_settings()
    db, _registry = _open_registry(settings)
    typer.echo("learning cycle: training on the experts' verdicts in a separate process…")
    try:
        outcome = run_cycle(
            settings=settings, db=db, trigger="cli", actor=_actor(), inherit_output=True
        )
    except LockBusy as exc:
        fail(f"{exc}; only one learning cycle runs at a time")
    except ValueError as exc:
        fail(str(exc))
    typer.secho(outcome.summary(), bold=True)
    for reason in outcome.reasons:
        typer.echo(f"  - {reason}")
    if outcome.state == "failed":
        fail(f"training failed; the active version is unchanged: {outcome.error.splitlines()[0]}")


@adapters_app.command("list")
def adapters_list() -> None:
    """The published versions, oldest first; * marks the active one."""
    settings = load_settings()
    _db, registry = _open_registry(settings)
    versions = registry.list_versions()
    if not versions:
        typer.echo(f"no adapter versions yet in {settings.adapters_dir}; run `apprentice train`")
        return
    header = f"{'version':8} {'created (UTC)':17} {'examples':>8} {'recall':>7} {'regress':>7}"
    typer.echo(f"  {header}  notes")
    for info in versions:
        recall = info.metrics.get("recall")
        regression = info.metrics.get("regression")
        notes = []
        if info.rolled_back_at:
            notes.append(f"rolled back {info.rolled_back_at:%Y-%m-%d %H:%M}")
        if info.metrics.get("gate_passed") is False:
            notes.append("refused by the gate")
        if not info.on_disk:
            notes.append("folder missing")
        typer.echo(
            f"{'*' if info.active else ' ':2}{info.name:8} {info.created_at:%Y-%m-%d %H:%M}  "
            f"{info.example_count:>8} {_pct(recall):>7} {_pct(regression):>7}  {'; '.join(notes)}"
        )
    if registry.active_version() is None:
        typer.echo("(no version active: the base model serves alone)")


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


@adapters_app.command("promote")
def adapters_promote(
    version: str = typer.Argument(..., help="e.g. v0003"),
    reason: str = typer.Option(None, "--reason", help="recorded with the activation"),
) -> None:
    """Make VERSION the active adapter (every running bot swaps to it within seconds)."""
    from bot.adapter_store import AdapterInvalid, UnknownVersion

    settings = load_settings()
    _db, registry = _open_registry(settings)
    try:
        registry.promote(version.strip(), actor=_actor(), reason=reason)
    except (UnknownVersion, AdapterInvalid) as exc:
        fail(str(exc))
    typer.echo(f"{version.strip()} is now active")


@adapters_app.command("rollback")
def adapters_rollback(
    reason: str = typer.Option(None, "--reason", help="recorded with the activation"),
) -> None:
    """Go back to the version that was active before the current one."""
    from bot.adapter_store import AdapterInvalid, RollbackImpossible

    settings = load_settings()
    _db, registry = _open_registry(settings)
    before = registry.active_version()
    try:
        now = registry.rollback(actor=_actor(), reason=reason)
    except (RollbackImpossible, AdapterInvalid) as exc:
        fail(str(exc))
    typer.echo(f"rolled back from {before}: {now or 'the base model (no adapter)'} is now active")


def register(app: typer.Typer) -> None:
    app.command("ask")(ask)
    app.command("train")(train)
    app.add_typer(adapters_app, name="adapters")
