"""The learning schedule with the real APScheduler on a real SQLite database."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import text
from sqlmodel import Session

from bot.scheduler import (
    CRON_JOB_ID,
    THRESHOLD_JOB_ID,
    build_scheduler,
    last_cycle_at,
    pause_state,
    pause_training,
    resume_training,
    training_paused,
)
from bot.store import open_database, session_scope
from bot.store.models import AdapterVersion, Answer, Question, TrainingRun, Verdict, utcnow

CYCLE = "tests.test_scheduler:fake_cycle"
calls: list[dict] = []
calls_changed = threading.Condition()


def fake_cycle(*, settings, trigger):
    """Stands in for the learning cycle: records the call and, like it, opens a TrainingRun."""
    engine = open_database(settings.database_url)
    with session_scope(engine) as session:
        session.add(TrainingRun(trigger=trigger))
    engine.dispose()
    with calls_changed:
        calls.append({"trigger": trigger, "database_url": settings.database_url})
        calls_changed.notify_all()


@pytest.fixture(autouse=True)
def _no_calls():
    calls.clear()
    yield
    calls.clear()


@pytest.fixture
def engine(sqlite_url):
    engine = open_database(sqlite_url)
    yield engine
    engine.dispose()


def _stored_job_ids(engine):
    with engine.connect() as connection:
        return sorted(row[0] for row in connection.execute(text("SELECT id FROM apscheduler_jobs")))


def _add_verdicts(engine, count):
    with session_scope(engine) as session:
        for _ in range(count):
            question = Question(source="mention", channel_id="C1", channel_type="channel", text="q")
            session.add(question)
            session.flush()
            answer = Answer(question_id=question.id, text="a")
            session.add(answer)
            session.flush()
            session.add(Verdict(answer_id=answer.id, kind="approve", author_id="UEXPERT"))


class JobRuns:
    """Counts executions of one job, so a test waits for runs rather than for the clock."""

    def __init__(self, scheduler, job_id):
        self.job_id = job_id
        self.count = 0
        self.errors = []
        self.changed = threading.Condition()
        scheduler.add_listener(self._seen, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)

    def _seen(self, event):
        if event.job_id != self.job_id:
            return
        with self.changed:
            self.count += 1
            if event.exception is not None:
                self.errors.append(event.exception)
            self.changed.notify_all()

    def wait_for_more(self, runs=2, timeout=60):
        with self.changed:
            target = self.count + runs
            assert self.changed.wait_for(lambda: self.count >= target, timeout=timeout)
        assert self.errors == []


def _wait_for_calls(count, timeout=60):
    with calls_changed:
        assert calls_changed.wait_for(lambda: len(calls) >= count, timeout=timeout)


def test_jobs_persist_across_a_restart_without_duplicates(make_settings, sqlite_url, engine):
    settings = make_settings(database_url=sqlite_url, train_cron="0 3 * * *", train_check_s=3600)
    first = build_scheduler(settings=settings, db_url=sqlite_url, run_cycle=CYCLE)
    first.start()
    first.shutdown()
    assert _stored_job_ids(engine) == sorted([CRON_JOB_ID, THRESHOLD_JOB_ID])

    # The bot restarts with another nightly time: same ids, the stored jobs are replaced.
    settings = make_settings(database_url=sqlite_url, train_cron="30 4 * * 1-5", train_check_s=60)
    second = build_scheduler(settings=settings, db_url=sqlite_url, run_cycle=CYCLE)
    second.start(paused=True)
    try:
        jobs = {job.id: job for job in second.get_jobs()}
        assert sorted(jobs) == sorted([CRON_JOB_ID, THRESHOLD_JOB_ID])
        assert _stored_job_ids(engine) == sorted([CRON_JOB_ID, THRESHOLD_JOB_ID])
        assert str(jobs[CRON_JOB_ID].trigger) == str(CronTrigger.from_crontab("30 4 * * 1-5"))
        assert jobs[THRESHOLD_JOB_ID].trigger.interval == timedelta(seconds=60)
        assert jobs[CRON_JOB_ID].coalesce and jobs[CRON_JOB_ID].max_instances == 1
        # The stored job carries no secret: only a digest of the URL and the cycle's name.
        assert set(jobs[CRON_JOB_ID].kwargs) == {"context", "run_cycle"}
        assert sqlite_url not in str(jobs[CRON_JOB_ID].kwargs)
    finally:
        second.shutdown()


def test_an_empty_cron_removes_the_stored_schedule(make_settings, sqlite_url, engine):
    settings = make_settings(database_url=sqlite_url, train_cron="0 3 * * *", train_check_s=3600)
    scheduler = build_scheduler(settings=settings, db_url=sqlite_url, run_cycle=CYCLE)
    scheduler.start()
    scheduler.shutdown()
    settings = make_settings(database_url=sqlite_url, train_cron="", train_check_s=3600)
    scheduler = build_scheduler(settings=settings, db_url=sqlite_url, run_cycle=CYCLE)
    scheduler.start(paused=True)
    try:
        assert [job.id for job in scheduler.get_jobs()] == [THRESHOLD_JOB_ID]
    finally:
        scheduler.shutdown()


def test_the_cron_job_runs_the_cycle_unless_paused(make_settings, sqlite_url, engine):
    settings = make_settings(database_url=sqlite_url, train_cron="0 3 * * *", train_check_s=3600)
    scheduler = build_scheduler(settings=settings, db_url=sqlite_url, run_cycle=CYCLE)
    scheduler.start(paused=True)
    try:
        job = scheduler.get_job(CRON_JOB_ID)  # as stored: its function reference and kwargs
        pause_training(db=engine, actor="UADMIN")
        job.func(**job.kwargs)
        assert calls == []
        resume_training(db=engine, actor="UADMIN")
        job.func(**job.kwargs)
        assert calls == [{"trigger": "schedule", "database_url": sqlite_url}]
    finally:
        scheduler.shutdown()


def test_the_threshold_job_starts_one_cycle_once_enough_verdicts_arrive(
    make_settings, sqlite_url, engine
):
    settings = make_settings(
        database_url=sqlite_url, train_cron="", train_check_s=0.2, train_min_new_verdicts=3
    )
    scheduler = build_scheduler(settings=settings, db_url=sqlite_url, run_cycle=CYCLE)
    runs = JobRuns(scheduler, THRESHOLD_JOB_ID)
    _add_verdicts(engine, 2)
    scheduler.start()
    try:
        runs.wait_for_more(2)
        assert calls == []  # two verdicts: below the threshold
        _add_verdicts(engine, 1)
        _wait_for_calls(1)
        assert calls[0]["trigger"] == "verdicts"
        runs.wait_for_more(3)
        # The cycle's run moved "since" past those verdicts: nothing new, no second cycle.
        assert len(calls) == 1
    finally:
        scheduler.shutdown()


def test_a_paused_scheduler_starts_nothing_and_the_pause_persists(
    make_settings, sqlite_url, engine
):
    pause_training(db=engine, actor="UADMIN")
    restarted = open_database(sqlite_url)  # another process, or the bot after a restart
    assert training_paused(db=restarted)
    state = pause_state(db=restarted)
    assert state.actor == "UADMIN" and state.since is not None

    settings = make_settings(
        database_url=sqlite_url, train_cron="", train_check_s=0.2, train_min_new_verdicts=1
    )
    scheduler = build_scheduler(settings=settings, db_url=sqlite_url, run_cycle=CYCLE)
    runs = JobRuns(scheduler, THRESHOLD_JOB_ID)
    _add_verdicts(engine, 5)
    scheduler.start()
    try:
        runs.wait_for_more(3)
        assert calls == []
        resume_training(db=restarted, actor="UADMIN")
        assert not training_paused(db=engine)
        _wait_for_calls(1)
    finally:
        scheduler.shutdown()
        restarted.dispose()


def test_last_cycle_is_the_newer_of_the_last_run_and_the_last_version(engine):
    with Session(engine) as session:
        assert last_cycle_at(session=session) is None
    now = utcnow()
    with session_scope(engine) as session:
        session.add(TrainingRun(trigger="cli", started_at=now - timedelta(hours=2)))
        session.add(
            AdapterVersion(name="v0001", base_model="m", created_at=now - timedelta(hours=1))
        )
    with Session(engine) as session:
        assert last_cycle_at(session=session) == now - timedelta(hours=1)


def test_bad_configuration_is_refused_with_the_fix(make_settings, sqlite_url):
    with pytest.raises(ValueError, match="APPRENTICE_TRAIN_CRON"):
        build_scheduler(
            settings=make_settings(train_cron="every night"), db_url=sqlite_url, run_cycle=CYCLE
        )
    with pytest.raises(ValueError, match="module:function|package.module:function"):
        build_scheduler(settings=make_settings(), db_url=sqlite_url, run_cycle="fake_cycle")
    with pytest.raises(ValueError, match="has no"):
        build_scheduler(
            settings=make_settings(), db_url=sqlite_url, run_cycle="tests.test_scheduler:nothing"
        )
