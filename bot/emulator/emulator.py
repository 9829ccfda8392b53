"""`SlackEmulator`: a local Slack workspace for tests, benchmarks and the sandbox.

Two directions, as with real Slack:
- the bot calls the Web API at `api_url` (set it as `SLACK_API_URL`); the emulator answers from,
  and changes, its in-memory workspace;
- people act through this object (`post_message`, `slash_command`, `click_button`, `submit_view`)
  and the emulator delivers to `events_url` what Slack would send, signed with the signing
  secret and retried like Slack when the bot is slow or fails.

Deliveries are synchronous by default (the call returns once the bot acknowledged, or after the
retries), which makes tests deterministic; the bot's own work after the ack is observed with
`wait_for_message` and friends, which sleep on the workspace's Condition.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from bot.emulator import interactions, payloads
from bot.emulator.delivery import Deliverer, DeliveryResult, encode_form, encode_payload
from bot.emulator.observing import WorkspaceViews
from bot.emulator.server import EmulatorServer
from bot.emulator.state import Workspace
from bot.emulator.web_api import WebApi
from bot.emulator.web_methods import METHODS

DEFAULT_SUBSCRIPTIONS = frozenset(
    {"app_mention", "message.channels", "message.groups", "message.im", "message.mpim"}
)
SUBSCRIPTION_FOR_CHANNEL_TYPE = {
    "channel": "message.channels",
    "group": "message.groups",
    "im": "message.im",
    "mpim": "message.mpim",
}


@dataclass
class Delivery:
    """One request the emulator sent to the bot, and how the bot answered."""

    kind: str  # "event", "slash_command", "block_actions", "view_submission", ...
    payload: dict
    result: DeliveryResult


class SlackEmulator(WorkspaceViews):
    """A fake Slack workspace with one bot, served over HTTP on 127.0.0.1."""

    def __init__(
        self,
        *,
        signing_secret: str,
        bot_token: str,
        team_id: str = "T0001",
        bot_user_id: str = "UBOT",
        bot_id: str = "B0001",
        app_id: str = "A0001",
        team_domain: str = "emulated",
        retry_delays: tuple[float, ...] = (1.0, 2.0, 4.0),
        ack_timeout: float = 3.0,
        trigger_ttl: float = 3.0,
        subscriptions: frozenset[str] | set[str] = DEFAULT_SUBSCRIPTIONS,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` (seconds) times trigger ids and response URLs; pass a fake to test expiry."""
        self.signing_secret = signing_secret
        self.bot_token = bot_token
        self.subscriptions = set(subscriptions)
        self.events_url: str | None = None
        self.deliveries: list[Delivery] = []
        self.ws = Workspace(
            team_id=team_id,
            team_domain=team_domain,
            bot_user_id=bot_user_id,
            bot_id=bot_id,
            app_id=app_id,
            clock=clock,
        )
        self.api = WebApi(
            workspace=self.ws,
            bot_token=bot_token,
            base_url=lambda: self.base_url,
            methods=METHODS,
            trigger_ttl=trigger_ttl,
        )
        self.deliverer = Deliverer(
            signing_secret=signing_secret,
            events_url=lambda: self.events_url,
            ack_timeout=ack_timeout,
            retry_delays=retry_delays,
        )
        self._server = EmulatorServer(api=self.api, host=host, port=port)
        self._background: list[threading.Thread] = []
        self.add_user(bot_user_id, name="apprentice", real_name="Apprentice", is_bot=True)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> SlackEmulator:
        self._server.start()
        return self

    def stop(self) -> None:
        for thread in list(self._background):
            thread.join(timeout=self.deliverer.ack_timeout + 1)
        self._server.stop()

    def __enter__(self) -> SlackEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return self._server.url

    @property
    def api_url(self) -> str:
        return self._server.url + "api/"

    # -- setting up the workspace -------------------------------------------------------------

    def add_user(
        self,
        user_id: str,
        *,
        name: str,
        real_name: str | None = None,
        is_admin: bool = False,
        is_bot: bool = False,
        email: str | None = None,
        tz: str = "Europe/Paris",
    ) -> dict:
        real_name = real_name or name
        user = {
            "id": user_id,
            "team_id": self.ws.team_id,
            "name": name,
            "real_name": real_name,
            "deleted": False,
            "is_admin": is_admin,
            "is_owner": False,
            "is_bot": is_bot,
            "is_app_user": False,
            "tz": tz,
            "profile": {
                "real_name": real_name,
                "display_name": name,
                "email": email or f"{name}@example.com",
                "team": self.ws.team_id,
            },
        }
        if is_bot:
            user["profile"]["bot_id"] = self.ws.bot_id
        with self.ws.lock:
            self.ws.users[user_id] = user
        return copy.deepcopy(user)

    def add_channel(
        self, channel_id: str, *, name: str, is_private: bool = False, members=()
    ) -> dict:
        unknown = [m for m in members if m not in self.ws.users]
        if unknown:
            raise ValueError(f"add_user() these first: {unknown}")
        channel = {
            "id": channel_id,
            "name": name,
            "name_normalized": name,
            "created": int(time.time()),
            "creator": members[0] if members else self.ws.bot_user_id,
            "is_channel": not is_private,
            "is_group": is_private,
            "is_im": False,
            "is_mpim": False,
            "is_private": is_private,
            "is_archived": False,
            "is_general": name == "general",
            "is_shared": False,
            "is_org_shared": False,
            "topic": {"value": "", "creator": "", "last_set": 0},
            "purpose": {"value": "", "creator": "", "last_set": 0},
            "_members": list(dict.fromkeys(members)),
        }
        with self.ws.lock:
            self.ws.channels[channel_id] = channel
            return self.ws.public_channel(channel_id)

    def add_member(self, channel_id: str, user_id: str) -> None:
        with self.ws.lock:
            members = self.ws.channels[channel_id]["_members"]
            if user_id not in members:
                members.append(user_id)

    def add_usergroup(self, group_id: str, *, handle: str, users=(), name: str = "") -> dict:
        group = {
            "id": group_id,
            "team_id": self.ws.team_id,
            "handle": handle,
            "name": name or handle,
            "is_usergroup": True,
            "users": list(users),
            "user_count": len(users),
        }
        with self.ws.lock:
            self.ws.usergroups[group_id] = group
        return copy.deepcopy(group)

    def open_dm(self, user_id: str) -> str:
        """The bot's DM ("D…") with a user, created on first use."""
        if user_id not in self.ws.users:
            raise ValueError(f"unknown user {user_id}: add_user() it first")
        with self.ws.lock:
            return self.ws.im_with(user_id) or self.api.open_im(user_id)

    def new_trigger_id(self, user: str) -> str:
        """A fresh trigger id, as if the user had just clicked something."""
        return self.ws.issue_trigger(user=user)

    def inject_error(
        self,
        method: str,
        error: str,
        *,
        status: int = 200,
        retry_after: float | None = None,
        times: int = 1,
    ) -> None:
        """Make the next `times` calls to `method` fail (e.g. "ratelimited", status 429)."""
        with self.ws.lock:
            self.api.injected.setdefault(method, []).extend([(error, status, retry_after)] * times)

    # -- people acting -------------------------------------------------------------------------

    def post_message(
        self,
        *,
        user: str,
        channel: str,
        text: str,
        thread_ts: str | None = None,
        background: bool = False,
        deliver: bool = True,
    ) -> str:
        """A person posts a message; the bot gets the events Slack would send. Returns its ts.

        `background=True` delivers from a thread (for callers that must not wait on the bot);
        `deliver=False` only stores the message (seeding history)."""
        with self.ws.lock:
            self._check_member(channel, user)
            if thread_ts and self.ws.find_message(channel, thread_ts) is None:
                raise ValueError(f"no message {thread_ts} in {channel} to reply to")
            message = payloads.user_message(
                user=user,
                team_id=self.ws.team_id,
                text=text,
                ts=self.ws.next_ts(),
                thread_ts=thread_ts,
            )
            self.ws.store_message(channel, message)
            events = self._events_for(channel, copy.deepcopy(message)) if deliver else []
        if background:
            thread = threading.Thread(
                target=lambda: [self.deliver_event(e) for e in events], daemon=True
            )
            self._background.append(thread)
            thread.start()
        else:
            for event in events:
                self.deliver_event(event)
        return message["ts"]

    def _check_member(self, channel: str, user: str) -> None:
        if user not in self.ws.users:
            raise ValueError(f"unknown user {user}: add_user() it first")
        if channel not in self.ws.channels:
            raise ValueError(f"unknown channel {channel}: add_channel() or open_dm() it first")
        if not self.ws.is_member(channel, user):
            raise ValueError(f"{user} is not a member of {channel}")

    def _events_for(self, channel: str, message: dict) -> list[dict]:
        if not self.ws.is_member(channel, self.ws.bot_user_id):
            return []  # Slack sends nothing from channels the app is not in
        channel_type = self.ws.channel_type(channel)
        events = []
        if (
            channel_type != "im"
            and "app_mention" in self.subscriptions
            and self.ws.bot_user_id in payloads.mentions(message["text"])
        ):
            events.append(payloads.app_mention_event(message=message, channel=channel))
        if SUBSCRIPTION_FOR_CHANNEL_TYPE[channel_type] in self.subscriptions:
            parent = self.ws.find_message(channel, message.get("thread_ts") or "")
            events.append(
                payloads.message_event(
                    message=message,
                    channel=channel,
                    channel_type=channel_type,
                    parent_user_id=parent.get("user") if parent else None,
                )
            )
        return events

    def slash_command(
        self, *, user: str, channel: str, command: str, text: str = ""
    ) -> DeliveryResult:
        """A person runs a slash command; its HTTP answer is shown as Slack would show it."""
        with self.ws.lock:
            if user not in self.ws.users or channel not in self.ws.channels:
                raise ValueError(f"unknown user {user} or channel {channel}")
            channel_info = self.ws.channels[channel]
            user_info = self.ws.users[user]
        form = payloads.slash_command_form(
            team_id=self.ws.team_id,
            team_domain=self.ws.team_domain,
            api_app_id=self.ws.app_id,
            channel=channel_info,
            user=user_info,
            command=command,
            text=text,
            response_url=interactions.new_response_url(self.api, channel=channel, user=user),
            trigger_id=self.ws.issue_trigger(user=user),
        )
        result = self.deliverer.send(
            body=encode_form(form), content_type="application/x-www-form-urlencoded", retry=False
        )
        self._record("slash_command", form, result)
        if not result.ok:
            # what Slack shows the user when the app does not acknowledge in time
            reason = "operation_timeout" if result.status is None else "dispatch_failed"
            with self.ws.lock:
                self.ws.ephemerals.append(
                    {
                        "type": "message",
                        "user": user,
                        "channel": channel,
                        "ts": self.ws.next_ts(),
                        "text": f'{command} failed with the error "{reason}"',
                        "is_ephemeral": True,
                        "from_slack": True,
                    }
                )
                self.ws.notify()
        else:
            interactions.apply_command_answer(
                self.api,
                channel=channel,
                user=user,
                body=result.body,
                content_type=result.headers.get("Content-Type", ""),
            )
        return result

    def click_button(
        self,
        *,
        user: str,
        channel: str,
        message_ts: str,
        label: str | None = None,
        action_id: str | None = None,
    ) -> DeliveryResult:
        """A person clicks a button (found by its text, or its action_id) in a message."""
        with self.ws.lock:
            message = self.ws.find_message(channel, message_ts)
            is_ephemeral = False
            if message is None:
                message = next(
                    (e for e in self.ws.ephemerals if e["ts"] == message_ts and e["user"] == user),
                    None,
                )
                is_ephemeral = message is not None
            if message is None:
                raise LookupError(f"no message {message_ts} in {channel} (nor an ephemeral)")
            button, block_id = payloads.find_button(message.get("blocks") or [], label, action_id)
            message = copy.deepcopy(message)
            channel_info = self.ws.channels[channel]
            user_info = self.ws.users[user]
        container = {
            "type": "message",
            "message_ts": message_ts,
            "channel_id": channel,
            "is_ephemeral": is_ephemeral,
        }
        if message.get("thread_ts"):
            container["thread_ts"] = message["thread_ts"]
        payload = payloads.block_actions_payload(
            team_id=self.ws.team_id,
            team_domain=self.ws.team_domain,
            api_app_id=self.ws.app_id,
            user=user_info,
            action=payloads.button_action(button=button, block_id=block_id),
            trigger_id=self.ws.issue_trigger(user=user),
            container=container,
            channel=channel_info,
            message=None if is_ephemeral else message,
            response_url=interactions.new_response_url(
                self.api,
                channel=channel,
                user=user,
                message_ts=message_ts,
                is_ephemeral=is_ephemeral,
                thread_ts=message.get("thread_ts"),
            ),
        )
        return self._interact("block_actions", payload)

    def click_view_button(
        self,
        *,
        user: str,
        view_id: str,
        label: str | None = None,
        action_id: str | None = None,
    ) -> DeliveryResult:
        """A person clicks a button inside a modal or their App Home."""
        with self.ws.lock:
            view = copy.deepcopy(self.ws.views[view_id])
            user_info = self.ws.users[user]
        button, block_id = payloads.find_button(view["blocks"], label, action_id)
        payload = payloads.block_actions_payload(
            team_id=self.ws.team_id,
            team_domain=self.ws.team_domain,
            api_app_id=self.ws.app_id,
            user=user_info,
            action=payloads.button_action(button=button, block_id=block_id),
            trigger_id=self.ws.issue_trigger(user=user, view_id=view_id),
            container={"type": "view", "view_id": view_id},
            view=view,
        )
        return self._interact("block_actions", payload)

    def submit_view(self, *, user: str, view_id: str, values: dict | None = None) -> DeliveryResult:
        """A person submits an open modal; `values` is {block_id: {action_id: value}}."""
        with self.ws.lock:
            if view_id not in self.ws.modal_stacks.get(user, []):
                open_ids = self.ws.modal_stacks.get(user, [])
                raise LookupError(f"view {view_id} is not open for {user} (open: {open_ids})")
            view = copy.deepcopy(self.ws.views[view_id])
            user_info = self.ws.users[user]
        view["state"] = {"values": payloads.view_state_values(view, values or {})}
        with self.ws.lock:
            self.ws.views[view_id]["state"] = copy.deepcopy(view["state"])
        payload = payloads.view_submission_payload(
            team_id=self.ws.team_id,
            team_domain=self.ws.team_domain,
            api_app_id=self.ws.app_id,
            user=user_info,
            view=view,
            trigger_id=self.ws.issue_trigger(user=user, view_id=view_id),
        )
        result = self._interact("view_submission", payload)
        if result.ok:
            interactions.apply_view_answer(
                self.api, user=user, view_id=view_id, answer=result.json()
            )
        return result

    def close_view(self, *, user: str, view_id: str) -> DeliveryResult | None:
        """A person closes a modal (×/Cancel); the bot hears of it if `notify_on_close`."""
        with self.ws.lock:
            view = copy.deepcopy(self.ws.views[view_id])
            user_info = self.ws.users[user]
        interactions.close_modal(self.api, user=user, view_id=view_id)
        if not view.get("notify_on_close"):
            return None
        payload = payloads.view_closed_payload(
            team_id=self.ws.team_id,
            team_domain=self.ws.team_domain,
            api_app_id=self.ws.app_id,
            user=user_info,
            view=view,
        )
        return self._interact("view_closed", payload)

    # -- raw delivery --------------------------------------------------------------------------

    def deliver_event(
        self,
        event: dict,
        *,
        event_id: str | None = None,
        retry_num: int | None = None,
        retry_reason: str | None = None,
        retry: bool = True,
        forge_signature: bool = False,
        timestamp_offset: int = 0,
    ) -> DeliveryResult:
        """Send an event (wrapped in an event_callback envelope unless it already is one)."""
        if event.get("type") == "event_callback":
            envelope = dict(event, event_id=event_id or event.get("event_id"))
        else:
            envelope = payloads.event_envelope(
                event=event,
                team_id=self.ws.team_id,
                api_app_id=self.ws.app_id,
                bot_user_id=self.ws.bot_user_id,
                event_id=event_id,
            )
        result = self.deliverer.send(
            body=json.dumps(envelope).encode("utf-8"),
            content_type="application/json",
            retry=retry,
            first_retry_num=retry_num,
            first_retry_reason=retry_reason or ("http_timeout" if retry_num else None),
            forge_signature=forge_signature,
            timestamp_offset=timestamp_offset,
        )
        self._record("event", envelope, result)
        return result

    def deliver_raw(
        self,
        body: bytes | str | dict,
        headers: dict[str, str] | None = None,
        *,
        content_type: str = "application/json",
        forge_signature: bool = False,
        timestamp_offset: int = 0,
    ) -> DeliveryResult:
        """One signed request with any body; `headers` override (or blank) the signed ones."""
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode("utf-8")
        result = self.deliverer.send(
            body=body,
            content_type=content_type,
            retry=False,
            forge_signature=forge_signature,
            timestamp_offset=timestamp_offset,
            extra_headers=headers,
        )
        self._record("raw", {"body": body.decode("utf-8", "replace")}, result)
        return result

    def verify_url(self) -> bool:
        """Slack's url_verification handshake: the bot must echo the challenge."""
        challenge = "challenge-" + payloads.new_event_id()
        result = self.deliver_raw(
            {
                "token": "emulator-verification-token",
                "challenge": challenge,
                "type": "url_verification",
            }
        )
        answer = result.json()
        return result.ok and (
            (isinstance(answer, dict) and answer.get("challenge") == challenge)
            or result.text == challenge
        )

    def _interact(self, kind: str, payload: dict) -> DeliveryResult:
        result = self.deliverer.send(
            body=encode_payload(payload),
            content_type="application/x-www-form-urlencoded",
            retry=False,
        )
        self._record(kind, payload, result)
        return result

    def _record(self, kind: str, payload: dict, result: DeliveryResult) -> None:
        with self.ws.lock:
            self.deliveries.append(Delivery(kind, payload, result))
            self.ws.notify()
