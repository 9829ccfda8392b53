"""The store: SQLModel tables, migrations, and keyword-only functions over them."""

from bot.store.db import make_engine, migrate, open_database, session_scope

__all__ = ["make_engine", "migrate", "open_database", "session_scope"]
