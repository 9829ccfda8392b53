"""`apprentice sandbox`: try the whole loop in a browser, with no Slack workspace.

The local Slack emulator plays Slack, the real bot is wired to it over signed HTTP, and a small
web page (plain HTML and JavaScript, served from `static/`) looks and behaves like a Slack
channel: people to act as, channels, threads, Block Kit, modals, slash commands, App Home.
See `Sandbox`.
"""

from bot.sandbox.sandbox import Sandbox, load_default_engine
from bot.sandbox.server import PortTaken

__all__ = ["PortTaken", "Sandbox", "load_default_engine"]
