"""The `apprentice` command: parses arguments and delegates; no logic lives here.

Commands are grouped by side: `model_commands` (ask, train, adapters, export) and
`slack_commands` (run, sandbox). Each module exposes `register(app: typer.Typer)`.
"""

from __future__ import annotations

import os

import typer

app = typer.Typer(
    name="apprentice",
    help="Apprentice: a Slack bot that learns from a team's experts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    from bot.cli import learning_commands, model_commands, slack_commands

    model_commands.register(app)
    slack_commands.register(app)
    learning_commands.register(app)


def main() -> None:
    # The hub is unreachable here and retries for a minute: stay offline unless asked.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _register_commands()
    app()
