"""The Slack side: a Bolt app whose listeners parse, check, store and hand off.

`app.create_app(settings, services)` builds a Bolt `App`; `app.register(app, settings, services)`
attaches the listeners to any existing one (the plugin seam behind `bot.register`). Nothing here
imports torch: the engine is reached through `bot.engine.types` and the `Services` object.
"""
