"""The sandbox page in headless Chromium, driven like a person would: ask, watch "thinking…"
become an answer, correct it as the expert through the modal, run `/apprentice status` as the
admin, ask again and get the correction. Everything behind the page is real (the emulator,
Bolt over signed HTTP, the tiny model, SQLite, retrieval).

Chromium is Debian's package (`scripts/install_browser.sh`), driven by Playwright for Python
with `executable_path`; `playwright install` is never run. The test skips only when Chromium is
missing and cannot be installed here; CI installs it.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest
from sqlmodel import select

from bot.store import session_scope
from bot.store.models import Verdict
from tests.test_sandbox import ADMIN, EXPERT, MEMBER, start_sandbox, tiny_engine

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = Path(os.environ.get("APPRENTICE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 30_000


def _chromium() -> Path:
    if not CHROMIUM.exists():
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / "install_browser.sh")],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if not CHROMIUM.exists():
            pytest.skip(
                f"{CHROMIUM} is missing and scripts/install_browser.sh could not install it: "
                f"{(result.stderr or result.stdout).strip()[-300:]}"
            )
    return CHROMIUM


@pytest.fixture(scope="module")
def browser():
    chromium = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is missing: pip install -e '.[test]' (never `playwright install`)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield page
    context.close()
    assert errors == [], f"the page logged errors: {errors}"


@pytest.fixture
def gated_sandbox(make_settings, tmp_path):
    """A sandbox whose model finishes loading only when the test sets the gate."""
    gate = threading.Event()

    def load(settings):
        gate.wait(120)
        return tiny_engine(settings)

    box = start_sandbox(make_settings(), tmp_path, load_engine=load)
    yield box, gate
    gate.set()
    box.close()


def act_as(page, user: str) -> None:
    page.select_option("#persona", user)
    page.wait_for_function(
        "user => document.querySelector('#persona').value === user", arg=user, timeout=WAIT_MS
    )


@pytest.fixture
def ready_sandbox(make_settings, tmp_path):
    box = start_sandbox(make_settings(), tmp_path)
    assert box.engine.wait_ready(60)
    yield box
    box.close()


# (the sandbox fixtures come first: the page closes before the server it polls)


def test_ask_correct_and_admin_status_in_the_browser(gated_sandbox, page):
    from playwright.sync_api import expect

    box, gate = gated_sandbox
    page.goto(f"{box.url}?as={MEMBER}")
    status = page.locator("#bot-status")
    expect(status).to_contain_text("bot starting", timeout=WAIT_MS)
    expect(page.locator("#channel-title")).to_contain_text("# general")
    expect(page.locator("#messages")).to_contain_text("Welcome to the Apprentice sandbox")

    # a member asks by mentioning the bot; the thread opens on the bot's first reply
    composer = page.locator("#composer textarea")
    composer.fill("@apprentice how do we deploy?")
    composer.press("Enter")
    thread = page.locator("#thread")
    expect(thread).to_be_visible(timeout=WAIT_MS)
    expect(thread.locator(".msg").first).to_contain_text("@apprentice how do we deploy?")
    expect(thread.locator(".msg.from-bot")).to_contain_text("thinking…", timeout=WAIT_MS)

    # the model finishes loading: the same message becomes the answer, with its buttons
    gate.set()
    expect(thread.get_by_role("button", name="✅ Approve")).to_be_visible(timeout=WAIT_MS)
    expect(thread.locator(".msg.from-bot")).to_have_count(1)
    expect(thread.locator(".msg.from-bot")).not_to_contain_text("thinking…")
    expect(thread.locator(".msg.from-bot .block.context").first).to_contain_text("base model")
    expect(status).to_contain_text("bot ready", timeout=WAIT_MS)
    expect(page.locator("#messages")).to_contain_text("1 reply")

    # the expert corrects it through the modal, prefilled with the answer
    act_as(page, EXPERT)
    thread.get_by_role("button", name="✏️ Correct").click()
    modal = page.locator("#modal")
    expect(modal).to_contain_text("Correct the answer", timeout=WAIT_MS)
    field = modal.locator("textarea")
    assert field.input_value().strip(), "the modal should hold the answer to edit"
    field.fill("Deploys run on Tuesdays at noon, through the release train.")
    modal.get_by_role("button", name="Save correction").click()
    expect(page.locator("#modal-backdrop")).to_be_hidden(timeout=WAIT_MS)
    answer = thread.locator(".msg.from-bot").first
    expect(answer).to_contain_text("Deploys run on Tuesdays at noon", timeout=WAIT_MS)
    expect(answer).to_contain_text("corrected by @erin")
    expect(thread.locator(".msg.ephemeral")).to_contain_text("Only visible to you")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "sandbox-after-correction.png"))
    with session_scope(box.local.services.db) as session:
        [verdict] = session.exec(select(Verdict).where(Verdict.kind == "correct")).all()
    assert verdict.author_id == EXPERT and verdict.text.startswith("Deploys run on Tuesdays")

    # the admin runs /apprentice status from the composer (with the command suggestions)
    act_as(page, ADMIN)
    composer.fill("/appr")
    page.locator("#composer .suggestion", has_text="/apprentice").click()
    expect(composer).to_have_value("/apprentice ")
    composer.press_sequentially("status")
    composer.press("Enter")
    reply = page.locator("#messages .msg.ephemeral")
    expect(reply).to_contain_text("Active adapter: base model", timeout=WAIT_MS)
    expect(reply).to_contain_text("Only visible to you")
    # ...which nobody else sees
    act_as(page, MEMBER)
    expect(page.locator("#messages .msg.ephemeral")).to_have_count(0, timeout=WAIT_MS)

    # the loop closes at once: the same question, asked with /ask, gets the expert's correction
    page.locator("#thread-close").click()
    composer.fill("/ask how do we deploy?")
    composer.press("Enter")
    expect(page.locator("#messages")).to_contain_text("@alex asked: how do we deploy?")
    expect(thread).to_be_visible(timeout=WAIT_MS)
    repeat = thread.locator(".msg.from-bot").last
    expect(repeat).to_contain_text("Deploys run on Tuesdays at noon", timeout=WAIT_MS)
    expect(repeat).to_contain_text("Answered from an answer")


def test_text_is_rendered_safely_and_app_home_and_dm_work(ready_sandbox, page):
    from playwright.sync_api import expect

    box = ready_sandbox
    page.goto(f"{box.url}?as={MEMBER}")
    page.locator("#channel-list button", has_text="random").click()
    expect(page.locator("#channel-note")).to_contain_text("not in this channel")
    composer = page.locator("#composer textarea")
    composer.fill(
        '<img src=x onerror="window.__pwned=1"> *bold* _slanted_ `a<b` '
        "<https://example.com|a link> @erin"
    )
    composer.press("Enter")
    text = page.locator("#messages .msg").last.locator(".text")
    expect(text.locator("b")).to_have_text("bold", timeout=WAIT_MS)
    expect(text.locator("i")).to_have_text("slanted")
    expect(text.locator("code")).to_have_text("a<b")
    expect(text.locator(".mention")).to_have_text("@erin")
    expect(text).to_contain_text('<img src=x onerror="window.__pwned=1">')
    assert text.locator("img").count() == 0
    assert page.evaluate("window.__pwned") is None
    # typed <…> is escaped by the client, so it never becomes a link
    assert text.locator("a").count() == 0

    # the app: its Home tab is published by the bot; its Messages tab is the DM
    page.locator("#app-list button", has_text="Apprentice").click()
    page.locator("#channel-tabs .tab", has_text="Home").click()
    expect(page.locator("#home")).to_contain_text("Questions this week", timeout=WAIT_MS)
    page.locator("#channel-tabs .tab", has_text="Messages").click()
    composer.fill("what is the on-call rotation?")
    composer.press("Enter")
    thread = page.locator("#thread")
    expect(thread.get_by_role("button", name="👍")).to_be_visible(timeout=WAIT_MS)
    thread.get_by_role("button", name="👍").click()
    expect(thread.locator(".msg.from-bot").first).to_contain_text("👍 1", timeout=WAIT_MS)
