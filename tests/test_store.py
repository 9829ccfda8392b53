from sqlalchemy import inspect
from sqlmodel import select

from bot.store import open_database, session_scope
from bot.store.models import Question


def test_migrations_create_every_table_and_rerun_is_a_no_op(database_url):
    engine = open_database(database_url)
    tables = set(inspect(engine).get_table_names())
    assert {"question", "answer", "verdict", "adapter_version", "training_run"} <= tables
    with session_scope(engine) as session:
        session.add(Question(source="cli", text="kept across upgrades?"))
    engine = open_database(database_url)  # second start: nothing lost
    with session_scope(engine) as session:
        assert [q.text for q in session.exec(select(Question))] == ["kept across upgrades?"]
