"""Lease locks in the database: exactly one process, on any replica, holds a named lease.

Why the database and not a file: replicas share a PostgreSQL and nothing else, and a file lock
on a laptop's SQLite would not survive being copied to a server setup. Why a lease and not a
session-level lock (`pg_advisory_lock`): it must work the same on SQLite, and a holder killed
with -9 must not keep the lock forever. So a lock is a row `(name, owner, expires_at)`:

- acquire: INSERT the row; the primary key makes a second INSERT fail. If a row is there, one
  conditional `UPDATE … WHERE name = :name AND (expires_at < :now OR owner = :owner)` takes an
  expired lease over. The database applies that UPDATE to the row atomically, so of two
  processes racing for an expired lease exactly one sees `rowcount == 1`.
- renew: the holder pushes `expires_at` forward (a heartbeat every ttl/3 — `hold_lock` does it).
- release: DELETE only where the owner matches, so a holder whose lease was taken over cannot
  release the new holder's lock.

Times come from the Python clock of each process (UTC). Replicas whose clocks disagree by more
than a lease's slack could take over early: keep the ttl well above any clock skew (minutes).

`mark_stale_runs_failed` is the same idea for `TrainingRun` rows: a run whose process died
keeps state "running" forever unless someone notices its heartbeat stopped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, delete, or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from bot.store.models import Lock, RunState, TrainingRun, utcnow

INTERRUPTED = "interrupted: the process running it stopped (killed or crashed)"


class LockBusy(RuntimeError):
    """The lease is held by someone else; the message names the holder and when it expires."""


@dataclass(frozen=True)
class LockHolder:
    name: str
    owner: str
    acquired_at: datetime
    expires_at: datetime


def acquire_lock(
    *, engine: Engine, name: str, owner: str, ttl_s: float, now: datetime | None = None
) -> bool:
    """Take the lease `name` for `ttl_s` seconds; False when another owner holds it unexpired.

    Re-acquiring a lease one already holds renews it.
    """
    now = now or utcnow()
    expires_at = now + timedelta(seconds=ttl_s)
    try:
        with engine.begin() as connection:
            connection.execute(
                Lock.__table__.insert().values(
                    name=name, owner=owner, acquired_at=now, expires_at=expires_at
                )
            )
        return True
    except IntegrityError:
        pass  # a row exists: maybe expired, maybe ours
    with engine.begin() as connection:
        result = connection.execute(
            update(Lock)
            .where(Lock.name == name, or_(Lock.expires_at < now, Lock.owner == owner))
            .values(owner=owner, acquired_at=now, expires_at=expires_at)
        )
        return result.rowcount == 1


def renew_lock(
    *, engine: Engine, name: str, owner: str, ttl_s: float, now: datetime | None = None
) -> bool:
    """Push the lease's expiry to now + ttl_s; False when `owner` no longer holds it."""
    now = now or utcnow()
    with engine.begin() as connection:
        result = connection.execute(
            update(Lock)
            .where(Lock.name == name, Lock.owner == owner)
            .values(expires_at=now + timedelta(seconds=ttl_s))
        )
        return result.rowcount == 1


def release_lock(*, engine: Engine, name: str, owner: str) -> bool:
    """Drop the lease if `owner` holds it; False (and nothing changes) otherwise."""
    with engine.begin() as connection:
        result = connection.execute(delete(Lock).where(Lock.name == name, Lock.owner == owner))
        return result.rowcount == 1


def lock_holder(*, engine: Engine, name: str, now: datetime | None = None) -> LockHolder | None:
    """Who holds the lease now, or None when nobody does (no row, or the lease expired)."""
    now = now or utcnow()
    with Session(engine) as session:
        row = session.exec(select(Lock).where(Lock.name == name)).one_or_none()
        if row is None or row.expires_at < now:
            return None
        return LockHolder(row.name, row.owner, row.acquired_at, row.expires_at)


@contextmanager
def hold_lock(
    *,
    engine: Engine,
    name: str,
    owner: str,
    ttl_s: float,
    on_heartbeat: Callable[[], None] | None = None,
) -> Iterator[threading.Event]:
    """Hold the lease for the `with` block, renewing it every ttl_s / 3 from a daemon thread.

    Raises `LockBusy` when someone else holds it. Yields an Event that is set if the lease was
    lost (a renewal found another owner, e.g. after this process stalled past the ttl); long
    work should check it and stop. `on_heartbeat` runs after each renewal (the learning cycle
    stamps its TrainingRun's heartbeat there); its errors are not fatal to the lease.
    """
    if not acquire_lock(engine=engine, name=name, owner=owner, ttl_s=ttl_s):
        holder = lock_holder(engine=engine, name=name)
        who = f"{holder.owner} until {holder.expires_at:%Y-%m-%d %H:%M:%S} UTC" if holder else "?"
        raise LockBusy(f"the {name!r} lock is held by {who}; wait for it to finish")
    lost = threading.Event()
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(ttl_s / 3):
            try:
                renewed = renew_lock(engine=engine, name=name, owner=owner, ttl_s=ttl_s)
            except Exception:  # a database hiccup: try again at the next beat
                continue
            if not renewed:
                lost.set()
                return
            if on_heartbeat is not None:
                try:
                    on_heartbeat()
                except Exception:
                    pass  # the lease matters more than the run's heartbeat column

    thread = threading.Thread(target=heartbeat, name=f"lease-{name}", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join()
        release_lock(engine=engine, name=name, owner=owner)


def mark_stale_runs_failed(*, session: Session, now: datetime, stale_after_s: float) -> int:
    """Mark "running" TrainingRuns whose heartbeat stopped over `stale_after_s` ago as failed.

    A run without any heartbeat yet counts from its start. Returns how many were marked. The
    caller commits (the session is the caller's unit of work).
    """
    cutoff = now - timedelta(seconds=stale_after_s)
    runs = session.exec(select(TrainingRun).where(TrainingRun.state == RunState.RUNNING))
    stale = [run for run in runs if (run.heartbeat_at or run.started_at) < cutoff]
    for run in stale:
        run.state = RunState.FAILED
        run.error = INTERRUPTED
        run.finished_at = now
        session.add(run)
    session.flush()
    return len(stale)
