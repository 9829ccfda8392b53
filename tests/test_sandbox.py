"""`apprentice sandbox` without a browser: the CLI (port taken, loopback, SIGTERM), the page's
state and action endpoints over real HTTP, and the real bot (tiny model) answering through the
emulator — including questions asked while the model is still loading."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from select import select as wait_readable

import pytest
from sqlmodel import select

from bot.engine.loading import ModelNotFound
from bot.sandbox import PortTaken, Sandbox
from bot.sandbox.actions import encode_typed
from bot.sandbox.seed import GENERAL, RANDOM
from bot.slack import blocks
from bot.store import session_scope
from bot.store.models import Question
from tests.support.tiny_model import tiny_engine

ROOT = Path(__file__).resolve().parents[1]
MEMBER, EXPERT, ADMIN = "UALEX", "UERIN", "UADA"


def start_sandbox(settings, tmp_path, *, load_engine=tiny_engine) -> Sandbox:
    return Sandbox.start(
        settings, port=0, load_engine=load_engine, data_dir=tmp_path / "sandbox-data"
    )


@pytest.fixture
def sandbox(make_settings, tmp_path):
    box = start_sandbox(make_settings(), tmp_path)
    yield box
    box.close()


def get_json(url: str, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def state(box: Sandbox, user: str) -> dict:
    status, body = get_json(f"{box.url}api/state?user={user}")
    assert status == 200, body
    return body


def act(box: Sandbox, user: str, action: str, *, content_type="application/json", **args):
    request = urllib.request.Request(
        f"{box.url}api/act",
        data=json.dumps({"user": user, "action": action, **args}).encode(),
        headers={"Content-Type": content_type},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def has_buttons(message: dict) -> bool:
    return any(b.get("type") == "actions" for b in message.get("blocks") or [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.Popen:
    """`apprentice sandbox …` in a subprocess; stderr goes to cwd/stderr.log (a pipe nobody
    reads could fill up and stall the child)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPRENTICE_", "SLACK_"))}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "bot", "sandbox", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=(cwd / "stderr.log").open("w"),
        text=True,
    )


def read_until(process: subprocess.Popen, *, done, timeout: float) -> list[str]:
    """Lines of the child's stdout until one satisfies `done` (or EOF, or the timeout)."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = wait_readable([process.stdout], [], [], 0.5)
        if not ready:
            continue
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if done(line):
            break
    return lines


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on `port` (from /proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state_code = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state_code == "0A":  # 0A = LISTEN
                if len(address) == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
                else:
                    found.add(address)
    return found


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_port_taken_is_a_clear_error_with_exit_code_2(tiny_model_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = cli("--port", str(port), "--base-model", str(tiny_model_dir), cwd=tmp_path)
        out, _ = process.communicate(timeout=120)
    err = (tmp_path / "stderr.log").read_text()
    assert process.returncode == 2, (out, err)
    assert f"port {port} is taken: pass --port" in err
    assert "Traceback" not in err


def test_cli_serves_on_loopback_only_and_stops_on_sigterm(tiny_model_dir, tmp_path):
    port = free_port()
    process = cli(
        "--port",
        str(port),
        "--base-model",
        str(tiny_model_dir),
        cwd=tmp_path,
        env_extra={"APPRENTICE_MODEL_CACHE_DIR": str(tmp_path / "cache")},
    )
    try:
        lines = read_until(
            process, done=lambda line: line.startswith(("bot ready", "error")), timeout=120
        )
        assert lines and lines[-1].startswith("bot ready"), (
            lines,
            (tmp_path / "stderr.log").read_text()[-2000:],
        )
        assert f"open http://127.0.0.1:{port}/" in "".join(lines)
        assert listening_addresses(port) == {"127.0.0.1"}
        status, body = get_json(f"http://127.0.0.1:{port}/api/state?user={MEMBER}")
        assert status == 200 and body["bot"]["state"] == "ready"
        assert not list(tmp_path.glob("*.db")), "the sandbox must not write the default database"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            out, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # what it waits on: every thread's stack (SIGUSR1)
            process.send_signal(signal.SIGUSR1)
            time.sleep(2)
            process.kill()
            process.communicate()
            pytest.fail(
                "the sandbox did not stop within 60 s of SIGTERM:\n"
                + (tmp_path / "stderr.log").read_text()[-6000:]
            )
    assert process.returncode == 0, (out, (tmp_path / "stderr.log").read_text()[-2000:])
    assert "stopping" in out


def test_port_taken_is_refused_before_anything_starts(make_settings, tmp_path):
    calls = []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortTaken, match=f"port {port} is taken: pass --port"):
            Sandbox.start(make_settings(), port=port, load_engine=calls.append)
    assert calls == []  # the model was never loaded


# -- the page's endpoints ----------------------------------------------------------------------


def test_state_shows_each_person_their_own_workspace(sandbox):
    assert sandbox.page.host == "127.0.0.1"
    assert sandbox.engine.wait_ready(60)
    alex = state(sandbox, MEMBER)
    assert alex["me"] == MEMBER and alex["bot"]["state"] == "ready"
    assert [p["label"] for p in alex["personas"]] == [
        "alex (member)",
        "erin (expert)",
        "ada (admin)",
    ]
    kinds = {c["name"]: (c["kind"], c["bot_member"]) for c in alex["channels"]}
    assert kinds == {
        "general": ("channel", True),
        "random": ("channel", False),
        "Apprentice": ("im", True),
    }
    [welcome] = alex["messages"][GENERAL]
    assert "Apprentice sandbox" in welcome["text"] and welcome["user"] == ADMIN
    assert {c["name"] for c in alex["commands"]} == {"/ask", "/apprentice"}
    # each person has their own DM with the bot
    dm_of = {
        u: next(c["id"] for c in state(sandbox, u)["channels"] if c["kind"] == "im")
        for u in (MEMBER, EXPERT)
    }
    assert dm_of[MEMBER] != dm_of[EXPERT]
    # an admin's ephemeral reply is theirs alone
    status, answer = act(sandbox, ADMIN, "command", channel=GENERAL, text="/apprentice status")
    assert (status, answer) == (200, {"ok": True})
    [reply] = state(sandbox, ADMIN)["ephemerals"]
    assert "Active adapter" in reply["text"] and reply["channel"] == GENERAL
    assert state(sandbox, MEMBER)["ephemerals"] == []
    # the version changes with the state, and only then
    assert state(sandbox, ADMIN)["version"] == state(sandbox, ADMIN)["version"]
    assert state(sandbox, MEMBER)["version"] != state(sandbox, ADMIN)["version"]


def test_unknown_people_foreign_hosts_and_form_posts_are_refused(sandbox):
    status, body = get_json(f"{sandbox.url}api/state?user=UINTRUDER")
    assert status == 400 and "unknown person" in body["error"]
    status, body = act(sandbox, "UINTRUDER", "post", channel=GENERAL, text="hi")
    assert status == 400 and "unknown person" in body["error"]
    # a page on another site cannot reach the sandbox by renaming itself (DNS rebinding)...
    status, body = get_json(f"{sandbox.url}api/state?user={MEMBER}", {"Host": "evil.example"})
    assert status == 403
    # ...nor post a cross-site form (not JSON) to it
    status, body = act(
        sandbox, MEMBER, "post", content_type="text/plain", channel=GENERAL, text="x"
    )
    assert status == 415
    status, body = act(sandbox, MEMBER, "command", channel=GENERAL, text="/deploy now")
    assert status == 400 and "/deploy is not a valid command" in body["error"]
    status, body = act(sandbox, MEMBER, "post", channel="CNOWHERE", text="hi")
    assert status == 400 and "CNOWHERE" in body["error"]
    assert sandbox.emulator.deliveries == []  # none of it reached the bot


def test_typed_text_is_stored_as_slack_stores_it(sandbox):
    users = sandbox.emulator.ws.users
    assert (
        encode_typed("@apprentice is a<b & c? ask @Erin. mail x@erin.example @nobody", users=users)
        == "<@UBOT> is a&lt;b &amp; c? ask <@UERIN>. mail x@erin.example @nobody"
    )


def test_question_while_the_model_loads_is_answered_once_it_is_ready(make_settings, tmp_path):
    gate = threading.Event()

    def slow_load(settings):
        gate.wait(60)
        return tiny_engine(settings)

    box = start_sandbox(make_settings(), tmp_path, load_engine=slow_load)
    try:
        assert state(box, MEMBER)["bot"]["state"] == "starting"
        assert "bot starting" in state(box, MEMBER)["bot"]["detail"]
        status, posted = act(box, MEMBER, "post", channel=GENERAL, text="@apprentice deploys?")
        assert status == 200
        emulator = box.emulator
        thinking = emulator.wait_for_message(channel=GENERAL, thread_ts=posted["ts"], user="UBOT")
        assert thinking["text"] == blocks.THINKING_TEXT
        gate.set()
        answer = emulator.wait_for_message(
            channel=GENERAL, thread_ts=posted["ts"], predicate=has_buttons, timeout=60
        )
        assert answer["ts"] == thinking["ts"]  # the thinking message became the answer
        assert state(box, MEMBER)["bot"]["state"] == "ready"
        with session_scope(box.local.services.db) as session:
            [question] = session.exec(select(Question)).all()
        assert (question.user_id, question.text) == (MEMBER, "deploys?")
    finally:
        gate.set()
        box.close()


def test_a_model_that_does_not_load_is_shown_in_the_thread(make_settings, tmp_path):
    def broken(settings):
        raise ModelNotFound("no model at /nowhere: pass --base-model with a model folder")

    box = start_sandbox(make_settings(), tmp_path, load_engine=broken)
    try:
        assert not box.engine.wait_ready(30)
        bot = state(box, MEMBER)["bot"]
        assert bot["state"] == "failed" and "no model at /nowhere" in bot["detail"]
        dm = box.emulator.open_dm(MEMBER)
        status, posted = act(box, MEMBER, "post", channel=dm, text="hello?")
        reply = box.emulator.wait_for_message(
            channel=dm,
            thread_ts=posted["ts"],
            predicate=lambda m: "did not load" in json.dumps(m.get("blocks")),
        )
        assert "no model at /nowhere" in json.dumps(reply["blocks"])
    finally:
        box.close()


def test_buttons_modals_and_app_home_through_the_page_actions(sandbox):
    emulator = sandbox.emulator
    status, posted = act(sandbox, MEMBER, "post", channel=GENERAL, text="@apprentice deploys?")
    answer = emulator.wait_for_message(
        channel=GENERAL, thread_ts=posted["ts"], predicate=has_buttons, timeout=60
    )
    # a member may not correct: told so, privately
    act(
        sandbox,
        MEMBER,
        "click",
        channel=GENERAL,
        message_ts=answer["ts"],
        action_id=blocks.CORRECT,
    )
    note = emulator.wait_for_ephemeral(user=MEMBER)
    assert "Only experts" in note["text"]
    assert state(sandbox, MEMBER)["modal"] is None
    # the expert gets the modal, in their state only
    act(
        sandbox,
        EXPERT,
        "click",
        channel=GENERAL,
        message_ts=answer["ts"],
        action_id=blocks.CORRECT,
    )
    emulator.wait_for_view(user=EXPERT)
    modal = state(sandbox, EXPERT)["modal"]
    assert modal["callback_id"] == blocks.CORRECT_VIEW
    assert state(sandbox, MEMBER)["modal"] is None
    status, body = act(
        sandbox,
        EXPERT,
        "submit_view",
        view_id=modal["id"],
        values={blocks.CORRECTION_BLOCK: {blocks.CORRECTION_INPUT: "Tuesdays at noon."}},
    )
    assert status == 200
    corrected = emulator.wait_for_message(
        channel=GENERAL,
        thread_ts=posted["ts"],
        predicate=lambda m: "corrected by" in json.dumps(m.get("blocks")),
    )
    assert "Tuesdays at noon." in json.dumps(corrected["blocks"])
    assert state(sandbox, EXPERT)["modal"] is None
    # App Home: opening the tab makes the bot publish the person's home view
    assert state(sandbox, ADMIN)["home"] is None
    status, body = act(sandbox, ADMIN, "open_home")
    assert status == 200
    emulator.wait_until(
        lambda: ADMIN in emulator.home_views, timeout=10, describe=lambda: "no home view"
    )
    home = state(sandbox, ADMIN)["home"]
    assert "Questions this week" in json.dumps(home["blocks"])
    # #random has no bot: a message there reaches nobody
    act(sandbox, MEMBER, "post", channel=RANDOM, text="@apprentice anyone?")
    assert [m["text"] for m in state(sandbox, MEMBER)["messages"][RANDOM]] == ["<@UBOT> anyone?"]
