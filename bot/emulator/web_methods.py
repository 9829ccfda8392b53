"""The Web API methods, one function each: `(api, params) -> response fields` or `ApiError`.

They run under the workspace lock (taken by `WebApi.call`), so each one sees and leaves a
consistent workspace. Responses carry the fields Slack documents for each method.
"""

from __future__ import annotations

import copy
import time

from bot.emulator.web_api import ApiError, WebApi, flag, page, require


def auth_test(api: WebApi, params: dict) -> dict:
    ws = api.ws
    return {
        "url": f"https://{ws.team_domain}.slack.com/",
        "team": ws.team_domain,
        "user": ws.users.get(ws.bot_user_id, {}).get("name", "apprentice"),
        "team_id": ws.team_id,
        "user_id": ws.bot_user_id,
        "bot_id": ws.bot_id,
        "is_enterprise_install": False,
    }


def bots_info(api: WebApi, params: dict) -> dict:
    ws = api.ws
    if params.get("bot") not in (None, ws.bot_id):
        raise ApiError("bot_not_found")
    bot = {"id": ws.bot_id, "deleted": False, "name": "apprentice", "app_id": ws.app_id}
    return {"bot": {**bot, "user_id": ws.bot_user_id}}


# -- chat ------------------------------------------------------------------------------------


def chat_post_message(api: WebApi, params: dict) -> dict:
    channel_id = api.channel_for_bot(params, post=True)
    api.check_content(params)
    thread_ts = api.thread_parent(channel_id, params.get("thread_ts"))
    message = api.bot_message(
        text=str(params.get("text") or ""),
        blocks=params.get("blocks"),
        thread_ts=thread_ts,
        params=params,
    )
    if thread_ts and flag(params.get("reply_broadcast")):
        message["subtype"] = "thread_broadcast"
    api.ws.store_message(channel_id, message)
    return {"channel": channel_id, "ts": message["ts"], "message": copy.deepcopy(message)}


def _own_message(api: WebApi, params: dict, ts_key: str, denied: str) -> tuple[str, dict]:
    channel_id = api.channel_for_bot(params)
    ts = require(params, ts_key, "message_not_found")
    message = api.ws.find_message(channel_id, ts)
    if message is None or message.get("subtype") == "tombstone":
        raise ApiError("message_not_found")
    if message.get("bot_id") != api.ws.bot_id:
        raise ApiError(denied)  # a bot token may only edit or delete the bot's own messages
    return channel_id, message


def chat_update(api: WebApi, params: dict) -> dict:
    channel_id, message = _own_message(api, params, "ts", "cant_update_message")
    api.check_content(params, for_update=message)
    if "text" in params:
        message["text"] = str(params["text"] or "")
    if "blocks" in params:
        message["blocks"] = api.with_block_ids(params["blocks"])
    for key in ("attachments", "metadata"):
        if key in params:
            message[key] = params[key]
    message["edited"] = {"user": api.ws.bot_user_id, "ts": api.ws.next_ts()}
    return {
        "channel": channel_id,
        "ts": message["ts"],
        "text": message["text"],
        "message": copy.deepcopy(message),
    }


def chat_delete(api: WebApi, params: dict) -> dict:
    channel_id, message = _own_message(api, params, "ts", "cant_delete_message")
    api.ws.delete_message(channel_id, message["ts"])
    return {"channel": channel_id, "ts": message["ts"]}


def chat_post_ephemeral(api: WebApi, params: dict) -> dict:
    channel_id = api.channel_for_bot(params, post=True)
    user = require(params, "user", "user_not_found")
    if user not in api.ws.users:
        raise ApiError("user_not_found")
    if not api.ws.is_member(channel_id, user):
        raise ApiError("user_not_in_channel")
    api.check_content(params)
    thread_ts = api.thread_parent(channel_id, params.get("thread_ts"))
    ephemeral = api.bot_message(
        text=str(params.get("text") or ""),
        blocks=params.get("blocks"),
        thread_ts=thread_ts,
        params=params,
    )
    ephemeral.update(user=user, channel=channel_id, is_ephemeral=True)
    api.ws.ephemerals.append(ephemeral)
    return {"message_ts": ephemeral["ts"]}


def chat_get_permalink(api: WebApi, params: dict) -> dict:
    channel_id = require(params, "channel", "channel_not_found")
    if channel_id not in api.ws.channels:
        raise ApiError("channel_not_found")
    ts = require(params, "message_ts", "message_not_found")
    message = api.ws.find_message(channel_id, ts)
    if message is None:
        raise ApiError("message_not_found")
    link = f"https://{api.ws.team_domain}.slack.com/archives/{channel_id}/p{ts.replace('.', '')}"
    if message.get("thread_ts") and message["thread_ts"] != ts:
        link += f"?thread_ts={message['thread_ts']}&cid={channel_id}"
    return {"channel": channel_id, "permalink": link}


# -- conversations ---------------------------------------------------------------------------


def _readable_channel(api: WebApi, params: dict) -> str:
    channel_id = require(params, "channel", "channel_not_found")
    channel = api.ws.channels.get(channel_id)
    if channel is None:
        raise ApiError("channel_not_found")
    if channel.get("is_private") and not api.ws.is_member(channel_id, api.ws.bot_user_id):
        raise ApiError("channel_not_found")  # private channels are invisible to non-members
    if not api.ws.is_member(channel_id, api.ws.bot_user_id):
        raise ApiError("not_in_channel")
    return channel_id


def conversations_history(api: WebApi, params: dict) -> dict:
    channel_id = _readable_channel(api, params)
    latest = float(params.get("latest") or "inf")
    oldest = float(params.get("oldest") or 0)
    inclusive = flag(params.get("inclusive"))

    def within(m: dict) -> bool:
        ts = float(m["ts"])
        return (oldest <= ts <= latest) if inclusive else (oldest < ts < latest)

    items = [m for m in reversed(api.ws.top_level(channel_id)) if within(m)]  # newest first
    chunk, meta = page(items, params)
    return {
        "messages": copy.deepcopy(chunk),
        "has_more": bool(meta["next_cursor"]),
        "pin_count": 0,
        "response_metadata": meta,
    }


def conversations_replies(api: WebApi, params: dict) -> dict:
    channel_id = _readable_channel(api, params)
    ts = require(params, "ts", "thread_not_found")
    message = api.ws.find_message(channel_id, ts)
    if message is None:
        raise ApiError("thread_not_found")
    is_reply = message.get("thread_ts") and message["thread_ts"] != ts
    items = [message] if is_reply else api.ws.thread(channel_id, ts)
    chunk, meta = page(items, params, default_limit=1000)
    return {
        "messages": copy.deepcopy(chunk),
        "has_more": bool(meta["next_cursor"]),
        "response_metadata": meta,
    }


def conversations_info(api: WebApi, params: dict) -> dict:
    channel_id = require(params, "channel", "channel_not_found")
    channel = api.ws.channels.get(channel_id)
    if channel is None or (
        channel.get("is_private") and not api.ws.is_member(channel_id, api.ws.bot_user_id)
    ):
        raise ApiError("channel_not_found")
    return {"channel": api.ws.public_channel(channel_id)}


def conversations_members(api: WebApi, params: dict) -> dict:
    channel_id = require(params, "channel", "channel_not_found")
    channel = api.ws.channels.get(channel_id)
    if channel is None:
        raise ApiError("channel_not_found")
    chunk, meta = page(list(channel["_members"]), params)
    return {"members": chunk, "response_metadata": meta}


def conversations_list(api: WebApi, params: dict) -> dict:
    wanted = set(str(params.get("types") or "public_channel").split(","))
    items = []
    for channel_id in api.ws.channels:
        kind = api.ws.channel_type(channel_id)
        name = {"channel": "public_channel", "group": "private_channel"}.get(kind, kind)
        if name in wanted:
            items.append(api.ws.public_channel(channel_id))
    chunk, meta = page(items, params)
    return {"channels": chunk, "response_metadata": meta}


def conversations_open(api: WebApi, params: dict) -> dict:
    users = [u for u in str(params.get("users") or "").split(",") if u]
    if len(users) != 1:
        raise ApiError("users_list_not_supplied" if not users else "not_implemented")
    if users[0] not in api.ws.users:
        raise ApiError("user_not_found")
    channel_id = api.ws.im_with(users[0]) or api.open_im(users[0])
    return {"channel": {"id": channel_id}}


# -- users and groups ------------------------------------------------------------------------


def users_info(api: WebApi, params: dict) -> dict:
    user = api.ws.users.get(require(params, "user", "user_not_found"))
    if user is None:
        raise ApiError("user_not_found")
    return {"user": copy.deepcopy(user)}


def users_list(api: WebApi, params: dict) -> dict:
    chunk, meta = page(list(api.ws.users.values()), params)
    return {"members": copy.deepcopy(chunk), "response_metadata": meta}


def usergroups_users_list(api: WebApi, params: dict) -> dict:
    group = api.ws.usergroups.get(require(params, "usergroup", "no_such_subteam"))
    if group is None:
        raise ApiError("no_such_subteam")
    return {"users": list(group["users"])}


def usergroups_list(api: WebApi, params: dict) -> dict:
    groups = copy.deepcopy(list(api.ws.usergroups.values()))
    if not flag(params.get("include_users")):
        for group in groups:
            group.pop("users", None)
    return {"usergroups": groups}


# -- views -----------------------------------------------------------------------------------


def views_open(api: WebApi, params: dict) -> dict:
    trigger = api.take_trigger(params)
    view = api.checked_view(params)
    if view["type"] != "modal":
        raise ApiError("invalid_arguments", ["[ERROR] views.open takes a modal"])
    view_id = api.ws.new_id("V")
    record = api.view_record(view, view_id=view_id, root=view_id, previous=None)
    api.ws.views[view_id] = record
    api.ws.view_owner[view_id] = trigger["user"]
    api.ws.modal_stacks[trigger["user"]] = [view_id]
    return {"view": copy.deepcopy(record)}


def views_push(api: WebApi, params: dict) -> dict:
    trigger = api.take_trigger(params)
    view = api.checked_view(params)
    stack = api.ws.modal_stacks.get(trigger["user"]) or []
    if not stack:
        raise ApiError("not_found", ["[ERROR] no open modal to push onto"])
    if len(stack) >= 3:
        raise ApiError("push_limit_reached")
    view_id = api.ws.new_id("V")
    record = api.view_record(view, view_id=view_id, root=stack[0], previous=stack[-1])
    api.ws.views[view_id] = record
    api.ws.view_owner[view_id] = trigger["user"]
    stack.append(view_id)
    return {"view": copy.deepcopy(record)}


def views_update(api: WebApi, params: dict) -> dict:
    current = api.find_view(params)
    if params.get("hash") and params["hash"] != current["hash"]:
        raise ApiError("hash_conflict")
    view = api.checked_view(params)
    record = api.view_record(
        view,
        view_id=current["id"],
        root=current["root_view_id"],
        previous=current["previous_view_id"],
    )
    current.clear()
    current.update(record)
    return {"view": copy.deepcopy(current)}


def views_publish(api: WebApi, params: dict) -> dict:
    user_id = require(params, "user_id", "user_not_found")
    if user_id not in api.ws.users:
        raise ApiError("user_not_found")
    view = api.checked_view(params)
    if view["type"] != "home":
        raise ApiError("invalid_arguments", ["[ERROR] views.publish takes a home view"])
    current = api.ws.home_views.get(user_id)
    if current and params.get("hash") and params["hash"] != current["hash"]:
        raise ApiError("hash_conflict")
    view_id = current["id"] if current else api.ws.new_id("V")
    record = api.view_record(view, view_id=view_id, root=view_id, previous=None)
    api.ws.home_views[user_id] = record
    api.ws.views[view_id] = record
    api.ws.view_owner[view_id] = user_id
    return {"view": copy.deepcopy(record)}


# -- reactions -------------------------------------------------------------------------------


def _reaction_target(api: WebApi, params: dict) -> tuple[dict, str]:
    name = str(params.get("name") or "").strip(":")
    if not name:
        raise ApiError("invalid_name")
    channel_id = api.channel_for_bot(params)
    ts = require(params, "timestamp", "no_item_specified")
    message = api.ws.find_message(channel_id, ts)
    if message is None:
        raise ApiError("message_not_found")
    return message, name


def reactions_add(api: WebApi, params: dict) -> dict:
    message, name = _reaction_target(api, params)
    reactions = message.setdefault("reactions", [])
    for reaction in reactions:
        if reaction["name"] == name:
            if api.ws.bot_user_id in reaction["users"]:
                raise ApiError("already_reacted")
            reaction["users"].append(api.ws.bot_user_id)
            reaction["count"] += 1
            return {}
    reactions.append({"name": name, "users": [api.ws.bot_user_id], "count": 1})
    return {}


def reactions_remove(api: WebApi, params: dict) -> dict:
    message, name = _reaction_target(api, params)
    for reaction in message.get("reactions", []):
        if reaction["name"] == name and api.ws.bot_user_id in reaction["users"]:
            reaction["users"].remove(api.ws.bot_user_id)
            reaction["count"] -= 1
            message["reactions"] = [r for r in message["reactions"] if r["count"]]
            return {}
    raise ApiError("no_reaction")


# -- files (the files_upload_v2 flow) --------------------------------------------------------


def files_get_upload_url_external(api: WebApi, params: dict) -> dict:
    filename = params.get("filename")
    length = params.get("length")
    if not filename or length in (None, ""):
        raise ApiError("invalid_arguments", ["[ERROR] filename and length are required"])
    file_id = api.ws.new_id("F")
    api.ws.pending_uploads[file_id] = {"name": str(filename), "length": int(length), "bytes": None}
    return {"upload_url": f"{api.base_url}upload/{file_id}", "file_id": file_id}


def files_complete_upload_external(api: WebApi, params: dict) -> dict:
    entries = params.get("files")
    if not isinstance(entries, list) or not entries:
        raise ApiError("invalid_arguments", ["[ERROR] files must be a non-empty JSON array"])
    channel_id = None
    if params.get("channel_id") or params.get("channels"):
        key = "channel_id" if params.get("channel_id") else "channels"
        channel_id = api.channel_for_bot({"channel": str(params[key]).split(",")[0]}, post=True)
    thread_ts = api.thread_parent(channel_id, params.get("thread_ts")) if channel_id else None
    uploaded = []
    for entry in entries:
        pending = api.ws.pending_uploads.get(entry.get("id"))
        if pending is None or pending["bytes"] is None:
            raise ApiError("file_not_found", [f"[ERROR] file {entry.get('id')} was not uploaded"])
        uploaded.append((entry, pending))
    public = []
    for entry, pending in uploaded:
        del api.ws.pending_uploads[entry["id"]]
        info = {
            "id": entry["id"],
            "name": pending["name"],
            "title": entry.get("title") or pending["name"],
            "size": len(pending["bytes"]),
            "user": api.ws.bot_user_id,
            "created": int(time.time()),
        }
        api.ws.files.append(
            {
                **info,
                "channel": channel_id,
                "thread_ts": thread_ts,
                "bytes": pending["bytes"],
                "initial_comment": params.get("initial_comment"),
            }
        )
        public.append(info)
    if channel_id:
        message = api.bot_message(
            text=str(params.get("initial_comment") or ""),
            blocks=None,
            thread_ts=thread_ts,
            params={},
        )
        message.update(files=copy.deepcopy(public), upload=True)
        api.ws.store_message(channel_id, message)
    return {"files": public}


METHODS = {
    "auth.test": auth_test,
    "bots.info": bots_info,
    "chat.postMessage": chat_post_message,
    "chat.update": chat_update,
    "chat.delete": chat_delete,
    "chat.postEphemeral": chat_post_ephemeral,
    "chat.getPermalink": chat_get_permalink,
    "conversations.history": conversations_history,
    "conversations.replies": conversations_replies,
    "conversations.info": conversations_info,
    "conversations.members": conversations_members,
    "conversations.list": conversations_list,
    "conversations.open": conversations_open,
    "users.info": users_info,
    "users.list": users_list,
    "usergroups.users.list": usergroups_users_list,
    "usergroups.list": usergroups_list,
    "views.open": views_open,
    "views.push": views_push,
    "views.update": views_update,
    "views.publish": views_publish,
    "reactions.add": reactions_add,
    "reactions.remove": reactions_remove,
    "files.getUploadURLExternal": files_get_upload_url_external,
    "files.completeUploadExternal": files_complete_upload_external,
}
