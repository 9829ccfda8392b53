"""Helpers shared by CLI modules: settings, errors a user can act on."""

from __future__ import annotations

import typer

from bot.engine.types import EngineError
from bot.settings import Settings


def load_settings(**overrides) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except Exception as exc:  # pydantic's ValidationError: say which variable is wrong
        fail(f"configuration error: {exc}")


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


USER_ERRORS = (EngineError, ValueError, FileNotFoundError, PermissionError)
