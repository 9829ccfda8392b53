"""`apprentice run`: the bot, over Socket Mode when SLACK_APP_TOKEN is set, else HTTP.

Parses, checks the Slack configuration (naming what is missing) and delegates to
`bot.runtime`; `sandbox` (the bot wired to the local emulator) comes in a later change.
"""

from __future__ import annotations

import logging
import signal

import typer

from bot.cli.common import USER_ERRORS, fail, load_settings


def run(
    port: int = typer.Option(None, help="HTTP port (default 3000, APPRENTICE_PORT)"),
    host: str = typer.Option(None, help="HTTP bind address (default 0.0.0.0, APPRENTICE_HOST)"),
) -> None:
    """Run the bot: Socket Mode when SLACK_APP_TOKEN is set, else HTTP on --port."""
    from bot.runtime import build_bot

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = load_settings(port=port, host=host)
    problems = settings.slack_problems()
    if problems:
        fail("; ".join(problems))
    try:
        bot = build_bot(settings)
    except USER_ERRORS as exc:
        fail(str(exc))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        if settings.slack_app_token:
            typer.echo("Apprentice: connecting to Slack over Socket Mode (Ctrl-C stops).")
            bot.serve_socket_mode(block=True)
        else:
            server = bot.serve_http()
            typer.echo(f"Apprentice: serving {server.url}/slack/events (Ctrl-C stops).")
            server.wait()
    except KeyboardInterrupt:
        typer.echo("stopping…")
    finally:
        bot.close()


def register(app: typer.Typer) -> None:
    app.command("run")(run)
