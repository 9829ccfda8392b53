"""The learning schedule: when a cycle starts, and the switch that stops it from starting.

Two jobs, both in APScheduler 3's `BackgroundScheduler` with a `SQLAlchemyJobStore` on the
bot's own database, so the schedule (and a missed run) survives a restart:

- `train-cron`: a cycle at the times of `settings.train_cron` (crontab, read in UTC so every
  replica and container agrees); empty turns it off and removes the stored job.
- `train-threshold`: every `settings.train_check_s` seconds, count the expert verdicts cast
  since the last cycle began (or the last version was published); at
  `settings.train_min_new_verdicts` start a cycle.

Stable job ids plus `replace_existing=True` mean a restart replaces the stored jobs rather than
adding copies; `coalesce=True` folds a backlog of missed runs into one, `max_instances=1` keeps
a job from overlapping itself. Across replicas the database lease in `bot.store.locks` (taken
by the cycle) is what guarantees one cycle at a time; the scheduler only decides when to try.

The job store pickles each job's function reference and arguments into the database. So job
functions are module-level (`bot.scheduler:cron_job`), their arguments are plain strings — no
Settings, whose secrets do not belong in a table — and what a job needs at run time (settings,
engine) is looked up in this process by a key derived from the database URL.

The cycle itself is referenced as text, "module:function", and called as
`function(settings=settings, trigger="schedule" | "verdicts")`.

Pausing is an `AppState` row (`training_paused`), so it holds across restarts and replicas; a
job that finds it set returns without starting anything.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Engine
from sqlmodel import Session, col, func, select

from bot.learning.dataset import count_new_expert_verdicts
from bot.settings import Settings
from bot.store.db import make_engine
from bot.store.models import AdapterVersion, AppState, TrainingRun, utcnow

log = logging.getLogger(__name__)

CRON_JOB_ID = "train-cron"
THRESHOLD_JOB_ID = "train-threshold"
PAUSED_KEY = "training_paused"
CRON_MISFIRE_GRACE_S = 3600  # a bot down at 03:00 and back by 04:00 still runs the night's cycle


# --- pause switch ------------------------------------------------------------------------


@dataclass(frozen=True)
class PauseState:
    paused: bool
    actor: str | None = None
    since: datetime | None = None


def pause_training(*, db: Engine, actor: str) -> None:
    """Stop scheduled cycles from starting (a running one finishes) until `resume_training`."""
    _write_pause(db=db, paused=True, actor=actor)


def resume_training(*, db: Engine, actor: str) -> None:
    _write_pause(db=db, paused=False, actor=actor)


def training_paused(*, db: Engine) -> bool:
    return pause_state(db=db).paused


def pause_state(*, db: Engine) -> PauseState:
    with Session(db) as session:
        row = session.get(AppState, PAUSED_KEY)
    if row is None or not row.value:
        return PauseState(paused=False)
    value = json.loads(row.value)
    return PauseState(
        paused=bool(value.get("paused")), actor=value.get("actor"), since=row.updated_at
    )


def _write_pause(*, db: Engine, paused: bool, actor: str) -> None:
    with Session(db) as session:
        row = session.get(AppState, PAUSED_KEY) or AppState(key=PAUSED_KEY)
        row.value = json.dumps({"paused": paused, "actor": actor})
        row.updated_at = utcnow()
        session.add(row)
        session.commit()
    log.info("training %s by %s", "paused" if paused else "resumed", actor)


# --- what a job needs at run time ----------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    settings: Settings
    engine: Engine


_contexts: dict[str, _Context] = {}
_contexts_lock = threading.Lock()


def _context_key(db_url: str) -> str:
    # The URL may hold a password: the stored job carries only a digest of it.
    return hashlib.sha256(db_url.encode()).hexdigest()[:16]


def _context(key: str) -> _Context | None:
    with _contexts_lock:
        return _contexts.get(key)


def resolve_cycle(reference: str) -> Callable[..., object]:
    """The function a "module:function" reference names; ValueError saying what is wrong."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"run_cycle must look like 'package.module:function', not {reference!r}")
    try:
        target = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"run_cycle {reference!r}: cannot import {module_name}: {exc}") from exc
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ValueError(f"run_cycle {reference!r}: {module_name} has no {attribute}")
    if not callable(target):
        raise ValueError(f"run_cycle {reference!r} is not a function")
    return target


# --- the jobs (module-level: the job store stores them by reference) ------------------------


def cron_job(*, context: str, run_cycle: str) -> None:
    """The scheduled cycle: start one unless training is paused."""
    _start_cycle(context=context, run_cycle=run_cycle, trigger="schedule")


def threshold_job(*, context: str, run_cycle: str) -> None:
    """Start a cycle once enough expert verdicts arrived since the last one began."""
    found = _context(context)
    if found is None:
        log.warning("scheduler job %s has no settings in this process; skipped", context)
        return
    if training_paused(db=found.engine):
        return
    with Session(found.engine) as session:
        since = last_cycle_at(session=session)
        new = count_new_expert_verdicts(session=session, since=since)
    if new < found.settings.train_min_new_verdicts:
        return
    log.info("%d new expert verdicts since %s: starting a cycle", new, since)
    _start_cycle(context=context, run_cycle=run_cycle, trigger="verdicts")


def last_cycle_at(*, session: Session) -> datetime | None:
    """When the newest training run began or the newest version was published, if ever."""
    started = session.exec(select(func.max(col(TrainingRun.started_at)))).one()
    published = session.exec(select(func.max(col(AdapterVersion.created_at)))).one()
    moments = [moment for moment in (started, published) if moment is not None]
    return max(moments) if moments else None


def _start_cycle(*, context: str, run_cycle: str, trigger: str) -> None:
    found = _context(context)
    if found is None:
        log.warning("scheduler job %s has no settings in this process; skipped", context)
        return
    if training_paused(db=found.engine):
        log.info("training is paused: the %s cycle does not start", trigger)
        return
    resolve_cycle(run_cycle)(settings=found.settings, trigger=trigger)


# --- building ------------------------------------------------------------------------------


def cron_trigger(expression: str) -> CronTrigger:
    try:
        return CronTrigger.from_crontab(expression, timezone=UTC)
    except ValueError as exc:
        raise ValueError(
            f"APPRENTICE_TRAIN_CRON={expression!r} is not a crontab "
            f"('minute hour day month weekday', e.g. '0 3 * * *'; '' turns it off): {exc}"
        ) from exc


def build_scheduler(*, settings: Settings, db_url: str, run_cycle: str) -> BackgroundScheduler:
    """A scheduler (not started) whose jobs live in the database at `db_url`.

    The caller starts it (`.start()`) and stops it (`.shutdown()`). Raises ValueError for a
    bad crontab or a `run_cycle` reference that does not import.
    """
    resolve_cycle(run_cycle)  # fail at start-up, not at three in the morning
    trigger = cron_trigger(settings.train_cron) if settings.train_cron.strip() else None
    engine = make_engine(db_url)
    key = _context_key(db_url)
    with _contexts_lock:
        _contexts[key] = _Context(settings=settings, engine=engine)

    scheduler = BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(engine=engine)},
        job_defaults={"coalesce": True, "max_instances": 1},
        timezone=UTC,
    )
    kwargs = {"context": key, "run_cycle": run_cycle}
    if trigger is not None:
        scheduler.add_job(
            cron_job,
            trigger,
            id=CRON_JOB_ID,
            name="learning cycle (cron)",
            kwargs=kwargs,
            replace_existing=True,
            misfire_grace_time=CRON_MISFIRE_GRACE_S,
        )
    scheduler.add_job(
        threshold_job,
        IntervalTrigger(seconds=settings.train_check_s, timezone=UTC),
        id=THRESHOLD_JOB_ID,
        name="learning cycle (new verdicts)",
        kwargs=kwargs,
        replace_existing=True,
        misfire_grace_time=max(1, int(settings.train_check_s)),
    )
    if trigger is None:
        # A schedule turned off must not keep firing from the copy stored by an earlier start.
        _remove_stored_job(engine=engine, job_id=CRON_JOB_ID)
    return scheduler


def _remove_stored_job(*, engine: Engine, job_id: str) -> None:
    store = SQLAlchemyJobStore(engine=engine)
    store.jobs_t.create(engine, checkfirst=True)
    with engine.begin() as connection:
        connection.execute(store.jobs_t.delete().where(store.jobs_t.c.id == job_id))
