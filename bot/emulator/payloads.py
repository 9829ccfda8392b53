"""Pure builders for what Slack sends an app: event envelopes, slash commands, interactions.

Shapes follow Slack's documented payloads (fields Bolt and typical listeners read are all
present: `event_id`, `authorizations`, `channel_type`, `trigger_id`, `response_url`,
`container`, `message`, `view.state.values`, ...). They take plain values and return dicts,
so tests can build a payload, change one field, and deliver it raw.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid

MENTION = re.compile(r"<@([UW][A-Z0-9]+)(?:\|[^>]*)?>")


def new_event_id() -> str:
    return "Ev" + secrets.token_hex(5).upper()


def mentions(text: str) -> list[str]:
    """User ids mentioned as <@U123> in message text."""
    return MENTION.findall(text or "")


def rich_text_blocks(text: str) -> list[dict]:
    """The rich_text block Slack's clients attach to a typed message (mentions as user nodes)."""
    elements: list[dict] = []
    pos = 0
    for match in MENTION.finditer(text):
        if match.start() > pos:
            elements.append({"type": "text", "text": text[pos : match.start()]})
        elements.append({"type": "user", "user_id": match.group(1)})
        pos = match.end()
    if pos < len(text):
        elements.append({"type": "text", "text": text[pos:]})
    return [
        {
            "type": "rich_text",
            "block_id": secrets.token_hex(2),
            "elements": [{"type": "rich_text_section", "elements": elements}],
        }
    ]


def user_message(*, user: str, team_id: str, text: str, ts: str, thread_ts: str | None) -> dict:
    """A message as a person's client posts it (stored and sent in events)."""
    message = {
        "type": "message",
        "user": user,
        "text": text,
        "ts": ts,
        "team": team_id,
        "client_msg_id": str(uuid.uuid4()),
        "blocks": rich_text_blocks(text),
    }
    if thread_ts:
        message["thread_ts"] = thread_ts
    return message


def message_event(
    *, message: dict, channel: str, channel_type: str, parent_user_id: str | None
) -> dict:
    event = dict(message, channel=channel, event_ts=message["ts"], channel_type=channel_type)
    if parent_user_id and message.get("thread_ts") and message["thread_ts"] != message["ts"]:
        event["parent_user_id"] = parent_user_id
    return event


def app_mention_event(*, message: dict, channel: str) -> dict:
    event = {k: v for k, v in message.items() if k != "type"}
    return {"type": "app_mention", **event, "channel": channel, "event_ts": message["ts"]}


def event_envelope(
    *, event: dict, team_id: str, api_app_id: str, bot_user_id: str, event_id: str | None = None
) -> dict:
    """The `event_callback` wrapper around every Events API event."""
    return {
        "token": "emulator-verification-token",
        "team_id": team_id,
        "context_team_id": team_id,
        "context_enterprise_id": None,
        "api_app_id": api_app_id,
        "event": event,
        "type": "event_callback",
        "event_id": event_id or new_event_id(),
        "event_time": int(time.time()),
        "authorizations": [
            {
                "enterprise_id": None,
                "team_id": team_id,
                "user_id": bot_user_id,
                "is_bot": True,
                "is_enterprise_install": False,
            }
        ],
        "is_ext_shared_channel": False,
        "event_context": "4-" + secrets.token_hex(16),
    }


def slash_command_form(
    *,
    team_id: str,
    team_domain: str,
    api_app_id: str,
    channel: dict,
    user: dict,
    command: str,
    text: str,
    response_url: str,
    trigger_id: str,
) -> dict[str, str]:
    return {
        "token": "emulator-verification-token",
        "team_id": team_id,
        "team_domain": team_domain,
        "channel_id": channel["id"],
        "channel_name": "directmessage" if channel.get("is_im") else channel.get("name", ""),
        "user_id": user["id"],
        "user_name": user["name"],
        "command": command,
        "text": text,
        "api_app_id": api_app_id,
        "is_enterprise_install": "false",
        "response_url": response_url,
        "trigger_id": trigger_id,
    }


def _user_ref(user: dict, team_id: str) -> dict:
    return {"id": user["id"], "username": user["name"], "name": user["name"], "team_id": team_id}


def block_actions_payload(
    *,
    team_id: str,
    team_domain: str,
    api_app_id: str,
    user: dict,
    action: dict,
    trigger_id: str,
    container: dict,
    channel: dict | None = None,
    message: dict | None = None,
    view: dict | None = None,
    response_url: str | None = None,
) -> dict:
    payload = {
        "type": "block_actions",
        "user": _user_ref(user, team_id),
        "api_app_id": api_app_id,
        "token": "emulator-verification-token",
        "container": container,
        "trigger_id": trigger_id,
        "team": {"id": team_id, "domain": team_domain},
        "enterprise": None,
        "is_enterprise_install": False,
        "state": {"values": {}},
        "actions": [action],
    }
    if channel is not None:
        payload["channel"] = {"id": channel["id"], "name": channel.get("name", "directmessage")}
    if message is not None:
        payload["message"] = message
    if view is not None:
        payload["view"] = view
        payload["state"] = view.get("state", {"values": {}})
    if response_url is not None:
        payload["response_url"] = response_url
    return payload


def button_action(*, button: dict, block_id: str) -> dict:
    action = {
        "type": "button",
        "action_id": button.get("action_id", ""),
        "block_id": block_id,
        "text": button["text"],
        "action_ts": f"{time.time():.6f}",
    }
    for key in ("value", "style", "url"):
        if key in button:
            action[key] = button[key]
    return action


def view_submission_payload(
    *, team_id: str, team_domain: str, api_app_id: str, user: dict, view: dict, trigger_id: str
) -> dict:
    return {
        "type": "view_submission",
        "team": {"id": team_id, "domain": team_domain},
        "user": _user_ref(user, team_id),
        "api_app_id": api_app_id,
        "token": "emulator-verification-token",
        "trigger_id": trigger_id,
        "view": view,
        "response_urls": [],
        "is_enterprise_install": False,
        "enterprise": None,
    }


def view_closed_payload(
    *, team_id: str, team_domain: str, api_app_id: str, user: dict, view: dict
) -> dict:
    return {
        "type": "view_closed",
        "team": {"id": team_id, "domain": team_domain},
        "user": _user_ref(user, team_id),
        "api_app_id": api_app_id,
        "token": "emulator-verification-token",
        "view": view,
        "is_cleared": False,
        "is_enterprise_install": False,
    }


def input_state(element: dict, given) -> dict:
    """Turn a test's plain value into the `state.values` entry Slack sends for an element."""
    kind = element.get("type", "plain_text_input")
    if isinstance(given, dict) and "type" in given:
        return given  # already in Slack's shape
    if given is None:  # an optional input left empty
        if kind in {"static_select", "radio_buttons"}:
            return {"type": kind, "selected_option": None}
        if kind in {"multi_static_select", "checkboxes"}:
            return {"type": kind, "selected_options": []}
        return {"type": kind, "value": None}
    if kind in {"static_select", "radio_buttons"}:
        return {"type": kind, "selected_option": _find_option(element, given)}
    if kind in {"multi_static_select", "checkboxes"}:
        values = given if isinstance(given, list) else [given]
        return {"type": kind, "selected_options": [_find_option(element, v) for v in values]}
    if kind in {"users_select", "conversations_select", "channels_select"}:
        key = {"users_select": "selected_user", "channels_select": "selected_channel"}
        return {"type": kind, key.get(kind, "selected_conversation"): given}
    if kind == "multi_users_select":
        return {"type": kind, "selected_users": list(given)}
    if kind == "datepicker":
        return {"type": kind, "selected_date": given}
    if kind == "timepicker":
        return {"type": kind, "selected_time": given}
    return {"type": kind, "value": None if given is None else str(given)}


def _find_option(element: dict, given) -> dict:
    options = list(element.get("options") or [])
    for group in element.get("option_groups") or []:
        options.extend(group.get("options", []))
    for option in options:
        if given in (option.get("value"), option.get("text", {}).get("text")):
            return option
    choices = [o.get("value") for o in options]
    raise ValueError(f"no option {given!r} in {element.get('action_id')!r}; options: {choices}")


def find_button(blocks: list[dict], label: str | None, action_id: str | None):
    """The button whose text (or action_id) matches, and its block's id."""
    seen = []
    for block in blocks:
        elements = list(block.get("elements") or []) if block.get("type") == "actions" else []
        if isinstance(block.get("accessory"), dict):
            elements.append(block["accessory"])
        for element in elements:
            if not isinstance(element, dict) or element.get("type") != "button":
                continue
            text = (element.get("text") or {}).get("text")
            seen.append(text)
            if (label is not None and text == label) or (
                action_id is not None and element.get("action_id") == action_id
            ):
                return element, block.get("block_id", "")
    raise LookupError(f"no button {label or action_id!r}; buttons there: {seen}")


def view_state_values(view: dict, values: dict) -> dict:
    """`view.state.values` for every input block, as Slack's client would fill it."""
    state: dict[str, dict] = {}
    known = {b.get("block_id") for b in view.get("blocks", []) if b.get("type") == "input"}
    unknown = set(values) - known
    if unknown:
        raise KeyError(f"no input blocks {sorted(unknown)} in view; inputs: {sorted(known)}")
    for block in view.get("blocks", []):
        if block.get("type") != "input":
            continue
        element = block.get("element", {})
        action_id = element.get("action_id", "")
        entry = values.get(block["block_id"], {})
        if set(entry) - {action_id}:
            raise KeyError(f"input {block['block_id']} has action_id {action_id!r}, not {entry}")
        given = entry.get(action_id)
        if given is None and "initial_value" in element:
            given = element["initial_value"]
        if given in (None, "", []) and not block.get("optional", False):
            raise ValueError(
                f"input {block['block_id']}/{action_id} is required: Slack's client would not "
                "submit the form without it"
            )
        state[block["block_id"]] = {action_id: input_state(element, given)}
    return state
