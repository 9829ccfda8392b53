"""What Slack does with an app's answers to interactions: response URLs and ack bodies.

- `response_url` (slash commands, block actions): a JSON POST with `text`/`blocks` and one of
  `delete_original`, `replace_original`, or `response_type` (`ephemeral`, the default, or
  `in_channel`). Slack honours a URL up to 5 times within 30 minutes.
- A slash command's HTTP answer: an empty body shows nothing; plain text or JSON with `text`/
  `blocks` becomes an ephemeral message (or a channel message with `response_type: in_channel`).
- A view_submission's HTTP answer: empty closes the modal; `response_action` may be `errors`
  (the modal stays open, errors shown), `update`, `push` or `clear`.
"""

from __future__ import annotations

import copy
import json
import secrets

from bot.emulator import blocks_check
from bot.emulator.web_api import WebApi

MAX_RESPONSE_URL_USES = 5
RESPONSE_URL_TTL_S = 30 * 60


def new_response_url(
    api: WebApi,
    *,
    channel: str,
    user: str,
    message_ts: str | None = None,
    is_ephemeral: bool = False,
    thread_ts: str | None = None,
) -> str:
    key = secrets.token_hex(12)
    with api.ws.lock:
        api.ws.response_urls[key] = {
            "channel": channel,
            "user": user,
            "message_ts": message_ts,
            "is_ephemeral": is_ephemeral,
            "thread_ts": thread_ts,
            "created": api.ws.clock(),
            "uses": 0,
        }
    return f"{api.base_url}response/{key}"


def _find_ephemeral(api: WebApi, ts: str | None) -> dict | None:
    return next((e for e in api.ws.ephemerals if e["ts"] == ts), None)


def _post(api: WebApi, *, channel: str, user: str, body: dict, ephemeral: bool, thread_ts):
    message = api.bot_message(
        text=str(body.get("text") or ""),
        blocks=body.get("blocks"),
        thread_ts=body.get("thread_ts") or thread_ts,
        params=body,
    )
    if ephemeral:
        message.update(user=user, channel=channel, is_ephemeral=True)
        api.ws.ephemerals.append(message)
    else:
        api.ws.store_message(channel, message)
    return message


def apply_response_url(api: WebApi, *, key: str, body: dict) -> tuple[int, str]:
    """Handle a POST to a response URL. Returns (HTTP status, body text) as Slack would."""
    with api.ws.lock:
        api.ws.calls.append(("response_url", copy.deepcopy(body)))
        target = api.ws.response_urls.get(key)
        if target is None:
            return 404, "no_such_url"
        if (
            target["uses"] >= MAX_RESPONSE_URL_USES
            or api.ws.clock() - target["created"] > RESPONSE_URL_TTL_S
        ):
            return 404, "used_url"
        target["uses"] += 1
        channel, ts = target["channel"], target["message_ts"]
        if body.get("delete_original"):
            if target["is_ephemeral"]:
                api.ws.ephemerals = [e for e in api.ws.ephemerals if e["ts"] != ts]
            elif ts:
                api.ws.delete_message(channel, ts)
            api.ws.notify()
            return 200, "ok"
        error, _ = blocks_check.check_message(text=body.get("text"), blocks=body.get("blocks"))
        if error:
            return 400, error
        if body.get("replace_original") and ts:
            original = (
                _find_ephemeral(api, ts)
                if target["is_ephemeral"]
                else api.ws.find_message(channel, ts)
            )
            if original is None:
                return 404, "message_not_found"
            original["text"] = str(body.get("text") or "")
            if "blocks" in body:
                original["blocks"] = api.with_block_ids(body["blocks"])
            original["edited"] = {"user": api.ws.bot_user_id, "ts": api.ws.next_ts()}
        else:
            _post(
                api,
                channel=channel,
                user=target["user"],
                body=body,
                ephemeral=body.get("response_type") != "in_channel",
                thread_ts=target["thread_ts"],
            )
        api.ws.notify()
        return 200, "ok"


def apply_command_answer(api: WebApi, *, channel: str, user: str, body: bytes, content_type):
    """Show what a slash command's HTTP answer says, as Slack does."""
    text = body.decode("utf-8", "replace").strip()
    if not text:
        return
    answer = None
    if "json" in (content_type or "") or text.startswith("{"):
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
    if not isinstance(answer, dict):
        answer = {"text": text}
    with api.ws.lock:
        _post(
            api,
            channel=channel,
            user=user,
            body=answer,
            ephemeral=answer.get("response_type") != "in_channel",
            thread_ts=None,
        )
        api.ws.notify()


def close_modal(api: WebApi, *, user: str, view_id: str, clear: bool = False) -> None:
    with api.ws.lock:
        stack = api.ws.modal_stacks.get(user, [])
        if clear or (stack and stack[0] == view_id):
            api.ws.modal_stacks[user] = []
        elif view_id in stack:
            del stack[stack.index(view_id) :]
        api.ws.notify()


def apply_view_answer(api: WebApi, *, user: str, view_id: str, answer) -> None:
    """Apply a view_submission's `response_action` (or close the modal when there is none)."""
    action = answer.get("response_action") if isinstance(answer, dict) else None
    with api.ws.lock:
        view = api.ws.views[view_id]
        view.pop("errors", None)
        if action == "errors":
            view["errors"] = dict(answer.get("errors") or {})
        elif action in ("update", "push"):
            new_view = answer.get("view")
            error, messages = blocks_check.check_view(new_view)
            if error:
                view["errors"] = {"_response_action": "; ".join(messages) or error}
            elif action == "update":
                record = api.view_record(
                    new_view,
                    view_id=view_id,
                    root=view["root_view_id"],
                    previous=view["previous_view_id"],
                )
                view.clear()
                view.update(record)
            else:
                stack = api.ws.modal_stacks.setdefault(user, [])
                new_id = api.ws.new_id("V")
                api.ws.views[new_id] = api.view_record(
                    new_view, view_id=new_id, root=stack[0] if stack else new_id, previous=view_id
                )
                api.ws.view_owner[new_id] = user
                stack.append(new_id)
        else:
            close_modal(api, user=user, view_id=view_id, clear=action == "clear")
        api.ws.notify()
