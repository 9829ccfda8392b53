"""What a click or a keystroke on the page becomes: a call on the emulator, as the chosen person.

The page never talks to the bot. It posts `{"user": ..., "action": ..., ...}` here, and each
action calls the emulator's own API for people (`post_message`, `slash_command`,
`click_button`, `submit_view`, ...), so what reaches the bot is exactly what Slack would send,
signed with the signing secret. Only seeded people can act: the page is a puppet of the
workspace, not a way into it.

Typed text is stored the way Slack's client stores it: `&`, `<` and `>` escaped, and `@name`
of a known person turned into a `<@U…>` mention.
"""

from __future__ import annotations

import re
import time

from bot.emulator.delivery import DeliveryResult
from bot.sandbox.seed import persona
from bot.slack.manifest_spec import COMMANDS

MENTION_WORD = re.compile(r"(?<![\w<@])@([A-Za-z][\w.-]*)")


class ActionError(ValueError):
    """A request the page should not have made, said so the person can fix it."""


def encode_typed(text: str, *, users: dict[str, dict]) -> str:
    """`text` as Slack stores a typed message: escaped, with `@name` as `<@U…>`."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    by_name = {}
    for user in users.values():
        by_name[user["name"].lower()] = user["id"]
        by_name.setdefault((user.get("real_name") or "").lower(), user["id"])

    def mention(match: re.Match) -> str:
        user_id = by_name.get(match.group(1).lower().rstrip(".-"))
        if user_id is None:
            return match.group(0)
        tail = match.group(1)[len(match.group(1).rstrip(".-")) :]
        return f"<@{user_id}>{tail}"

    return MENTION_WORD.sub(mention, text)


def split_command(text: str) -> tuple[str, str]:
    """'/apprentice status' -> ('/apprentice', 'status')."""
    command, _, rest = text.strip().partition(" ")
    return command.lower(), rest.strip()


def _text(args: dict, key: str = "text") -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ActionError(f"'{key}' must be non-empty text")
    return value


def _delivered(result: DeliveryResult) -> dict:
    if result.ok:
        return {"ok": True}
    return {"ok": True, "warning": f"the bot answered HTTP {result.status}"}


def perform(*, emulator, user_id: str, action: str, args: dict) -> dict:
    """Carry out one page action as `user_id`; returns what the page needs (e.g. a new ts)."""
    if persona(user_id) is None:
        raise ActionError(f"unknown person {user_id!r}: pick one of the sandbox's people")
    with emulator.ws.lock:
        users = {uid: dict(u) for uid, u in emulator.ws.users.items()}

    if action == "post":
        text = encode_typed(_text(args), users=users)
        ts = emulator.post_message(
            user=user_id,
            channel=_text(args, "channel"),
            text=text,
            thread_ts=args.get("thread_ts") or None,
            background=True,  # the page polls for the bot's reply; never wait on it here
        )
        return {"ok": True, "ts": ts}

    if action == "command":
        command, text = split_command(_text(args))
        if command not in COMMANDS:
            known = ", ".join(sorted(COMMANDS))
            raise ActionError(f"{command} is not a valid command here; try {known}")
        result = emulator.slash_command(
            user=user_id, channel=_text(args, "channel"), command=command, text=text
        )
        return _delivered(result)

    if action == "click":
        result = emulator.click_button(
            user=user_id,
            channel=_text(args, "channel"),
            message_ts=_text(args, "message_ts"),
            action_id=_text(args, "action_id"),
        )
        return _delivered(result)

    if action == "click_view":
        result = emulator.click_view_button(
            user=user_id, view_id=_text(args, "view_id"), action_id=_text(args, "action_id")
        )
        return _delivered(result)

    if action == "submit_view":
        values = args.get("values") or {}
        if not isinstance(values, dict):
            raise ActionError("'values' must be {block_id: {action_id: value}}")
        result = emulator.submit_view(user=user_id, view_id=_text(args, "view_id"), values=values)
        return _delivered(result)

    if action == "close_view":
        emulator.close_view(user=user_id, view_id=_text(args, "view_id"))
        return {"ok": True}

    if action == "open_home":
        # what Slack sends when someone opens the app's Home tab; the bot answers views.publish
        with emulator.ws.lock:
            dm = emulator.ws.im_with(user_id)
        event = {
            "type": "app_home_opened",
            "user": user_id,
            "channel": dm,
            "tab": "home",
            "event_ts": f"{time.time():.6f}",
        }
        return _delivered(emulator.deliver_event(event, retry=False))

    raise ActionError(f"unknown action {action!r}")
