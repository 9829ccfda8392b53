"""`Sandbox`: the whole loop on one machine — the emulator as Slack, the real bot, and a web page.

`Sandbox.start(settings)` does, in this order:
1. binds the page's port (a taken port fails here, before anything slow);
2. starts the emulator and the real Bolt app over signed HTTP (`bot.slack.local.LocalSlack`),
   with retrieval from approved answers as `apprentice run` has it;
3. starts loading the model on a thread (`DeferredEngine`: the first load converts GGUF, ~20 s);
   questions asked meanwhile wait for it;
4. seeds people and channels (`bot.sandbox.seed`) and serves the page.

The bot runs on its embedded defaults, in a data folder of its own (a fresh temporary one unless
given): a SQLite file and an adapters folder, so trying the sandbox never writes sandbox people
into a real deployment's database, and the emulator's message timestamps (which restart with
each run) never meet the ones stored by an earlier run. The signing secret and bot token are
made up per run; the seeded expert and admin are the only `experts` and `admins`.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.runtime import attach_learning
from bot.sandbox import actions, state
from bot.sandbox.deferred import FAILED, READY, STARTING, DeferredEngine
from bot.sandbox.seed import ADMIN, EXPERT, persona, role_ids, seed_workspace
from bot.sandbox.server import PageServer
from bot.settings import Settings

log = logging.getLogger(__name__)


def load_default_engine(settings: Settings):
    """The bot's own engine on `settings.base_model` (what `apprentice run` would load)."""
    from bot.engine.worker import AnswerEngine

    return AnswerEngine.from_settings(settings).start()


def sandbox_settings(settings: Settings, *, data_dir: Path) -> Settings:
    """`settings` with made-up Slack secrets, the seeded roles, and storage under `data_dir`."""
    return settings.model_copy(
        update={
            "slack_bot_token": "xoxb-sandbox-" + secrets.token_hex(12),
            "slack_signing_secret": secrets.token_hex(16),
            "slack_app_token": "",
            "database_url": f"sqlite:///{data_dir / 'apprentice.db'}",
            "adapters_dir": data_dir / "adapters",
            "admins": role_ids(ADMIN),
            "experts": role_ids(EXPERT),
            "expert_usergroup": "",
            "admin_channel": "",
        }
    )


def model_label(name: str) -> str:
    return Path(name).name if ("/" in name or "\\" in name) else name


@dataclass
class Sandbox:
    page: PageServer
    local: Any  # bot.slack.local.LocalSlack
    engine: DeferredEngine
    data_dir: Path
    _owns_data_dir: bool = False

    @classmethod
    def start(
        cls,
        settings: Settings,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        load_engine: Callable[[Settings], Any] = load_default_engine,
        data_dir: Path | None = None,
    ) -> Sandbox:
        """Start everything; raises `PortTaken` (before loading anything) if the port is in use."""
        from bot.slack.local import LocalSlack

        page = PageServer(host=host, port=port)
        owns = data_dir is None
        data_dir = Path(data_dir or tempfile.mkdtemp(prefix="apprentice-sandbox-"))
        data_dir.mkdir(parents=True, exist_ok=True)
        settings = sandbox_settings(settings, data_dir=data_dir)
        engine = DeferredEngine(load=lambda: load_engine(settings))
        try:
            # retrieval as `apprentice run` has it: corrections answer repeats at once
            local = LocalSlack.start(settings, engine=engine, retrieval=True)
            # only now: the embedder above imports transformers too, and two threads importing
            # it at once can see a half-initialised module ("cannot import name ...")
            engine.start()
        except BaseException:
            engine.stop()
            page.close()
            if owns:
                shutil.rmtree(data_dir, ignore_errors=True)
            raise
        sandbox = cls(page=page, local=local, engine=engine, data_dir=data_dir, _owns_data_dir=owns)
        try:
            attach_learning(local.services)
            seed_workspace(local.emulator)
        except BaseException:
            sandbox.close()
            raise
        page.state_for = sandbox.state_bytes
        page.act = sandbox.act
        page.start()
        return sandbox

    @property
    def url(self) -> str:
        return self.page.url

    @property
    def emulator(self):
        return self.local.emulator

    @property
    def settings(self) -> Settings:
        return self.local.settings

    def bot_status(self) -> dict:
        """What the page's status pill and the terminal say about the model."""
        engine, name = self.engine, model_label(self.settings.base_model)
        seconds = int(engine.elapsed_s())
        if engine.state == STARTING:
            detail = f"bot starting… loading {name} ({seconds} s; the first run converts it)"
        elif engine.state == READY:
            detail = f"bot ready · {name}"
        elif engine.state == FAILED:
            detail = f"the model did not load: {engine.error}"
        else:
            detail = "bot stopped"
        return {"state": engine.state, "detail": detail, "model": name}

    def state_bytes(self, user_id: str) -> bytes:
        if persona(user_id) is None:
            raise actions.ActionError(f"unknown person {user_id!r}")
        snapshot = state.page_state(emulator=self.emulator, user_id=user_id, bot=self.bot_status())
        return state.versioned(snapshot)

    def act(self, user_id: str, action: str, args: dict) -> dict:
        return actions.perform(emulator=self.emulator, user_id=user_id, action=action, args=args)

    def close(self) -> None:
        self.page.close()
        self.local.close()
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
