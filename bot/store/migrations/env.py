"""Alembic environment: runs on the connection `bot.store.db.migrate` hands over."""

from alembic import context
from sqlmodel import SQLModel

import bot.store.models  # noqa: F401  (registers the tables on SQLModel.metadata)

connection = context.config.attributes.get("connection")
if connection is None:  # `alembic` run by hand: use the URL from the environment
    from bot.settings import Settings
    from bot.store.db import make_engine

    connection = make_engine(Settings().database_url).connect()

context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
