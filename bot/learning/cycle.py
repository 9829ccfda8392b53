"""The learning cycle: expert verdicts in the store become a gated adapter version, reported.

ONE entry point for everyone: the scheduler (`scheduled_cycle`), `apprentice train`
(`run_cycle`) and `/apprentice train` (`start_cycle`, which returns at once with the run id).

What a cycle does, and where:

- **In this (the bot's) process**, briefly: take the `training` lease in the database
  (`bot.store.locks.hold_lock`: one cycle at a time across every process and replica sharing
  the database; `LockBusy` otherwise), mark runs whose process died as failed
  (`recover_interrupted_runs`), snapshot the training set (`build_training_set(now=...)`),
  and record a `TrainingRun` row with its example ids (the lineage). Nothing to learn -> the
  run is recorded as skipped (so the verdict threshold does not fire again at once).
- **In a child process** (`python -m bot.learning.cycle_worker`), the heavy part: rebuild the
  same snapshot, load a base model of its own and run `bot.learning.pipeline.train_new_version`
  on the existing run row (train, evaluate, gate, publish atomically, promote on pass). A child
  keeps the model, the autograd buffers and torch's thread pool away from the serving engine,
  so the bot keeps answering; it runs on `settings.train_threads` torch threads (default: half
  the cores; measured in bench/cycle_bench.py). The settings travel on the child's stdin as
  JSON, never on the command line or in a file.
- **Back here**, a supervisor thread waits for the child, renews the lease (its heartbeat also
  stamps `TrainingRun.heartbeat_at`), kills the child if the lease is lost, and when the child
  is gone reads the run row. A child that died without finishing the row (killed, crashed, out
  of memory) gets its run marked failed here, with the exit status and the tail of its output.
  Then the report goes to `settings.admin_channel` (`bot.learning.report`).

Crash safety: the active version changes only by `registry.promote`, the last step of the
child; publishing is a rename of a complete folder. A kill -9 anywhere before leaves the active
version as it was and no version folder behind. If everything died (bot and child), the run
row stays "running" until the next bot start or cycle start marks it failed, because its
heartbeat stopped (`mark_stale_runs_failed`, after `settings.train_lock_ttl_s`). The child
dies with its parent (Linux `PR_SET_PDEATHSIG`, plus a watch on its parent pid), so an orphan
never publishes after the lease it ran under has lapsed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine

from bot.learning.config import TrainingConfig
from bot.learning.dataset import build_training_set
from bot.settings import Settings
from bot.store.db import open_database, session_scope
from bot.store.locks import LockBusy, hold_lock, mark_stale_runs_failed
from bot.store.models import RunState, TrainingRun, utcnow

log = logging.getLogger(__name__)

TRAINING_LOCK = "training"
WORKER_MODULE = "bot.learning.cycle_worker"
OUTPUT_TAIL_CHARS = 3000
PROJECT_ROOT = Path(__file__).resolve().parents[2]

__all__ = [
    "CycleHandle",
    "CycleOutcome",
    "LockBusy",
    "recover_interrupted_runs",
    "run_cycle",
    "scheduled_cycle",
    "start_cycle",
    "stop_running_cycles",
    "training_config",
    "training_threads",
]


@dataclass
class CycleOutcome:
    """How a run ended, read back from its `TrainingRun` row (plus the report, if posted)."""

    run_id: int
    trigger: str
    state: str  # promoted | refused | skipped | failed
    version: str | None = None
    example_ids: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    adapter_dir: Path | None = None
    report: object | None = None  # bot.learning.report.PostedReport when one was posted

    @property
    def promoted(self) -> bool:
        return self.state == RunState.PROMOTED

    @property
    def reasons(self) -> list[str]:
        return list(self.metrics.get("reasons") or [])

    def summary(self) -> str:
        """One line for a CLI or an ephemeral Slack reply."""
        head = f"run #{self.run_id}"
        if self.state == RunState.PROMOTED:
            return f"{head}: {self.version} promoted and now active"
        if self.state == RunState.REFUSED:
            why = "; ".join(
                r for r in self.reasons if "did not" in r or "dropped" in r or "rose" in r
            )
            return f"{head}: {self.version} refused by the gate ({why or 'see the report'})"
        if self.state == RunState.SKIPPED:
            return f"{head}: skipped ({self.error or 'nothing to learn'})"
        return f"{head}: failed ({self.error})"


class CycleHandle:
    """A cycle running in the background; `wait()` for its `CycleOutcome`."""

    def __init__(self, run_id: int):
        self.run_id = run_id
        self._done = threading.Event()
        self._spawned = threading.Event()
        self._outcome: CycleOutcome | None = None
        self._process: subprocess.Popen | None = None
        self._cancel = threading.Event()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> CycleOutcome:
        if not self._done.wait(timeout):
            raise TimeoutError(f"training run #{self.run_id} still running after {timeout} s")
        assert self._outcome is not None
        return self._outcome

    @property
    def outcome(self) -> CycleOutcome | None:
        return self._outcome

    def child_pid(self, timeout: float = 60.0) -> int | None:
        """The training process's pid once it started (None if it never did)."""
        self._spawned.wait(timeout)
        return self._process.pid if self._process is not None else None

    def cancel(self) -> None:
        """Stop the child (the run is marked failed, the active version untouched)."""
        self._cancel.set()

    def _finish(self, outcome: CycleOutcome) -> None:
        self._outcome = outcome
        self._spawned.set()
        self._done.set()


_running: set[CycleHandle] = set()
_running_lock = threading.Lock()


# --- settings -> training configuration ------------------------------------------------------


def training_config(settings: Settings) -> TrainingConfig:
    """The defaults with `settings.train_overrides` applied; ValueError naming a bad key."""
    overrides = dict(settings.train_overrides or {})
    known = set(TrainingConfig().to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"APPRENTICE_TRAIN_OVERRIDES has unknown keys {unknown}; "
            f"known: {', '.join(sorted(known))}"
        )
    return TrainingConfig.from_dict({**TrainingConfig().to_dict(), **overrides})


def training_threads(settings: Settings) -> int:
    """Torch threads for the training child: the setting, else half the cores (at least 1)."""
    if settings.train_threads:
        return settings.train_threads
    return max(1, (os.cpu_count() or 2) // 2)


# --- recovery ----------------------------------------------------------------------------------


def recover_interrupted_runs(*, db: Engine, settings: Settings) -> int:
    """Mark runs whose heartbeat stopped over a lease ago as failed; returns how many.

    Safe at any time: a live cycle stamps its heartbeat every third of the lease.
    """
    with session_scope(db) as session:
        count = mark_stale_runs_failed(
            session=session, now=utcnow(), stale_after_s=settings.train_lock_ttl_s
        )
    if count:
        log.warning("marked %d interrupted training run(s) failed", count)
    return count


# --- starting a cycle --------------------------------------------------------------------------


def _owner() -> str:
    # Unique per cycle: the lease treats a re-acquire by the same owner as a renewal.
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"[:128]


def _stamp(db: Engine, run_id: int, **values) -> None:
    with session_scope(db) as session:
        run = session.get(TrainingRun, run_id)
        if run is None:
            return
        for key, value in values.items():
            setattr(run, key, value)
        run.heartbeat_at = utcnow()
        session.add(run)


def start_cycle(
    *,
    settings: Settings,
    db: Engine | None = None,
    trigger: str,
    actor: str | None = None,
    report: bool = True,
    inherit_output: bool = False,
) -> CycleHandle:
    """Start a cycle in the background and return at once (the run row exists by then).

    Raises `LockBusy` when a cycle is running anywhere, ValueError for bad
    `train_overrides`. A cycle with nothing to learn returns a handle already finished with
    state "skipped". `inherit_output` lets the child write to this process's terminal (the
    CLI); otherwise its output is kept for the run's error message.
    """
    config = training_config(settings)
    own_db = db is None
    db = db or open_database(settings.database_url)
    stack = contextlib.ExitStack()
    if own_db:
        stack.callback(db.dispose)
    run_ref: dict[str, int] = {}

    def heartbeat() -> None:
        if "id" in run_ref:
            _stamp(db, run_ref["id"])

    try:
        lost = stack.enter_context(
            hold_lock(
                engine=db,
                name=TRAINING_LOCK,
                owner=_owner(),
                ttl_s=settings.train_lock_ttl_s,
                on_heartbeat=heartbeat,
            )
        )
        recover_interrupted_runs(db=db, settings=settings)  # we hold the lease: any runner is dead
        snapshot = utcnow()
        with session_scope(db) as session:
            training_set = build_training_set(session=session, now=snapshot)
            run = TrainingRun(
                trigger=trigger,
                state=RunState.RUNNING,
                owner=_owner(),
                started_at=snapshot,
                heartbeat_at=snapshot,
                example_ids=training_set.example_ids,
                metrics={
                    "phase": "starting",
                    "examples": len(training_set.examples),
                    "preference_pairs": len(training_set.preference_pairs),
                    "excluded": dict(training_set.excluded),
                },
            )
            session.add(run)
            session.flush()
            run_ref["id"] = run_id = run.id
    except BaseException:
        stack.close()
        raise

    handle = CycleHandle(run_id)
    if not training_set.examples:
        why = "no approved or corrected answers to learn from yet"
        if training_set.excluded:
            left_out = ", ".join(f"{n} {reason}" for reason, n in training_set.excluded.items())
            why += f" (left out: {left_out})"
        _stamp(db, run_id, state=RunState.SKIPPED, error=why, finished_at=utcnow())
        outcome = read_outcome(db=db, run_id=run_id, settings=settings)
        stack.close()
        handle._finish(outcome)
        return handle

    payload = {
        "run_id": run_id,
        "parent_pid": os.getpid(),
        "trigger": trigger,
        "actor": actor or f"train:{trigger}",
        "snapshot": snapshot.isoformat(),
        "dataset_hash": training_set.dataset_hash,
        "config": config.to_dict(),
        "settings": settings.model_copy(update={"threads": training_threads(settings)}).model_dump(
            mode="json"
        ),
    }
    thread = threading.Thread(
        target=_supervise,
        kwargs=dict(
            handle=handle,
            payload=payload,
            settings=settings,
            db=db,
            lost=lost,
            stack=stack,
            report=report,
            inherit_output=inherit_output,
        ),
        name=f"apprentice-cycle-{run_id}",
        daemon=True,
    )
    with _running_lock:
        _running.add(handle)
    thread.start()
    log.info(
        "training run #%d started (%s, %d examples)", run_id, trigger, len(training_set.examples)
    )
    return handle


def run_cycle(
    *,
    settings: Settings,
    db: Engine | None = None,
    trigger: str,
    actor: str | None = None,
    report: bool = True,
    inherit_output: bool = False,
) -> CycleOutcome:
    """Run one cycle to its end and return how it ended (`LockBusy` if one is running)."""
    handle = start_cycle(
        settings=settings,
        db=db,
        trigger=trigger,
        actor=actor,
        report=report,
        inherit_output=inherit_output,
    )
    return handle.wait()


def scheduled_cycle(*, settings: Settings, trigger: str) -> None:
    """The scheduler's job function (`bot.scheduler.build_scheduler(run_cycle=...)`)."""
    try:
        outcome = run_cycle(settings=settings, trigger=trigger)
    except LockBusy as exc:
        log.info("scheduled %s cycle not started: %s", trigger, exc)
        return
    log.info("scheduled cycle finished: %s", outcome.summary())


def stop_running_cycles(timeout: float = 30.0) -> None:
    """Stop this process's cycles (on shutdown): their runs end failed, nothing is promoted."""
    with _running_lock:
        handles = list(_running)
    for handle in handles:
        handle.cancel()
    for handle in handles:
        try:
            handle.wait(timeout)
        except TimeoutError:
            log.warning("training run #%d did not stop within %.0f s", handle.run_id, timeout)


# --- the supervisor ------------------------------------------------------------------------------


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    root = str(PROJECT_ROOT)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _supervise(*, handle, payload, settings, db, lost, stack, report, inherit_output) -> None:
    run_id = handle.run_id
    threads = payload["settings"]["threads"]
    output = None if inherit_output else tempfile.TemporaryFile(mode="w+b")
    failure = None
    try:
        try:
            # Spawned from this thread, which lives until the child exits: PR_SET_PDEATHSIG
            # (set by the child) is tied to the thread that created it.
            process = subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE],
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=subprocess.STDOUT if output is not None else None,
                env=_child_env(threads),
            )
        except OSError as exc:
            failure = f"could not start the training process: {exc}"
            process = None
        handle._process = process
        handle._spawned.set()
        if process is not None:
            try:
                process.stdin.write(json.dumps(payload).encode())
                process.stdin.close()
            except OSError:
                pass  # it died at once; its exit status says more below
            while True:
                try:
                    code = process.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if lost.is_set() and failure is None:
                        failure = "the training lease was lost (this process stalled?)"
                        process.kill()
                    elif handle._cancel.is_set() and failure is None:
                        failure = "stopped: the bot shut down"
                        process.kill()
            if code != 0 and failure is None:
                failure = f"the training process ended with {_describe_exit(code)}"
        outcome = read_outcome(db=db, run_id=run_id, settings=settings)
        if outcome.state == RunState.RUNNING:  # the child died before finishing its row
            error = failure or "the training process ended without finishing its run"
            tail = _tail(output)
            if tail:
                error += f"\n--- last output ---\n{tail}"
            _stamp(db, run_id, state=RunState.FAILED, error=error[:8000], finished_at=utcnow())
            outcome = read_outcome(db=db, run_id=run_id, settings=settings)
        if outcome.state == RunState.FAILED:
            log.error("training run #%d failed: %s", run_id, outcome.error)
    except Exception as exc:  # never leave the caller waiting forever
        log.exception("training run #%d: supervisor failed", run_id)
        with contextlib.suppress(Exception):
            _stamp(
                db, run_id, state=RunState.FAILED, error=f"supervisor: {exc}", finished_at=utcnow()
            )
        outcome = CycleOutcome(
            run_id=run_id, trigger=payload["trigger"], state=RunState.FAILED, error=str(exc)
        )
    finally:
        if output is not None:
            output.close()
    if report:
        from bot.learning.report import post_report

        try:
            outcome.report = post_report(settings=settings, outcome=outcome)
        except Exception:
            log.exception("training run #%d: the report could not be posted", run_id)
    stack.close()  # release the lease (and dispose a database this cycle opened)
    with _running_lock:
        _running.discard(handle)
    handle._finish(outcome)


def _tail(output) -> str:
    if output is None:
        return ""
    try:
        output.flush()
        size = output.seek(0, os.SEEK_END)
        output.seek(max(0, size - OUTPUT_TAIL_CHARS))
        return output.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def read_outcome(*, db: Engine, run_id: int, settings: Settings) -> CycleOutcome:
    with session_scope(db) as session:
        run = session.get(TrainingRun, run_id)
        if run is None:
            raise LookupError(f"training run #{run_id} is not in the database")
        return CycleOutcome(
            run_id=run.id,
            trigger=run.trigger,
            state=run.state,
            version=run.version,
            example_ids=list(run.example_ids or []),
            metrics=dict(run.metrics or {}),
            error=run.error,
            started_at=run.started_at,
            finished_at=run.finished_at,
            adapter_dir=Path(settings.adapters_dir) / run.version if run.version else None,
        )


def wait_for_phase(*, db: Engine, run_id: int, phase: str, timeout: float) -> None:
    """Block until run `run_id` reports `phase` (or has finished); for tests and benches."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(db) as session:
            run = session.get(TrainingRun, run_id)
            if run is not None and (
                run.state != RunState.RUNNING or (run.metrics or {}).get("phase") == phase
            ):
                return
        time.sleep(0.1)
    raise TimeoutError(f"training run #{run_id} did not reach phase {phase!r} in {timeout} s")
