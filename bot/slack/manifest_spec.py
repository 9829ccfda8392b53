"""What the app asks Slack for, declared once: the listeners register from these names and
`tests/test_manifests.py` checks `manifests/*.yaml` against them, so the two cannot drift.

Scopes follow from the Web API methods the code calls (`METHOD_SCOPES`); the manifest test
records every method called during an end-to-end run through the emulator and maps it here.
"""

from __future__ import annotations

# Events API: the Bolt event types we listen to, and the subscriptions they need.
APP_MENTION = "app_mention"
MESSAGE = "message"
APP_HOME_OPENED = "app_home_opened"
BOT_EVENTS = (
    "app_home_opened",
    "app_mention",
    "message.channels",  # thread follow-ups and auto-answer channels
    "message.groups",  # the same in private channels
    "message.im",  # DMs with the bot
)

# Slash commands (name -> manifest description and usage hint).
ASK_COMMAND = "/ask"
ADMIN_COMMAND = "/apprentice"
COMMANDS = {
    ASK_COMMAND: ("Ask Apprentice a question", "What is our deploy process?"),
    ADMIN_COMMAND: (
        "Apprentice admin: experts, channels, training, adapters",
        "help | status | experts add @user | channel auto on | train | rollback",
    ),
}

# Web API method -> bot scopes it needs, space-separated (None: no scope needed).
METHOD_SCOPES: dict[str, str | None] = {
    "auth.test": None,
    "chat.postMessage": "chat:write",
    "chat.update": "chat:write",
    "chat.postEphemeral": "chat:write",
    "chat.getPermalink": None,  # citations link to the thread an expert judged
    "conversations.info": "channels:read groups:read im:read mpim:read",
    "views.open": None,
    "views.publish": None,
    "views.update": None,
    "usergroups.users.list": "usergroups:read",
    "conversations.open": "im:write",  # /apprentice export goes to the admin's DM
    "files.getUploadURLExternal": "files:write",  # files_upload_v2: training reports, exports
    "files.completeUploadExternal": "files:write",
}

# Methods the learning side calls outside Bolt's listeners (the training report after a
# scheduled cycle, the export upload): an end-to-end run of the listeners does not see them.
LEARNING_METHODS = (
    "chat.postMessage",
    "conversations.open",
    "files.getUploadURLExternal",
    "files.completeUploadExternal",
)

# Scopes the event subscriptions and commands need, beyond the methods above.
EVENT_SCOPES = {
    "app_mention": "app_mentions:read",
    "message.channels": "channels:history",
    "message.groups": "groups:history",
    "message.im": "im:history",
}
COMMAND_SCOPE = "commands"


def required_scopes(methods: set[str]) -> set[str]:
    """Bot scopes for the methods called, the learning side's methods, and those the events
    and commands need.

    Raises KeyError for a method not in `METHOD_SCOPES`, so a new call cannot slip by unmapped.
    """
    methods = set(methods) | set(LEARNING_METHODS)
    scopes = {scope for method in methods for scope in (METHOD_SCOPES[method] or "").split()}
    scopes |= {EVENT_SCOPES[event] for event in BOT_EVENTS if event in EVENT_SCOPES}
    if COMMANDS:
        scopes.add(COMMAND_SCOPE)
    return scopes  # type: ignore[return-value]
