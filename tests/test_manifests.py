"""The manifests are valid for "Create an app from a manifest" and ask for exactly what the code
uses: events and commands from the Bolt app's listeners, scopes from the Web API methods the
bot actually called during an end-to-end run through the emulator."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from bot.slack import manifest_spec
from tests.test_slack_e2e import ADMIN, CHANNEL, EXPERT, OTHER, USER, ask_and_wait, start_slack

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = {"socket": ROOT / "manifests/socket-mode.yaml", "http": ROOT / "manifests/http.yaml"}
SCHEMA = json.loads((Path(__file__).parent / "data/manifest.schema.1.0.0.json").read_text())
EVENTS_URL = "https://YOUR-HOST/slack/events"


def load(kind: str) -> dict:
    return yaml.safe_load(MANIFESTS[kind].read_text())


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_is_valid_for_slack(kind):
    manifest = load(kind)
    jsonschema.validate(manifest, SCHEMA)
    assert len(manifest["display_information"]["name"]) <= 35
    assert len(manifest["display_information"]["description"]) <= 140
    for command in manifest["features"]["slash_commands"]:
        assert len(command["command"]) <= 32 and command["should_escape"] is True
    settings = manifest["settings"]
    assert settings["socket_mode_enabled"] is (kind == "socket")
    if kind == "http":
        assert settings["event_subscriptions"]["request_url"] == EVENTS_URL
        assert settings["interactivity"]["request_url"] == EVENTS_URL
        assert {c["url"] for c in manifest["features"]["slash_commands"]} == {EVENTS_URL}


def test_schema_refuses_what_slack_refuses():
    manifest = load("socket")
    manifest["display_information"]["name"] = "A" * 36
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, SCHEMA)


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_declares_what_the_spec_declares(kind):
    manifest = load(kind)
    assert sorted(manifest["settings"]["event_subscriptions"]["bot_events"]) == sorted(
        manifest_spec.BOT_EVENTS
    )
    commands = {c["command"]: c for c in manifest["features"]["slash_commands"]}
    assert set(commands) == set(manifest_spec.COMMANDS)
    for name, (description, hint) in manifest_spec.COMMANDS.items():
        assert (commands[name]["description"], commands[name]["usage_hint"]) == (description, hint)
    assert manifest["settings"]["interactivity"]["is_enabled"] is True
    assert manifest["features"]["app_home"]["home_tab_enabled"] is True


EVENT_SAMPLES = {
    "app_home_opened": {"type": "app_home_opened", "user": USER, "tab": "messages"},
    "app_mention": {"type": "app_mention", "user": USER, "text": "<@UBOT>", "channel": CHANNEL},
    "message.channels": {"type": "message", "channel_type": "channel", "channel": CHANNEL},
    "message.groups": {"type": "message", "channel_type": "group", "channel": "G1"},
    "message.im": {"type": "message", "channel_type": "im", "channel": "D1"},
}


@pytest.fixture
def local(make_settings, sqlite_url):
    bot = start_slack(make_settings(database_url=sqlite_url, expert_usergroup="S0EXPERTS"))
    yield bot
    bot.close()


def test_the_app_listens_to_exactly_the_declared_events_and_commands(local):
    """Bolt answers 404 to a request no listener matches: every declared event and command
    must reach one, and an undeclared command must not."""
    emulator = local.emulator
    assert set(EVENT_SAMPLES) == set(manifest_spec.BOT_EVENTS)
    for name, event in EVENT_SAMPLES.items():
        event = dict(event, ts="1.000001", event_ts="1.000001", text=event.get("text", ""))
        result = emulator.deliver_event(event, retry=False)
        assert result.status == 200, name
    for command in manifest_spec.COMMANDS:
        assert emulator.slash_command(user=USER, channel=CHANNEL, command=command).status == 200
    assert emulator.slash_command(user=USER, channel=CHANNEL, command="/other").status == 404
    unknown = {"type": "reaction_added", "user": USER, "reaction": "tada", "event_ts": "1.2"}
    assert emulator.deliver_event(unknown, retry=False).status == 404


def test_scopes_are_exactly_those_of_the_methods_called(local):
    """Drive every feature, record the Web API methods called, map them to scopes."""
    emulator = local.emulator
    emulator.add_usergroup("S0EXPERTS", handle="experts", users=[OTHER])
    ts, answer = ask_and_wait(local)
    message_ts = answer["ts"]
    for user, label in ((EXPERT, "✅ Approve"), (OTHER, "👍"), (USER, "🙋 Ask an expert")):
        emulator.click_button(user=user, channel=CHANNEL, message_ts=message_ts, label=label)
    emulator.click_button(user=USER, channel=CHANNEL, message_ts=message_ts, label="✗ Reject")
    emulator.click_button(user=OTHER, channel=CHANNEL, message_ts=message_ts, label="✏️ Correct")
    modal = emulator.wait_for_view(user=OTHER)
    emulator.submit_view(
        user=OTHER, view_id=modal["id"], values={"correction": {"correction_text": "Fixed."}}
    )
    emulator.wait_for_ephemeral(user=OTHER, predicate=lambda e: "correction" in e["text"])
    emulator.slash_command(user=USER, channel=CHANNEL, command="/ask", text="and this?")
    emulator.slash_command(user=ADMIN, channel=CHANNEL, command="/apprentice", text="status")
    emulator.deliver_event({"type": "app_home_opened", "user": USER, "tab": "home"}, retry=False)
    emulator.wait_until(lambda: emulator.home_views.get(USER), timeout=10, describe=lambda: "home")
    local.services.dispatcher.wait_idle(20)

    methods = {method for method, _ in emulator.calls}
    assert {"views.open", "views.publish", "chat.postEphemeral", "chat.update"} <= methods
    needed = manifest_spec.required_scopes(methods)
    for kind in MANIFESTS:
        assert sorted(load(kind)["oauth_config"]["scopes"]["bot"]) == sorted(needed), kind
