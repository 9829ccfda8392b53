"""The Slack emulator, driven the way the bot drives Slack: a real `slack_sdk.WebClient` for the
Web API, and a small local HTTP receiver (checking signatures with slack_sdk's verifier) for
what the emulator delivers. The last test runs a real Bolt app behind a WSGI server."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.signature import SignatureVerifier

from bot.emulator import SlackEmulator

SECRET = "emulator-test-secret"
TOKEN = "xoxb-emulator-test"


class Receiver:
    """A stand-in for the bot's /slack/events: records every request and answers as told.

    `answer(request, index)` returns (status, body, delay_s); the default is an empty 200.
    """

    def __init__(self, answer=None) -> None:
        self.requests: list[dict] = []
        self.answer = answer or (lambda request, index: (200, b"", 0.0))
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                request = {
                    "path": self.path,
                    "headers": headers,
                    "body": body,
                    "valid": SignatureVerifier(SECRET).is_valid(
                        body=body,
                        timestamp=headers.get("x-slack-request-timestamp"),
                        signature=headers.get("x-slack-signature"),
                    ),
                }
                index = len(receiver.requests)
                receiver.requests.append(request)
                status, answer, delay = receiver.answer(request, index)
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except OSError:
                    pass  # the emulator gave up waiting: that is the point of a slow answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/slack/events"

    def json(self, index: int) -> dict:
        return json.loads(self.requests[index]["body"])

    def form(self, index: int) -> dict:
        return dict(urllib.parse.parse_qsl(self.requests[index]["body"].decode()))

    def payload(self, index: int) -> dict:
        return json.loads(self.form(index)["payload"])

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make_emu():
    """Started emulators with a small workspace. The ack timeout is generous (a loaded CI
    machine must not cause spurious retries); tests of slowness pass a short one."""
    started = []

    def make(**overrides) -> SlackEmulator:
        options = dict(
            signing_secret=SECRET, bot_token=TOKEN, retry_delays=(0.05, 0.05, 0.05), ack_timeout=5.0
        )
        emulator = SlackEmulator(**{**options, **overrides}).start()
        started.append(emulator)
        emulator.add_user("UALICE", name="alice", real_name="Alice")
        emulator.add_user("UEXPERT", name="erin", real_name="Erin Expert", is_admin=True)
        emulator.add_user("UBOB", name="bob")
        emulator.add_channel("CGENERAL", name="general", members=["UALICE", "UEXPERT", "UBOT"])
        emulator.add_channel("CRANDOM", name="random", members=["UALICE"])
        return emulator

    yield make
    for emulator in started:
        emulator.stop()


@pytest.fixture
def emu(make_emu) -> SlackEmulator:
    return make_emu()


@pytest.fixture
def client(emu) -> WebClient:
    return WebClient(token=TOKEN, base_url=emu.api_url)


@pytest.fixture
def receiver(emu):
    rec = Receiver()
    emu.events_url = rec.url
    yield rec
    rec.close()


def api_error(call) -> SlackApiError:
    with pytest.raises(SlackApiError) as info:
        call()
    return info.value


# -- Web API -----------------------------------------------------------------------------------


def test_auth_test_and_token_checks(emu, client):
    me = client.auth_test()
    assert (me["user_id"], me["bot_id"], me["team_id"]) == ("UBOT", "B0001", "T0001")
    assert me["url"].startswith("https://")

    wrong = WebClient(token="xoxb-wrong", base_url=emu.api_url)
    assert api_error(wrong.auth_test).response["error"] == "invalid_auth"
    no_token = WebClient(base_url=emu.api_url)
    assert api_error(no_token.auth_test).response["error"] == "not_authed"
    assert api_error(lambda: client.api_call("chat.nope")).response["error"] == "unknown_method"
    assert [name for name, _ in emu.calls][:2] == ["auth.test", "auth.test"]


def test_post_update_delete_and_threads(emu, client):
    first = client.chat_postMessage(channel="CGENERAL", text="thinking…")
    assert re.fullmatch(r"\d{10}\.\d{6}", first["ts"])
    assert first["message"]["bot_id"] == "B0001"
    reply = client.chat_postMessage(channel="CGENERAL", text="in thread", thread_ts=first["ts"])
    assert float(reply["ts"]) > float(first["ts"])

    client.chat_update(channel="CGENERAL", ts=first["ts"], text="the answer")
    thread = client.conversations_replies(channel="CGENERAL", ts=first["ts"])["messages"]
    assert [m["text"] for m in thread] == ["the answer", "in thread"]
    assert thread[0]["reply_count"] == 1 and "edited" in thread[0]
    assert [m["text"] for m in emu.messages("CGENERAL")] == ["the answer"]
    assert [m["text"] for m in emu.messages("CGENERAL", thread_ts=first["ts"])] == [
        "the answer",
        "in thread",
    ]
    history = client.conversations_history(channel="CGENERAL")["messages"]
    assert [m["ts"] for m in history] == [first["ts"]]  # replies stay in their thread

    client.chat_delete(channel="CGENERAL", ts=reply["ts"])
    assert [m["text"] for m in emu.messages("CGENERAL", thread_ts=first["ts"])] == ["the answer"]
    missing = api_error(lambda: client.chat_update(channel="CGENERAL", ts="1.000000", text="x"))
    assert missing.response["error"] == "message_not_found"


def test_concurrent_posts_get_unique_ordered_timestamps(emu, client):
    def post(n: int) -> None:
        for i in range(10):
            client.chat_postMessage(channel="CGENERAL", text=f"{n}-{i}")

    threads = [threading.Thread(target=post, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stamps = [m["ts"] for m in emu.messages("CGENERAL")]
    assert len(stamps) == len(set(stamps)) == 60
    assert stamps == sorted(stamps, key=float)


def test_bot_cannot_edit_a_persons_message(emu, client):
    ts = emu.post_message(user="UALICE", channel="CRANDOM", text="no bot here")
    emu.add_member("CRANDOM", "UBOT")
    denied = api_error(lambda: client.chat_update(channel="CRANDOM", ts=ts, text="edited"))
    assert denied.response["error"] == "cant_update_message"


def test_form_encoded_bodies_are_accepted(emu, client):
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "*form*"}}]
    response = client.api_call(
        "chat.postMessage",
        data={"channel": "CGENERAL", "text": "form", "blocks": json.dumps(blocks)},
    )
    assert response["ok"]
    stored = emu.messages("CGENERAL")[-1]
    assert stored["blocks"][0]["text"]["text"] == "*form*"
    assert stored["blocks"][0]["block_id"]  # Slack fills in missing block ids
    assert emu.calls_to("chat.postMessage")[-1]["blocks"][0]["type"] == "section"


def test_argument_errors_match_slack(emu, client):
    def error(**kwargs):
        return api_error(lambda: client.chat_postMessage(**kwargs)).response["error"]

    assert error(channel="CNOPE", text="x") == "channel_not_found"
    assert error(channel="CRANDOM", text="x") == "not_in_channel"
    assert error(channel="CGENERAL", text="") == "no_text"
    assert error(channel="CGENERAL", text="x", thread_ts="1600000000.000100") == "thread_not_found"
    assert api_error(lambda: client.users_info(user="UNOPE")).response["error"] == "user_not_found"


def test_block_kit_limits(client):
    def post(**kwargs):
        return client.chat_postMessage(channel="CGENERAL", **kwargs)

    def section(text):
        return {"type": "section", "text": {"type": "mrkdwn", "text": text}}

    assert post(text="ok", blocks=[section("a" * 3000)] * 1 + [{"type": "divider"}] * 49)["ok"]
    too_many = api_error(lambda: post(text="x", blocks=[{"type": "divider"}] * 51))
    assert too_many.response["error"] == "invalid_blocks"
    too_long = api_error(lambda: post(text="x", blocks=[section("a" * 3001)]))
    assert too_long.response["error"] == "invalid_blocks"
    assert "/blocks/0/text/text" in too_long.response["response_metadata"]["messages"][0]
    assert api_error(lambda: post(text="a" * 40_001)).response["error"] == "msg_too_long"
    untyped = api_error(lambda: post(text="x", blocks=[{"text": "no type"}]))
    assert untyped.response["error"] == "invalid_blocks"
    typo = api_error(lambda: post(text="x", blocks=[{"type": "sectoin", "text": "x"}]))
    assert typo.response["error"] == "invalid_blocks"
    bad_format = api_error(
        lambda: client.api_call(
            "chat.postMessage", json={"channel": "CGENERAL", "text": "x", "blocks": {"a": 1}}
        )
    )
    assert bad_format.response["error"] == "invalid_blocks_format"
    long_button = {
        "type": "actions",
        "elements": [{"type": "button", "text": {"type": "plain_text", "text": "b" * 76}}],
    }
    assert api_error(lambda: post(text="x", blocks=[long_button])).response["error"] == (
        "invalid_blocks"
    )


def test_ephemeral_messages(emu, client):
    ts = client.chat_postEphemeral(channel="CGENERAL", user="UALICE", text="only you")["message_ts"]
    [ephemeral] = emu.ephemerals(channel="CGENERAL", user="UALICE")
    assert (ephemeral["ts"], ephemeral["text"]) == (ts, "only you")
    assert emu.ephemerals(user="UEXPERT") == []
    assert emu.messages("CGENERAL") == []
    outsider = api_error(
        lambda: client.chat_postEphemeral(channel="CGENERAL", user="UBOB", text="x")
    )
    assert outsider.response["error"] == "user_not_in_channel"


def modal(title="Correct", with_input=True):
    view = {
        "type": "modal",
        "callback_id": "correct",
        "title": {"type": "plain_text", "text": title},
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "Fix the answer"}}],
    }
    if with_input:
        view["submit"] = {"type": "plain_text", "text": "Save"}
        view["blocks"].append(
            {
                "type": "input",
                "block_id": "answer",
                "label": {"type": "plain_text", "text": "Answer"},
                "element": {
                    "type": "plain_text_input",
                    "action_id": "text",
                    "multiline": True,
                    "initial_value": "the old answer",
                },
            }
        )
    return view


def test_views_open_with_fresh_used_unknown_and_expired_triggers(make_emu):
    clock = FakeClock()
    emu = make_emu(clock=clock)
    client = WebClient(token=TOKEN, base_url=emu.api_url)
    trigger = emu.new_trigger_id("UEXPERT")
    view = client.views_open(trigger_id=trigger, view=modal())["view"]
    assert view["id"].startswith("V") and view["callback_id"] == "correct"
    assert list(emu.views) == [view["id"]]
    assert emu.views[view["id"]]["root_view_id"] == view["id"]

    again = api_error(lambda: client.views_open(trigger_id=trigger, view=modal()))
    assert again.response["error"] == "exchanged_trigger_id"
    unknown = api_error(lambda: client.views_open(trigger_id="1.2.nope", view=modal()))
    assert unknown.response["error"] == "invalid_trigger_id"
    stale = emu.new_trigger_id("UEXPERT")
    clock.now += 3.01  # Slack's trigger ids live 3 s
    expired = api_error(lambda: client.views_open(trigger_id=stale, view=modal()))
    assert expired.response["error"] == "expired_trigger_id"

    without_submit = {k: v for k, v in modal().items() if k != "submit"}
    no_submit = api_error(
        lambda: client.views_open(trigger_id=emu.new_trigger_id("UEXPERT"), view=without_submit)
    )
    assert no_submit.response["error"] == "invalid_arguments"
    assert "/view/submit" in no_submit.response["response_metadata"]["messages"][0]


def test_views_push_update_and_hash_conflict(emu, client):
    root = client.views_open(trigger_id=emu.new_trigger_id("UEXPERT"), view=modal())["view"]
    pushed = client.views_push(
        trigger_id=emu.new_trigger_id("UEXPERT"), view=modal("Step 2", with_input=False)
    )["view"]
    assert [v["id"] for v in emu.view_stack("UEXPERT")] == [root["id"], pushed["id"]]
    assert pushed["previous_view_id"] == root["id"]

    updated = client.views_update(
        view_id=root["id"], hash=root["hash"], view=modal("Corrected", with_input=False)
    )["view"]
    assert emu.views[root["id"]]["title"]["text"] == "Corrected"
    conflict = api_error(
        lambda: client.views_update(view_id=root["id"], hash=root["hash"], view=modal())
    )
    assert conflict.response["error"] == "hash_conflict"
    assert updated["hash"] != root["hash"]


def test_views_publish_app_home(emu, client):
    home = {
        "type": "home",
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "Adapter v0003"}}],
    }
    first = client.views_publish(user_id="UEXPERT", view=home)["view"]
    second = client.views_publish(user_id="UEXPERT", view=home)["view"]
    assert first["id"] == second["id"]
    assert emu.home_views["UEXPERT"]["blocks"][0]["text"]["text"] == "Adapter v0003"
    assert emu.views == {}  # a home tab is not a modal
    modal_as_home = api_error(lambda: client.views_publish(user_id="UEXPERT", view=modal()))
    assert modal_as_home.response["error"] == "invalid_arguments"


def test_files_upload_v2_flow(emu, client):
    parent = client.chat_postMessage(channel="CGENERAL", text="training report")["ts"]
    done = client.files_upload_v2(
        channel="CGENERAL",
        content=b"\x89PNG loss curve",
        filename="loss.png",
        title="Loss curve",
        initial_comment="v0004 beat v0003",
        thread_ts=parent,
    )
    assert done["file"]["title"] == "Loss curve"
    [uploaded] = emu.files
    assert uploaded["bytes"] == b"\x89PNG loss curve"
    assert (uploaded["name"], uploaded["channel"]) == ("loss.png", "CGENERAL")
    assert uploaded["initial_comment"] == "v0004 beat v0003"
    [_, shared] = emu.messages("CGENERAL", thread_ts=parent)
    assert shared["files"][0]["id"] == uploaded["id"]
    assert [m for m, _ in emu.calls][-2:] == [
        "files.getUploadURLExternal",
        "files.completeUploadExternal",
    ]
    never_uploaded = client.files_getUploadURLExternal(filename="x.txt", length=3)["file_id"]
    missing = api_error(lambda: client.files_completeUploadExternal(files=[{"id": never_uploaded}]))
    assert missing.response["error"] == "file_not_found"


def test_lookups_reactions_and_permalinks(emu, client):
    emu.add_usergroup("SEXPERTS", handle="experts", users=["UEXPERT"])
    info = client.conversations_info(channel="CGENERAL")["channel"]
    assert (info["is_channel"], info["is_private"], info["is_im"]) == (True, False, False)
    dm = emu.open_dm("UALICE")
    assert dm.startswith("D") and client.conversations_info(channel=dm)["channel"]["is_im"]
    members = client.conversations_members(channel="CGENERAL")["members"]
    assert set(members) == {"UALICE", "UEXPERT", "UBOT"}
    assert client.users_info(user="UEXPERT")["user"]["is_admin"] is True
    assert {u["id"] for u in client.users_list()["members"]} >= {"UALICE", "UBOT"}
    assert client.usergroups_users_list(usergroup="SEXPERTS")["users"] == ["UEXPERT"]

    ts = client.chat_postMessage(channel="CGENERAL", text="answer")["ts"]
    client.reactions_add(channel="CGENERAL", timestamp=ts, name="white_check_mark")
    again = api_error(
        lambda: client.reactions_add(channel="CGENERAL", timestamp=ts, name="white_check_mark")
    )
    assert again.response["error"] == "already_reacted"
    assert emu.messages("CGENERAL")[0]["reactions"][0]["count"] == 1
    link = client.chat_getPermalink(channel="CGENERAL", message_ts=ts)["permalink"]
    assert link.endswith("/archives/CGENERAL/p" + ts.replace(".", ""))

    to_user = client.chat_postMessage(channel="UALICE", text="hello in DM")
    assert to_user["channel"] == dm


def test_injected_rate_limit(emu, client):
    emu.inject_error("chat.postMessage", "ratelimited", status=429, retry_after=1)
    limited = api_error(lambda: client.chat_postMessage(channel="CGENERAL", text="x"))
    assert limited.response.status_code == 429
    assert limited.response.headers["Retry-After"] == "1"
    assert client.chat_postMessage(channel="CGENERAL", text="x")["ok"]


# -- delivery to the bot -----------------------------------------------------------------------


def test_mention_delivers_signed_app_mention_and_message_events(emu, receiver):
    ts = emu.post_message(user="UALICE", channel="CGENERAL", text="<@UBOT> what is X?")
    assert len(receiver.requests) == 2
    assert all(r["valid"] for r in receiver.requests)
    assert all(r["headers"]["content-type"] == "application/json" for r in receiver.requests)
    mention, message = receiver.json(0), receiver.json(1)
    assert mention["type"] == "event_callback" and mention["team_id"] == "T0001"
    assert mention["authorizations"][0]["user_id"] == "UBOT"
    assert mention["event_id"] != message["event_id"]
    assert mention["event"]["type"] == "app_mention"
    assert (mention["event"]["ts"], mention["event"]["channel"]) == (ts, "CGENERAL")
    assert message["event"]["channel_type"] == "channel"
    assert "retry" not in " ".join(receiver.requests[0]["headers"])

    emu.post_message(user="UALICE", channel="CGENERAL", text="in thread", thread_ts=ts)
    reply = receiver.json(2)["event"]
    assert (reply["type"], reply["thread_ts"]) == ("message", ts)
    assert len(receiver.requests) == 3  # no mention, no app_mention


def test_dm_and_channels_without_the_bot(emu, receiver):
    emu.post_message(user="UALICE", channel="CRANDOM", text="<@UBOT> are you here?")
    assert receiver.requests == []
    dm = emu.open_dm("UALICE")
    emu.post_message(user="UALICE", channel=dm, text="<@UBOT> hi")
    [only] = [receiver.json(i)["event"] for i in range(len(receiver.requests))]
    assert (only["type"], only["channel_type"], only["channel"]) == ("message", "im", dm)
    with pytest.raises(ValueError, match="not a member"):
        emu.post_message(user="UBOB", channel="CGENERAL", text="hi")


def test_slow_bot_gets_retries_with_increasing_retry_num(make_emu):
    emu = make_emu(ack_timeout=1.0)
    slow_twice = Receiver(lambda request, index: (200, b"", 2.0 if index < 2 else 0.0))
    emu.events_url = slow_twice.url
    try:
        result = emu.deliver_event({"type": "app_mention", "text": "hi", "user": "UALICE"})
    finally:
        slow_twice.close()
    assert result.ok and result.attempts == 3
    headers = [r["headers"] for r in slow_twice.requests]
    assert [h.get("x-slack-retry-num") for h in headers] == [None, "1", "2"]
    assert [h.get("x-slack-retry-reason") for h in headers] == [
        None,
        "http_timeout",
        "http_timeout",
    ]
    event_ids = {slow_twice.json(i)["event_id"] for i in range(3)}
    assert len(event_ids) == 1  # the same event, delivered again


def test_failing_bot_gets_http_error_retries_then_gives_up(emu):
    failing = Receiver(lambda request, index: (500, b"oops", 0.0))
    emu.events_url = failing.url
    try:
        result = emu.deliver_event({"type": "app_mention", "text": "hi"}, event_id="EvFIXED")
    finally:
        failing.close()
    assert (result.status, result.attempts, result.ok) == (500, 4, False)
    assert [r["headers"].get("x-slack-retry-reason") for r in failing.requests] == [
        None,
        "http_error",
        "http_error",
        "http_error",
    ]
    assert failing.json(3)["event_id"] == "EvFIXED"


def test_explicit_retry_headers_forged_and_stale_signatures(emu, receiver):
    emu.deliver_event({"type": "app_mention"}, event_id="Ev1", retry_num=1, retry_reason="x")
    assert receiver.requests[0]["headers"]["x-slack-retry-num"] == "1"
    assert receiver.requests[0]["headers"]["x-slack-retry-reason"] == "x"
    assert receiver.requests[0]["valid"]
    emu.deliver_event({"type": "app_mention"}, forge_signature=True)
    assert receiver.requests[1]["valid"] is False
    emu.deliver_event({"type": "app_mention"}, timestamp_offset=-600)
    assert receiver.requests[2]["valid"] is False
    emu.deliver_raw(b'{"type": "url_verification"}', {"X-Slack-Signature": "v0=00"})
    assert receiver.requests[3]["valid"] is False


def test_slash_command_form_ack_body_and_response_url(emu, receiver):
    receiver.answer = lambda request, index: (200, b'{"text": "Thinking about it"}', 0.0)
    result = emu.slash_command(user="UALICE", channel="CGENERAL", command="/ask", text="what?")
    assert result.ok and result.attempts == 1
    form = receiver.form(0)
    assert receiver.requests[0]["valid"]
    assert receiver.requests[0]["headers"]["content-type"] == "application/x-www-form-urlencoded"
    assert (form["command"], form["text"], form["user_id"]) == ("/ask", "what?", "UALICE")
    assert form["trigger_id"] and form["team_id"] == "T0001"
    [ack] = emu.ephemerals(channel="CGENERAL", user="UALICE")
    assert ack["text"] == "Thinking about it"

    def respond(body):
        request = urllib.request.Request(
            form["response_url"], data=json.dumps(body).encode(), method="POST"
        )
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request) as response:
            return response.status

    assert respond({"text": "just for you"}) == 200
    assert respond({"text": "for everyone", "response_type": "in_channel"}) == 200
    assert [e["text"] for e in emu.ephemerals(user="UALICE")] == [
        "Thinking about it",
        "just for you",
    ]
    assert [m["text"] for m in emu.messages("CGENERAL")] == ["for everyone"]


def test_slow_slash_command_is_not_retried_and_the_user_sees_the_timeout(make_emu):
    emu = make_emu(ack_timeout=0.5)
    receiver = Receiver(lambda request, index: (200, b"", 1.5))
    emu.events_url = receiver.url
    try:
        result = emu.slash_command(user="UALICE", channel="CGENERAL", command="/ask", text="x")
    finally:
        receiver.close()
    assert (result.ok, result.attempts, len(receiver.requests)) == (False, 1, 1)
    [shown] = emu.ephemerals(user="UALICE")
    assert shown["text"] == '/ask failed with the error "operation_timeout"'


def answer_blocks():
    return [
        {"type": "section", "text": {"type": "mrkdwn", "text": "X is 42."}},
        {
            "type": "actions",
            "block_id": "verdict",
            "elements": [
                {
                    "type": "button",
                    "action_id": "approve",
                    "text": {"type": "plain_text", "text": "✅ Approve"},
                    "value": "answer-7",
                    "style": "primary",
                },
                {
                    "type": "button",
                    "action_id": "correct",
                    "text": {"type": "plain_text", "text": "✏️ Correct"},
                    "value": "answer-7",
                },
            ],
        },
    ]


def test_click_button_by_label_and_respond(emu, client, receiver):
    question = emu.post_message(user="UALICE", channel="CGENERAL", text="<@UBOT> what is X?")
    answer = client.chat_postMessage(
        channel="CGENERAL", thread_ts=question, text="X is 42.", blocks=answer_blocks()
    )
    before = len(receiver.requests)
    result = emu.click_button(
        user="UEXPERT", channel="CGENERAL", message_ts=answer["ts"], label="✅ Approve"
    )
    assert result.ok and receiver.requests[before]["valid"]
    payload = receiver.payload(before)
    assert payload["type"] == "block_actions" and payload["user"]["id"] == "UEXPERT"
    assert payload["trigger_id"] and payload["response_url"].startswith(emu.base_url)
    assert payload["container"] == {
        "type": "message",
        "message_ts": answer["ts"],
        "channel_id": "CGENERAL",
        "is_ephemeral": False,
        "thread_ts": question,
    }
    assert payload["message"]["ts"] == answer["ts"]
    [action] = payload["actions"]
    assert (action["action_id"], action["value"], action["block_id"]) == (
        "approve",
        "answer-7",
        "verdict",
    )
    # the click's trigger opens a modal while fresh
    opened = client.views_open(trigger_id=payload["trigger_id"], view=modal())
    assert opened["ok"]

    with pytest.raises(LookupError, match="✏️ Correct"):
        emu.click_button(user="UEXPERT", channel="CGENERAL", message_ts=answer["ts"], label="Nope")

    replace = {"replace_original": True, "text": "Approved by <@UEXPERT>", "blocks": []}
    request = urllib.request.Request(
        payload["response_url"], data=json.dumps(replace).encode(), method="POST"
    )
    request.add_header("Content-Type", "application/json")
    urllib.request.urlopen(request).close()
    [_, edited] = emu.messages("CGENERAL", thread_ts=question)
    assert (edited["text"], edited["blocks"]) == ("Approved by <@UEXPERT>", [])


def test_submit_view_sends_state_and_applies_response_action(emu, client, receiver):
    view_id = client.views_open(trigger_id=emu.new_trigger_id("UEXPERT"), view=modal())["view"][
        "id"
    ]
    errors = {"response_action": "errors", "errors": {"answer": "Too short"}}
    receiver.answer = lambda request, index: (200, json.dumps(errors).encode(), 0.0)
    emu.submit_view(user="UEXPERT", view_id=view_id, values={"answer": {"text": "X is 43."}})
    payload = receiver.payload(0)
    assert payload["type"] == "view_submission" and payload["view"]["id"] == view_id
    assert payload["view"]["state"]["values"] == {
        "answer": {"text": {"type": "plain_text_input", "value": "X is 43."}}
    }
    assert emu.views[view_id]["errors"] == {"answer": "Too short"}  # still open

    receiver.answer = lambda request, index: (200, b"", 0.0)
    emu.submit_view(user="UEXPERT", view_id=view_id)  # the initial value is submitted
    assert receiver.payload(1)["view"]["state"]["values"]["answer"]["text"]["value"] == (
        "the old answer"
    )
    assert emu.views == {}
    with pytest.raises(KeyError, match="answer"):
        reopened = client.views_open(trigger_id=emu.new_trigger_id("UEXPERT"), view=modal())
        emu.submit_view(user="UEXPERT", view_id=reopened["view"]["id"], values={"nope": {}})


def test_wait_for_message_sleeps_until_the_bot_answers(emu, client):
    def later():
        time.sleep(0.2)
        client.chat_postMessage(channel="CGENERAL", text="first")
        client.chat_postMessage(channel="CGENERAL", text="the answer")

    threading.Thread(target=later, daemon=True).start()
    found = emu.wait_for_message(
        channel="CGENERAL", predicate=lambda m: "answer" in m["text"], timeout=10
    )
    assert found["text"] == "the answer" and found["user"] == "UBOT"
    with pytest.raises(TimeoutError, match="first"):
        emu.wait_for_message(channel="CGENERAL", predicate=lambda m: False, timeout=0.2)


# -- a real Bolt app behind a WSGI server ------------------------------------------------------


def test_real_bolt_app_round_trip(emu):
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from slack_bolt import App
    from slack_bolt.adapter.wsgi import SlackRequestHandler

    app = App(signing_secret=SECRET, client=WebClient(token=TOKEN, base_url=emu.api_url))

    @app.event("app_mention")
    def on_mention(event, say):
        say(text=f"you said: {event['text']}", thread_ts=event["ts"], blocks=answer_blocks())

    @app.event("message")
    def on_message():
        pass

    @app.action("correct")
    def on_correct(ack, body, client):
        ack()
        client.views_open(trigger_id=body["trigger_id"], view=modal())

    @app.command("/ask")
    def on_ask(ack, respond, command):
        ack(text="On it")
        respond(text=f"answer to {command['text']}", response_type="in_channel")

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = make_server("127.0.0.1", 0, SlackRequestHandler(app), handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    emu.events_url = f"http://127.0.0.1:{server.server_port}/slack/events"
    try:
        assert emu.verify_url()
        question = emu.post_message(user="UALICE", channel="CGENERAL", text="<@UBOT> what is X?")
        answer = emu.wait_for_message(channel="CGENERAL", thread_ts=question, user="UBOT")
        assert answer["text"] == "you said: <@UBOT> what is X?"
        clicked = emu.click_button(
            user="UEXPERT", channel="CGENERAL", message_ts=answer["ts"], label="✏️ Correct"
        )
        assert clicked.ok
        assert emu.wait_for_view(user="UEXPERT")["callback_id"] == "correct"

        assert emu.slash_command(user="UALICE", channel="CGENERAL", command="/ask", text="Y").ok
        assert emu.wait_for_message(channel="CGENERAL", predicate=lambda m: "Y" in m["text"])
        assert emu.ephemerals(user="UALICE")[0]["text"] == "On it"
        assert emu.deliver_event({"type": "app_mention"}, forge_signature=True).status == 401
    finally:
        server.shutdown()
        server.server_close()
