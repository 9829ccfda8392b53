"""Lease locks and stale runs, on SQLite and PostgreSQL (the `database_url` fixture runs both)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from datetime import timedelta

import pytest
from sqlmodel import select

from bot.store import open_database, session_scope
from bot.store.db import make_engine
from bot.store.locks import (
    INTERRUPTED,
    LockBusy,
    acquire_lock,
    hold_lock,
    lock_holder,
    mark_stale_runs_failed,
    release_lock,
    renew_lock,
)
from bot.store.models import Lock, RunState, TrainingRun, utcnow


@pytest.fixture
def engine(database_url):
    engine = open_database(database_url)
    yield engine
    engine.dispose()


def _race(database_url, name, *, contenders=6):
    """`contenders` threads, each on its own engine, try to take `name` at the same moment."""
    engines = [make_engine(database_url) for _ in range(contenders)]
    barrier = threading.Barrier(contenders)
    results: dict[str, bool] = {}

    def contend(index):
        owner = f"replica-{index}"
        barrier.wait()
        results[owner] = acquire_lock(engine=engines[index], name=name, owner=owner, ttl_s=60)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for each in engines:
        each.dispose()
    return results


def test_of_racing_replicas_exactly_one_gets_a_free_lock(engine, database_url):
    results = _race(database_url, "training")
    winners = [owner for owner, won in results.items() if won]
    assert len(results) == 6 and len(winners) == 1
    assert lock_holder(engine=engine, name="training").owner == winners[0]


def test_of_racing_replicas_exactly_one_takes_over_an_expired_lock(engine, database_url):
    past = utcnow() - timedelta(hours=1)
    assert acquire_lock(engine=engine, name="training", owner="dead", ttl_s=1, now=past)
    assert lock_holder(engine=engine, name="training") is None  # expired: nobody holds it
    results = _race(database_url, "training")
    winners = [owner for owner, won in results.items() if won]
    assert len(winners) == 1
    assert lock_holder(engine=engine, name="training").owner == winners[0]


def test_an_unexpired_lock_is_not_taken_over(engine):
    now = utcnow()
    assert acquire_lock(engine=engine, name="training", owner="a", ttl_s=60, now=now)
    assert not acquire_lock(
        engine=engine, name="training", owner="b", ttl_s=60, now=now + timedelta(seconds=59)
    )
    assert acquire_lock(
        engine=engine, name="training", owner="b", ttl_s=60, now=now + timedelta(seconds=61)
    )
    assert lock_holder(engine=engine, name="training", now=now + timedelta(seconds=62)).owner == "b"


def test_only_the_owner_renews_or_releases(engine):
    now = utcnow()
    assert acquire_lock(engine=engine, name="training", owner="a", ttl_s=10, now=now)
    assert not renew_lock(engine=engine, name="training", owner="b", ttl_s=10)
    assert not release_lock(engine=engine, name="training", owner="b")
    assert lock_holder(engine=engine, name="training").owner == "a"

    later = now + timedelta(seconds=8)
    assert renew_lock(engine=engine, name="training", owner="a", ttl_s=10, now=later)
    # Renewed: still held past the first expiry.
    assert lock_holder(engine=engine, name="training", now=now + timedelta(seconds=15)) is not None
    assert release_lock(engine=engine, name="training", owner="a")
    assert lock_holder(engine=engine, name="training") is None
    assert acquire_lock(engine=engine, name="training", owner="b", ttl_s=10)


def test_locks_are_independent_by_name(engine):
    assert acquire_lock(engine=engine, name="training", owner="a", ttl_s=60)
    assert acquire_lock(engine=engine, name="export", owner="b", ttl_s=60)
    assert acquire_lock(engine=engine, name="training", owner="a", ttl_s=60)  # re-entrant


def test_a_holder_killed_with_sigkill_loses_its_lease_when_it_expires(engine, database_url):
    script = (
        "import sys, time\n"
        "from bot.store.db import make_engine\n"
        "from bot.store.locks import acquire_lock\n"
        "ok = acquire_lock(engine=make_engine(sys.argv[1]), name='training', owner='doomed', "
        "ttl_s=30)\n"
        "print('held' if ok else 'refused', flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, database_url],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        assert child.stdout.readline().strip() == "held"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert lock_holder(engine=engine, name="training").owner == "doomed"
    assert not acquire_lock(engine=engine, name="training", owner="survivor", ttl_s=30)
    after_expiry = utcnow() + timedelta(seconds=31)
    assert acquire_lock(
        engine=engine, name="training", owner="survivor", ttl_s=30, now=after_expiry
    )


def test_hold_lock_heartbeats_and_releases(engine):
    beats = threading.Event()
    with hold_lock(
        engine=engine, name="training", owner="cycle", ttl_s=0.6, on_heartbeat=beats.set
    ) as lost:
        first_expiry = lock_holder(engine=engine, name="training").expires_at
        assert beats.wait(timeout=30)
        # A beat renewed the lease: it now runs past the expiry it was acquired with.
        assert _expiry(engine) > first_expiry
        with pytest.raises(LockBusy, match="held by cycle"):
            with hold_lock(engine=engine, name="training", owner="other", ttl_s=60):
                pass
        assert not lost.is_set()
    assert lock_holder(engine=engine, name="training") is None


def test_hold_lock_reports_a_lease_taken_over(engine):
    with hold_lock(engine=engine, name="training", owner="slow", ttl_s=0.6) as lost:
        # Someone decided the lease had expired (the holder stalled) and took it.
        future = utcnow() + timedelta(seconds=5)
        assert acquire_lock(engine=engine, name="training", owner="fast", ttl_s=60, now=future)
        assert lost.wait(timeout=30)
    # The stalled holder's exit must not release the new holder's lock.
    assert lock_holder(engine=engine, name="training").owner == "fast"


def _expiry(engine):
    with session_scope(engine) as session:
        return session.get(Lock, "training").expires_at


def test_stale_running_runs_are_marked_failed(engine):
    now = utcnow()
    with session_scope(engine) as session:
        killed = TrainingRun(
            trigger="schedule",
            started_at=now - timedelta(hours=1),
            heartbeat_at=now - timedelta(minutes=10),
        )
        never_beat = TrainingRun(trigger="cli", started_at=now - timedelta(minutes=20))
        alive = TrainingRun(
            trigger="verdicts",
            started_at=now - timedelta(hours=2),
            heartbeat_at=now - timedelta(seconds=30),
        )
        finished = TrainingRun(
            trigger="cli", state=RunState.PROMOTED, started_at=now - timedelta(days=1)
        )
        session.add_all([killed, never_beat, alive, finished])
    with session_scope(engine) as session:
        assert mark_stale_runs_failed(session=session, now=now, stale_after_s=300) == 2
    with session_scope(engine) as session:
        by_id = {run.id: run for run in session.exec(select(TrainingRun))}
        assert by_id[killed.id].state == RunState.FAILED
        assert by_id[killed.id].error == INTERRUPTED
        assert by_id[killed.id].finished_at is not None
        assert by_id[never_beat.id].state == RunState.FAILED
        assert by_id[alive.id].state == RunState.RUNNING
        assert by_id[finished.id].state == RunState.PROMOTED
        assert by_id[finished.id].error is None
    with session_scope(engine) as session:  # a second sweep finds nothing new
        assert mark_stale_runs_failed(session=session, now=now, stale_after_s=300) == 0
