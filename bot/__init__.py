"""Apprentice: a Slack bot that learns from a team's experts.

`bot.register(app, settings)` attaches Apprentice's listeners to an existing `slack_bolt.App`.
"""

__version__ = "0.1.0"


def register(app, settings=None, **kwargs):
    """Attach Apprentice's listeners to an existing Bolt `App` (the plugin seam)."""
    from bot.slack.app import register as _register

    return _register(app, settings, **kwargs)
