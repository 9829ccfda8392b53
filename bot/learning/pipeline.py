"""One learning cycle: examples in, a gated adapter version out. The CLI and the scheduler share it.

`train_new_version` records a `TrainingRun` row (running -> promoted | refused | failed) and:

1. splits the examples (stable hash) into train and held-out;
2. asks the currently active version (or the base model) the example questions and the
   regression questions, and the base model the "mix" questions (its answers become the general
   examples mixed into training, see `bot.learning.regression`);
3. trains a LoRA adapter into a temporary folder (`bot.learning.trainer`);
4. asks the candidate the same questions, and gates it: refused if it answers more than one
   regression question fewer than the active version did (forgetting), or if its fact recall on
   the examples (train + held-out) is not higher than the active version's (nothing learnt);
5. publishes it as the next version either way — versions are history, and an admin may still
   promote a refused one by name after reading why it was refused — and makes it active only
   when it passed (and `promote` is true).

What the gate can show on this model, and why it is built this way: "held-out" examples are
expert answers the candidate never trained on. On SmolLM2-135M a LoRA adapter learns the exact
questions it was trained on and almost never a fact it did not see (0-2 of 10 reworded
questions in shared/NOTES.md; an unseen fact is unknowable), so held-out FACT recall stays at
the base model's level whatever the candidate learnt: requiring it to rise would refuse every
version, and it is reported (`recall_held_out`) but not gated on. What the gate does demand:
- fact recall on ALL current expert answers must beat the active version's. Those include
  every correction since the active version was trained, which that version never saw: in
  the cycle's terms they are its held-out set, and beating it there is the point of a cycle;
- the held-out LOSS (the expert answers left out of training) must stay within
  `early_stopping_tolerance` of the base model's: it rises a little while facts are memorised
  and a lot when a run diverges or overfits (see `bot.learning.trainer`); with fewer than
  `min_eval_examples` examples nothing is held out and this check is skipped;
- the regression set must not lose more than one question (forgetting).
Retrieval (`bot.knowledge`) is what carries reworded questions on this model; a bigger base
model generalises and then held-out recall becomes meaningful (it is in the metrics).

On any exception the run is marked failed with the error, the active version is untouched and
the temporary folder is removed; the exception propagates to the caller.

The model: the cycle needs a base model of its own (`loaded`, or one it loads: 0.1-0.4 s from
the converted cache). Training injects LoRA layers into it and evaluation wraps it in a PEFT
model, both undone afterwards; a model an engine is serving from must not be passed in.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

from bot.adapter_store.files import AdapterInvalid, publish_adapter, validate_adapter_folder
from bot.adapter_store.registry import AdapterRegistry
from bot.learning.config import TrainingConfig
from bot.learning.evaluate import EVAL_MAX_NEW_TOKENS, answer_all, score_recall
from bot.learning.examples import DataError, Example, dataset_hash, deduplicate, split_examples
from bot.learning.regression import (
    anchor_examples,
    gate_items,
    regression_score,
    replay_examples,
)
from bot.store.db import open_database, session_scope
from bot.store.models import RunState, TrainingRun, utcnow

log = logging.getLogger(__name__)

CANDIDATE = "candidate"


@dataclass
class TrainReport:
    version: str | None  # the published version (None if the run failed before publishing)
    promoted: bool
    reasons: list[str]  # why it was promoted or refused, as sentences
    metrics: dict
    run_id: int
    adapter_dir: Path | None = None
    per_example: list[dict] = field(default_factory=list)


@dataclass
class _Side:
    """What one model (base, active or candidate) answered."""

    label: str
    recall_train: float
    recall_held_out: float | None
    recall_all: float
    regression: float
    items: list
    general_right: tuple[str, ...] = ()  # the gate questions this side answered right


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:128]


def _update_run(db: Engine, run_id: int, **values) -> None:
    with session_scope(db) as session:
        run = session.get(TrainingRun, run_id)
        for key, value in values.items():
            setattr(run, key, value)
        run.heartbeat_at = utcnow()
        session.add(run)


def _set_phase(db: Engine, run_id: int, phase: str) -> None:
    """Say what the run is doing now (kept in its metrics until the final ones replace them)."""
    with session_scope(db) as session:
        run = session.get(TrainingRun, run_id)
        run.metrics = {**(run.metrics or {}), "phase": phase}
        run.heartbeat_at = utcnow()
        session.add(run)


def remove_lora_layers(model) -> None:
    """Put back the plain layers wherever LoRA layers were injected into `model` (in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if name and isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    model.eval()


def _evaluation_engine(settings, loaded):
    from bot.engine.worker import AnswerEngine

    return AnswerEngine(
        loaded,
        system_prompt=settings.system_prompt,
        max_input_tokens=settings.max_input_tokens,
        max_new_tokens=EVAL_MAX_NEW_TOKENS,
        batch_size=settings.batch_size,
    )


def _ask(engine, label, train, held_out) -> _Side:
    examples = list(train) + list(held_out)
    gate = gate_items()
    answers = answer_all(engine, [e.question for e in examples] + [i.question for i in gate])
    fact_answers, gate_answers = answers[: len(examples)], answers[len(examples) :]
    recall_all, items = score_recall(examples, fact_answers)
    recall_train, _ = score_recall(train, fact_answers[: len(train)])
    recall_held = score_recall(held_out, fact_answers[len(train) :])[0] if held_out else None
    right = tuple(i.question for i, a in zip(gate, gate_answers, strict=True) if i.is_right(a))
    return _Side(
        label,
        recall_train,
        recall_held,
        recall_all,
        regression_score(gate_answers),
        items,
        general_right=right,
    )


def gate_decision(
    *,
    before: _Side,
    after: _Side,
    gate_size: int,
    eval_loss_base: float | None = None,
    eval_loss: float | None = None,
    loss_tolerance: float = 0.3,
) -> tuple[bool, list[str]]:
    """(passed, reasons). Tolerance: one regression question (small models wobble by one).

    With held-out examples, the candidate's held-out loss must also stay within
    `loss_tolerance` of the base model's (step 0) held-out loss: a guard against a run that
    diverged or overfit, not a test of learning (see the module docstring).
    """
    reasons = []
    passed = True
    if eval_loss_base is not None and eval_loss is not None:
        limit = eval_loss_base * (1 + loss_tolerance)
        if not eval_loss <= limit:  # also catches NaN
            passed = False
            reasons.append(
                f"held-out loss rose from {eval_loss_base:.3f} to {eval_loss:.3f} "
                f"(over the {loss_tolerance:.0%} allowed): the candidate diverged or overfit"
            )
        else:
            reasons.append(f"held-out loss {eval_loss_base:.3f} -> {eval_loss:.3f} (within bounds)")
    tolerance = 1 / gate_size if gate_size else 0
    if after.regression < before.regression - tolerance - 1e-9:
        passed = False
        reasons.append(
            f"regression score dropped from {before.regression:.0%} to {after.regression:.0%} "
            f"on {gate_size} general questions (more than one forgotten)"
        )
    else:
        reasons.append(f"regression score {before.regression:.0%} -> {after.regression:.0%} (kept)")
    if after.recall_all <= before.recall_all:
        passed = False
        reasons.append(
            f"fact recall did not improve over {before.label}: "
            f"{before.recall_all:.0%} -> {after.recall_all:.0%}"
        )
    else:
        reasons.append(
            f"fact recall improved over {before.label}: "
            f"{before.recall_all:.0%} -> {after.recall_all:.0%}"
        )
    return passed, reasons


def train_new_version(
    *,
    settings,
    examples: Sequence[Example],
    trigger: str = "cli",
    loaded=None,
    progress: bool = True,
    actor: str | None = None,
    config: TrainingConfig | None = None,
    promote: bool = True,
    db: Engine | None = None,
    run_id: int | None = None,
) -> TrainReport:
    """Train, evaluate, gate, publish and (on pass) promote a new adapter version.

    `run_id` names a "running" `TrainingRun` row someone already created (the learning cycle
    creates it in the parent process, so the run is on record before this process exists);
    without it a row is created here.
    """
    examples = deduplicate(examples)
    config = config or TrainingConfig()
    db = db or open_database(settings.database_url)
    if not examples:
        if run_id is not None:
            _update_run(
                db,
                run_id,
                state=RunState.FAILED,
                error="DataError: no training examples",
                finished_at=utcnow(),
            )
        raise DataError("no training examples: nothing to learn from")
    registry = AdapterRegistry(db=db, root=settings.adapters_dir)
    with session_scope(db) as session:
        run = session.get(TrainingRun, run_id) if run_id is not None else None
        if run_id is not None and run is None:
            raise LookupError(f"no training run #{run_id} in the database")
        run = run or TrainingRun(trigger=trigger, state=RunState.RUNNING)
        run.owner = _owner()
        run.heartbeat_at = utcnow()
        run.example_ids = [e.key for e in examples]
        session.add(run)
        session.flush()
        run_id = run.id
    try:
        return _run_cycle(
            settings=settings,
            examples=examples,
            loaded=loaded,
            progress=progress,
            actor=actor or f"train:{trigger}",
            config=config,
            promote=promote,
            db=db,
            registry=registry,
            run_id=run_id,
        )
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}".strip()
        _update_run(db, run_id, state=RunState.FAILED, error=error[:4000], finished_at=utcnow())
        raise


def _run_cycle(
    *, settings, examples, loaded, progress, actor, config, promote, db, registry, run_id
):
    from bot.engine.loading import load_from_settings
    from bot.learning.trainer import train_lora

    started = time.perf_counter()
    train, held_out = split_examples(
        examples,
        eval_fraction=config.eval_fraction,
        seed=config.seed,
        min_eval_examples=config.min_eval_examples,
    )
    loaded = loaded or load_from_settings(settings)
    remove_lora_layers(loaded.model)  # a clean base, whatever touched it before

    active = registry.active_version()
    notes = []
    if active is not None:
        try:
            validate_adapter_folder(registry.path(active))
        except AdapterInvalid as exc:
            notes.append(f"compared with the base model: the active {active} is unusable ({exc})")
            active = None

    # The active version (or the base model) answers first; the base answers the mix questions.
    _set_phase(db, run_id, "evaluating the active version")
    engine = _evaluation_engine(settings, loaded).start()
    try:
        general = replay_examples(
            engine, limit=config.general_mix, cache_dir=settings.model_cache_dir
        )
        anchors = (
            anchor_examples(engine, limit=config.anchor_rows, cache_dir=settings.model_cache_dir)
            if config.anchor_weight > 0
            else []
        )
        if active is not None:
            engine.set_adapter(active, registry.path(active)).result()
        before = _ask(engine, active or "the base model", train, held_out)
    finally:
        engine.stop()
        remove_lora_layers(loaded.model)
    _set_phase(db, run_id, "training")

    with tempfile.TemporaryDirectory(prefix="apprentice-train-") as work:
        adapter_dir = Path(work) / "adapter"
        trained = train_lora(
            loaded=loaded,
            train=train,
            held_out=held_out,
            config=config,
            out_dir=adapter_dir,
            progress=progress,
            general=general,
            anchors=anchors,
            system_prompt=settings.system_prompt,
            max_input_tokens=settings.max_input_tokens,
        )
        _set_phase(db, run_id, "evaluating the candidate")

        engine = _evaluation_engine(settings, loaded).start()
        try:
            engine.set_adapter(CANDIDATE, adapter_dir).result()
            after = _ask(engine, "the candidate", train, held_out)
        finally:
            engine.stop()
            remove_lora_layers(loaded.model)

        passed, reasons = gate_decision(
            before=before,
            after=after,
            gate_size=len(gate_items()),
            eval_loss_base=trained.initial_eval_loss,
            eval_loss=trained.best_eval_loss,
            loss_tolerance=config.early_stopping_tolerance,
        )
        reasons = notes + reasons
        metrics = {
            "examples": len(examples),
            "train_examples": len(train),
            "held_out_examples": len(held_out),
            "general_examples": min(len(general), config.general_mix),
            "compared_with": active,
            "recall_train_before": before.recall_train,
            "recall_train": after.recall_train,
            "recall_held_out_before": before.recall_held_out,
            "recall_held_out": after.recall_held_out,
            "recall_before": before.recall_all,
            "recall": after.recall_all,
            "regression_before": before.regression,
            "regression": after.regression,
            # general questions the active version got right and the candidate did not
            "regression_lost": [q for q in before.general_right if q not in after.general_right],
            "eval_loss_base": trained.initial_eval_loss,
            "eval_loss": trained.best_eval_loss,
            "steps": trained.steps,
            "planned_steps": trained.planned_steps,
            "best_step": trained.best_step,
            "stopped_early": trained.stopped_early,
            "train_seconds": round(trained.seconds, 2),
            "gate_passed": passed,
        }
        per_example = [
            {
                "id": new.id,
                "question": new.question,
                "expected": new.expected,
                "answer_before": old.answer,
                "answer": new.answer,
                "correct_before": old.correct,
                "correct": new.correct,
                "held_out": index >= len(train),
            }
            for index, (old, new) in enumerate(zip(before.items, after.items, strict=True))
        ]
        metadata = {
            "base_model": loaded.name,
            "training_config": config.to_dict(),
            "dataset_hash": dataset_hash(examples),
            "example_count": len(examples),
            "example_ids": [e.key for e in examples],
            "held_out_ids": [e.key for e in held_out],
            "metrics": metrics,
            "gate": {"passed": passed, "reasons": reasons},
            "loss_history": trained.loss_history,
            "per_example": per_example,
            "training_run": run_id,
        }
        version = publish_adapter(
            root=settings.adapters_dir, source_dir=adapter_dir, metadata=metadata, db=db
        )

    promoted = False
    if passed and promote:
        registry.promote(version, actor=actor, reason="; ".join(reasons))
        promoted = True
    elif passed:
        reasons.append(
            f"not promoted (--no-promote): promote it with `apprentice adapters promote {version}`"
        )
    else:
        reasons.append(f"{version} kept as history; the active version is unchanged")
    metrics["total_seconds"] = round(time.perf_counter() - started, 2)
    metrics["reasons"] = list(reasons)  # the run row says why, without opening the folder
    with session_scope(db) as session:  # keep what the caller recorded at the start
        recorded = dict(session.get(TrainingRun, run_id).metrics or {})
    recorded.pop("phase", None)
    metrics = {**recorded, **metrics}
    _update_run(
        db,
        run_id,
        state=RunState.PROMOTED if promoted else RunState.REFUSED,
        version=version,
        metrics=metrics,
        finished_at=utcnow(),
    )
    return TrainReport(
        version=version,
        promoted=promoted,
        reasons=reasons,
        metrics=metrics,
        run_id=run_id,
        adapter_dir=registry.path(version),
        per_example=per_example,
    )
