"""`apprentice run`: the bot, over Socket Mode when SLACK_APP_TOKEN is set, else HTTP.

Parses, checks the Slack configuration (naming what is missing) and delegates to
`bot.runtime`. `apprentice sandbox`: the bot wired to the local Slack emulator, with a web page
to use it as a member, an expert or an admin (`bot.sandbox`); it needs no Slack configuration.
"""

from __future__ import annotations

import faulthandler
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
    _stop_on_sigterm()
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


def sandbox(
    port: int = typer.Option(8080, help="port of the sandbox's web page"),
    host: str = typer.Option(
        "127.0.0.1", help="bind address; anyone who can reach it can act as any sandbox user"
    ),
    base_model: str = typer.Option(
        None, help="the packaged model name, a local folder or a hub id (APPRENTICE_BASE_MODEL)"
    ),
) -> None:
    """Try Apprentice in a browser: a local Slack workspace, the bot and a Slack-like page."""
    from bot.sandbox import PortTaken, Sandbox

    # the bot's own progress (e.g. the model's first conversion), not every library's chatter
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bot").setLevel(logging.INFO)
    settings = load_settings(base_model=base_model)
    try:
        box = Sandbox.start(settings, host=host, port=port)
    except PortTaken as exc:
        fail(exc.strerror)
    except USER_ERRORS as exc:
        fail(str(exc))
    _stop_on_sigterm()
    try:
        typer.echo(f"Apprentice sandbox: open {box.url} (Ctrl-C stops)")
        if not box.page.loopback_only:
            typer.secho(
                f"warning: bound to {host}: anyone who can reach it can act as any sandbox user",
                fg=typer.colors.YELLOW,
                err=True,
            )
        typer.echo(f"loading the model {settings.base_model}; the page says when the bot is ready…")
        while not box.engine.wait_ready(timeout=5.0) and box.engine.state == "starting":
            typer.echo(f"  still loading… {box.engine.elapsed_s():.0f} s")
        if box.engine.state == "ready":
            typer.echo(f"bot ready: model loaded in {box.engine.elapsed_s():.1f} s")
        else:
            typer.secho(
                f"error: the model did not load: {box.engine.error}; the page stays up, but the "
                "bot cannot answer. Check APPRENTICE_BASE_MODEL / --base-model.",
                fg=typer.colors.RED,
                err=True,
            )
        box.page.wait()
    except KeyboardInterrupt:
        typer.echo("stopping…")
    finally:
        box.close()


def _stop_on_sigterm() -> None:
    """SIGTERM stops the command as Ctrl-C does; SIGUSR1 writes every thread's stack to stderr
    (what a process that does not stop is waiting on)."""
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("sandbox")(sandbox)
