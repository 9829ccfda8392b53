"""What the page shows one person: a JSON snapshot of the emulated workspace, taken under its lock.

The page polls this (every ~400 ms) and re-renders only when `version` changed, so a snapshot
is cheap to compare and complete in itself: people, the channels this person is in (and their
DM with the bot), every message of those channels with thread replies, their own ephemeral
messages, their open modal and their App Home. Slack shows each person only what is theirs;
so does this: another person's ephemerals and modals never leave the server.
"""

from __future__ import annotations

import copy
import hashlib
import json

from bot.sandbox.seed import PERSONAS, persona
from bot.slack.manifest_spec import COMMANDS

BOT_NAME = "Apprentice"


def _public(record: dict) -> dict:
    return {k: copy.deepcopy(v) for k, v in record.items() if not k.startswith("_")}


def page_state(*, emulator, user_id: str, bot: dict) -> dict:
    """The snapshot for `user_id`; `bot` is the engine's status ({"state", "detail", ...})."""
    ws = emulator.ws
    with ws.lock:
        users = {
            uid: {
                "id": uid,
                "name": u["name"],
                "real_name": u.get("real_name") or u["name"],
                "is_bot": bool(u.get("is_bot")),
                "role": (persona(uid).role if persona(uid) else ("app" if u.get("is_bot") else "")),
            }
            for uid, u in ws.users.items()
        }
        channels = []
        for channel in ws.channels.values():
            if channel.get("is_im") or not ws.is_member(channel["id"], user_id):
                continue
            channels.append(
                {
                    "id": channel["id"],
                    "name": channel["name"],
                    "kind": "channel",
                    "bot_member": ws.is_member(channel["id"], ws.bot_user_id),
                    "members": len(channel["_members"]),
                }
            )
        channels.sort(key=lambda c: c["name"])
        dm = ws.im_with(user_id)
        if dm:
            channels.append({"id": dm, "name": BOT_NAME, "kind": "im", "bot_member": True})
        messages = {c["id"]: [_public(m) for m in ws.messages.get(c["id"], [])] for c in channels}
        ephemerals = [_public(e) for e in ws.ephemerals if e.get("user") == user_id]
        stack = ws.modal_stacks.get(user_id, [])
        modal = _public(ws.views[stack[-1]]) if stack else None
        home = ws.home_views.get(user_id)
        home = _public(home) if home else None
        bot_user = ws.bot_user_id
    return {
        "me": user_id,
        "bot_user": bot_user,
        "bot": bot,
        "personas": [{"id": p.user_id, "label": p.label, "role": p.role} for p in PERSONAS],
        "commands": [
            {"name": name, "description": description, "usage": usage}
            for name, (description, usage) in COMMANDS.items()
        ],
        "users": users,
        "channels": channels,
        "messages": messages,
        "ephemerals": ephemerals,
        "modal": modal,
        "home": home,
    }


def versioned(state: dict) -> bytes:
    """The snapshot as JSON with a `version` (a digest of the rest): unchanged state, same bytes."""
    body = json.dumps(state, sort_keys=True, ensure_ascii=False)
    version = hashlib.sha1(body.encode("utf-8")).hexdigest()[:16]
    return json.dumps({"version": version, **state}, ensure_ascii=False).encode("utf-8")
