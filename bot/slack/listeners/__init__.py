"""Listeners, one module per kind of Slack request; each has `register(app, services)`.

events (mentions, DMs, thread follow-ups, auto-answer channels), commands (`/ask`, `/apprentice`),
actions (answer buttons), views (correction and rejection modals), home (App Home).
"""

from __future__ import annotations

from slack_bolt import App

from bot.slack.services import Services


def register_all(app: App, services: Services) -> None:
    from bot.slack.listeners import actions, commands, events, home, views

    for kind in (events, commands, actions, views, home):
        kind.register(app, services)
