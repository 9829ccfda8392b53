"""The Web API methods a bot calls, answering with Slack's shapes and Slack's error codes.

One function per method, in `web_methods.METHODS`; `WebApi.call` checks the token, records the
call, runs the method under the workspace lock and returns (HTTP status, JSON body, headers).
The helpers the methods share (channel checks, message and view records) live on `WebApi`.
A method raises `ApiError("code")` for Slack's `{"ok": false, "error": "code"}`.

The emulator is deliberately a little stricter than Slack where leniency would hide a bug:
posting into a thread that does not exist is `thread_not_found`, and a view whose trigger is
older than `trigger_ttl` (3 s) is `expired_trigger_id` even if Slack's clock would let it pass.
"""

from __future__ import annotations

import base64
import json
import secrets
import time

from bot.emulator import blocks_check
from bot.emulator.state import Workspace

JSON_FIELDS = ("blocks", "attachments", "view", "files", "metadata")


class ApiError(Exception):
    def __init__(self, error: str, messages: list[str] | None = None, status: int = 200):
        super().__init__(error)
        self.error = error
        self.messages = messages or []
        self.status = status


def normalize(params: dict) -> dict:
    """Decode the JSON-in-a-form-field arguments (blocks, view, ...) the way Slack does."""
    out = dict(params)
    for key in JSON_FIELDS:
        value = out.get(key)
        if isinstance(value, str) and value.strip():
            try:
                out[key] = json.loads(value)
            except ValueError as exc:
                code = "invalid_blocks_format" if key == "blocks" else "invalid_arguments"
                raise ApiError(code, [f"[ERROR] {key} is not valid JSON: {exc}"]) from exc
        elif value == "":
            out.pop(key)
    return out


def flag(value) -> bool:
    return value in (True, 1, "1", "true", "True")


def require(params: dict, key: str, error: str) -> str:
    value = params.get(key)
    if value in (None, ""):
        raise ApiError(error)
    return str(value)


def page(items: list, params: dict, default_limit: int = 100) -> tuple[list, dict]:
    """Cursor pagination: the cursor is an opaque, base64-encoded offset."""
    limit = int(params.get("limit") or default_limit) or default_limit
    cursor = params.get("cursor") or ""
    start = int(base64.b64decode(cursor).decode().split(":")[1]) if cursor else 0
    chunk = items[start : start + limit]
    more = start + limit < len(items)
    next_cursor = base64.b64encode(f"offset:{start + limit}".encode()).decode() if more else ""
    return chunk, {"next_cursor": next_cursor}


class WebApi:
    """Slack's Web API over a `Workspace`."""

    def __init__(
        self,
        *,
        workspace: Workspace,
        bot_token: str,
        base_url,
        methods: dict,
        trigger_ttl: float = 3.0,
    ) -> None:
        self.ws = workspace
        self.methods = methods  # method name -> function(api, params) -> dict
        self.bot_token = bot_token
        self._base_url = base_url  # callable: "http://127.0.0.1:PORT/"
        self.trigger_ttl = trigger_ttl
        self.injected: dict[str, list[tuple[str, int, float | None]]] = {}

    def call(self, method: str, params: dict, token: str | None) -> tuple[int, dict, dict]:
        headers: dict[str, str] = {}
        try:
            try:
                params = normalize(params)
            finally:
                recorded = {k: v for k, v in params.items() if k != "token"}
                with self.ws.lock:
                    self.ws.calls.append((method, recorded))
            if token != self.bot_token:
                raise ApiError("not_authed" if not token else "invalid_auth")
            handler = self.methods.get(method)
            if handler is None:
                raise ApiError("unknown_method")
            with self.ws.lock:
                queue = self.injected.get(method)
                if queue:
                    error, status, retry_after = queue.pop(0)
                    if retry_after is not None:
                        headers["Retry-After"] = str(int(retry_after))
                    raise ApiError(error, status=status)
                try:
                    body = handler(self, params)
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    # an argument of the wrong shape (e.g. limit="ten", view as a list)
                    raise ApiError("invalid_arguments", [f"[ERROR] {exc!r}"]) from exc
                self.ws.notify()
            return 200, {"ok": True, **body}, headers
        except ApiError as exc:
            body = {"ok": False, "error": exc.error}
            if exc.messages:
                body["response_metadata"] = {"messages": exc.messages}
            return exc.status, body, headers

    # -- helpers shared by methods -----------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self._base_url()

    def channel_for_bot(self, params: dict, key: str = "channel", *, post: bool = False) -> str:
        """A channel the bot may use; a user id means the bot's DM with that user."""
        channel_id = require(params, key, "channel_not_found")
        if channel_id.startswith(("U", "W")) and channel_id in self.ws.users:
            channel_id = self.ws.im_with(channel_id) or self.open_im(channel_id)
        channel = self.ws.channels.get(channel_id)
        if channel is None:
            raise ApiError("channel_not_found")
        if post and channel.get("is_archived"):
            raise ApiError("is_archived")
        if not self.ws.is_member(channel_id, self.ws.bot_user_id):
            raise ApiError(
                "not_in_channel" if not channel.get("is_private") else "channel_not_found"
            )
        return channel_id

    def open_im(self, user_id: str) -> str:
        channel_id = self.ws.new_id("D")
        self.ws.channels[channel_id] = {
            "id": channel_id,
            "created": int(time.time()),
            "is_im": True,
            "is_channel": False,
            "is_group": False,
            "is_mpim": False,
            "is_private": True,
            "is_archived": False,
            "is_org_shared": False,
            "user": user_id,
            "_members": [user_id, self.ws.bot_user_id],
        }
        return channel_id

    def check_content(self, params: dict, *, for_update: dict | None = None) -> None:
        text = params.get("text", for_update.get("text") if for_update else None)
        blocks = params.get("blocks", for_update.get("blocks") if for_update else None)
        error, messages = blocks_check.check_message(
            text=text, blocks=blocks, attachments=params.get("attachments")
        )
        if error:
            raise ApiError(error, messages)

    def with_block_ids(self, blocks: list | None) -> list | None:
        """Slack gives every block without a block_id a random one."""
        if blocks is None:
            return None
        out = []
        for block in blocks:
            block = dict(block)
            block.setdefault("block_id", secrets.token_urlsafe(4))
            out.append(block)
        return out

    def bot_message(self, *, text: str, blocks, thread_ts: str | None, params: dict) -> dict:
        message = {
            "type": "message",
            "user": self.ws.bot_user_id,
            "bot_id": self.ws.bot_id,
            "app_id": self.ws.app_id,
            "text": text,
            "ts": self.ws.next_ts(),
            "team": self.ws.team_id,
            "bot_profile": {"id": self.ws.bot_id, "app_id": self.ws.app_id, "name": "apprentice"},
        }
        if blocks is not None:
            message["blocks"] = self.with_block_ids(blocks)
        for key in ("attachments", "metadata"):
            if key in params:
                message[key] = params[key]
        if thread_ts:
            message["thread_ts"] = thread_ts
        return message

    def thread_parent(self, channel_id: str, thread_ts) -> str | None:
        if not thread_ts:
            return None
        thread_ts = str(thread_ts)
        if self.ws.find_message(channel_id, thread_ts) is None:
            raise ApiError("thread_not_found")
        return thread_ts

    def view_record(self, view: dict, *, view_id: str, root: str, previous: str | None) -> dict:
        return {
            "id": view_id,
            "team_id": self.ws.team_id,
            "type": view["type"],
            "title": view.get("title"),
            "submit": view.get("submit"),
            "close": view.get("close"),
            "blocks": self.with_block_ids(view["blocks"]),
            "private_metadata": str(view.get("private_metadata", "")),
            "callback_id": str(view.get("callback_id", "")),
            "external_id": str(view.get("external_id", "")),
            "state": {"values": {}},
            "hash": f"{int(time.time())}.{secrets.token_hex(4)}",
            "clear_on_close": bool(view.get("clear_on_close", False)),
            "notify_on_close": bool(view.get("notify_on_close", False)),
            "root_view_id": root,
            "previous_view_id": previous,
            "app_id": self.ws.app_id,
            "app_installed_team_id": self.ws.team_id,
            "bot_id": self.ws.bot_id,
        }

    def checked_view(self, params: dict) -> dict:
        view = params.get("view")
        if view is None:
            raise ApiError("invalid_arguments", ["[ERROR] missing required field: view"])
        error, messages = blocks_check.check_view(view)
        if error:
            raise ApiError(error, messages)
        return view

    def take_trigger(self, params: dict) -> dict:
        trigger_id = require(params, "trigger_id", "invalid_trigger_id")
        trigger = self.ws.triggers.get(trigger_id)
        if trigger is None:
            raise ApiError("invalid_trigger_id")
        if trigger["used"]:
            raise ApiError("exchanged_trigger_id")
        if self.ws.clock() - trigger["issued"] > self.trigger_ttl:
            raise ApiError("expired_trigger_id")
        trigger["used"] = True
        return trigger

    def find_view(self, params: dict) -> dict:
        view_id, external_id = params.get("view_id"), params.get("external_id")
        if not view_id and not external_id:
            raise ApiError("invalid_arguments", ["[ERROR] view_id or external_id is required"])
        for view in self.ws.views.values():
            if view["id"] == view_id or (external_id and view["external_id"] == external_id):
                return view
        raise ApiError("not_found")
