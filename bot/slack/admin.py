"""`/apprentice …`: the admin commands, parsed and carried out; the listener only routes.

Each command returns the text to show the admin (ephemeral) after what it changed is committed.
Slow ones (train, export) return a `Followup`: the listener acknowledges at once and runs it
on its own thread, reporting through the command's response_url.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from bot.scheduler import pause_training, resume_training, training_paused
from bot.slack.blocks import version_label
from bot.slack.services import Services
from bot.store import session_scope
from bot.store.channels import set_auto_answer
from bot.store.locks import LockBusy
from bot.store.members import add_member, list_members, remove_member
from bot.store.models import Role, utcnow
from bot.store.stats import review_stats

USER_REF = re.compile(r"^<@([UW][A-Z0-9]+)(?:\|[^>]*)?>$|^([UW][A-Z0-9]{2,})$")
CHANNEL_REF = re.compile(r"^<#([CGD][A-Z0-9]+)(?:\|[^>]*)?>$")

HELP = """*Apprentice admin commands*
`/apprentice status` — active adapter, queue, this week's numbers
`/apprentice experts add|remove @user` · `/apprentice experts list`
`/apprentice channel auto on|off [#channel]` — answer every question in a channel
`/apprentice train` — run a learning cycle now
`/apprentice adapters` — list adapter versions · `/apprentice rollback` — back to the previous one
`/apprentice pause` · `/apprentice resume` — stop / restart scheduled training
`/apprentice export` — export the training data (JSONL)"""

NO_TRAINING = (
    "Training from Slack verdicts is not available yet in this deployment: run `apprentice train` "
    "on the server instead."
)
NO_EXPORT = "Exporting from Slack is not available yet: run `apprentice export` on the server."
NO_REGISTRY = "The adapter store is not set up in this deployment; use `apprentice adapters`."


@dataclass(frozen=True)
class Followup:
    """Slow work to run after acknowledging: returns the text to send when done."""

    run: Callable[[], str]


@dataclass(frozen=True)
class Reply:
    text: str
    followup: Followup | None = None


def parse_user(token: str) -> str | None:
    match = USER_REF.match(token.strip())
    return (match.group(1) or match.group(2)) if match else None


def run_command(*, services: Services, text: str, user_id: str, channel_id: str) -> Reply:
    words = text.split()
    if not words or words[0] == "help":
        return Reply(HELP)
    name, args = words[0].lower(), words[1:]
    handler = COMMANDS.get(name)
    if handler is None:
        return Reply(f"I don't know `{name}`.\n{HELP}")
    return handler(services=services, args=args, user_id=user_id, channel_id=channel_id)


def _status(*, services: Services, **_) -> Reply:
    with session_scope(services.db) as session:
        stats = review_stats(session=session, since=utcnow() - timedelta(days=7))
    paused = training_paused(db=services.db)
    approval = "—" if stats.approval_rate is None else f"{stats.approval_rate:.0%}"
    return Reply(
        f"*Active adapter:* {version_label(services.active_version())}\n"
        f"*Engine queue:* {services.queue_depth()} waiting\n"
        f"*This week:* {stats.questions} questions, {stats.answers} answers, "
        f"{stats.reviewed} reviewed (approval {approval})\n"
        f"*Pending reviews:* {stats.pending_reviews}\n"
        f"*Scheduled training:* {'paused' if paused else 'on'}"
    )


def _experts(*, services: Services, args: list[str], user_id: str, **_) -> Reply:
    action = args[0].lower() if args else "list"
    if action == "list":
        configured = list(dict.fromkeys([*services.settings.experts, *services.settings.admins]))
        with session_scope(services.db) as session:
            added = [m.user_id for m in list_members(session=session)]
        group = services.settings.expert_usergroup
        lines = ["*Experts*"]
        lines.append("configured: " + (", ".join(f"<@{u}>" for u in configured) or "none"))
        lines.append("added in Slack: " + (", ".join(f"<@{u}>" for u in added) or "none"))
        if group:
            lines.append(f"and everyone in <!subteam^{group}>")
        return Reply("\n".join(lines))
    if action not in ("add", "remove") or len(args) < 2:
        return Reply("Usage: `/apprentice experts add @user`, `remove @user` or `list`.")
    targets = [parse_user(token) for token in args[1:]]
    if not all(targets):
        return Reply("Name people with @mentions, e.g. `/apprentice experts add @alice`.")
    done, unchanged = [], []
    with session_scope(services.db) as session:
        for target in targets:
            if action == "add":
                changed = add_member(
                    session=session, user_id=target, role=Role.EXPERT, added_by=user_id
                )
            else:
                changed = remove_member(session=session, user_id=target, role=Role.EXPERT)
            (done if changed else unchanged).append(target)
    lines = []
    if done:
        verb = "are now experts" if action == "add" else "are no longer experts"
        lines.append(f"{', '.join(f'<@{u}>' for u in done)} {verb}.")
    for target in unchanged:
        if action == "add":
            lines.append(f"<@{target}> already was an expert.")
        elif target in services.settings.experts or target in services.settings.admins:
            lines.append(
                f"<@{target}> is an expert by configuration (APPRENTICE_EXPERTS/ADMINS); "
                "change it there."
            )
        else:
            lines.append(f"<@{target}> was not an expert added in Slack.")
    return Reply("\n".join(lines))


def _channel(*, services: Services, args: list[str], user_id: str, channel_id: str) -> Reply:
    usage = "Usage: `/apprentice channel auto on|off [#channel]`."
    if len(args) < 2 or args[0].lower() != "auto" or args[1].lower() not in ("on", "off"):
        return Reply(usage)
    target = channel_id
    if len(args) > 2:
        match = CHANNEL_REF.match(args[2])
        if not match:
            return Reply(usage)
        target = match.group(1)
    enabled = args[1].lower() == "on"
    with session_scope(services.db) as session:
        set_auto_answer(session=session, channel_id=target, enabled=enabled, updated_by=user_id)
    if enabled:
        return Reply(
            f"I will answer every new question in <#{target}> (invite me there if I'm not in it)."
        )
    return Reply(f"In <#{target}> I will only answer @mentions and threads I'm in.")


def _pause(*, services: Services, user_id: str, **_) -> Reply:
    pause_training(db=services.db, actor=user_id)
    return Reply("Scheduled training is paused. `/apprentice resume` turns it back on.")


def _resume(*, services: Services, user_id: str, **_) -> Reply:
    resume_training(db=services.db, actor=user_id)
    return Reply("Scheduled training is on again.")


def _version_name(item) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return str(item.get("name"))
    return str(getattr(item, "name", item))


def _adapters(*, services: Services, **_) -> Reply:
    if services.registry is None:
        return Reply(NO_REGISTRY)
    versions = [_version_name(v) for v in services.registry.list_versions()]
    active = services.registry.active_version()
    if not versions:
        return Reply("No adapter versions yet: the bot answers with the base model.")
    lines = [f"{'▶ ' if name == active else '   '}{name}" for name in versions]
    return Reply(f"*Adapter versions* (active: {version_label(active)})\n" + "\n".join(lines))


def _rollback(*, services: Services, user_id: str, **_) -> Reply:
    if services.registry is None:
        return Reply(NO_REGISTRY)
    before = services.registry.active_version()
    try:
        services.registry.rollback(actor=f"slack:{user_id}")
    except (ValueError, LookupError, RuntimeError) as exc:
        return Reply(f"Could not roll back: {exc}")
    after = services.registry.active_version()
    return Reply(
        f"Rolled back from {version_label(before)} to {version_label(after)}. "
        "Every replica switches within a few seconds."
    )


def _train(*, services: Services, user_id: str, **_) -> Reply:
    """Start a cycle now and say so at once; the outcome follows (ephemeral + admin report).

    The hook starts the cycle in the background and returns a handle with `run_id` and
    `wait()` (`bot.learning.cycle.start_cycle`); `LockBusy` means one is running already.
    """
    hook = services.run_training
    if hook is None:
        return Reply(NO_TRAINING)
    try:
        started = hook(trigger="slack", actor=user_id)
    except LockBusy as exc:
        return Reply(
            f"A learning cycle is already running ({exc}). Its report will follow; "
            "try again when it is done."
        )
    except ValueError as exc:  # a bad APPRENTICE_TRAIN_OVERRIDES, say which key
        return Reply(f"Could not start training: {exc}")
    wait = getattr(started, "wait", None)
    if wait is None:  # a hook that ran the whole cycle itself
        return Reply(f"Training started and finished: {started}")
    if started.done():
        return Reply(f"Nothing to train: {wait().summary()}")
    channel = services.settings.admin_channel
    where = f"in <#{channel}>" if channel else "here"
    return Reply(
        f"Started training run #{started.run_id}; the report will follow {where}.",
        Followup(lambda: f"Training {wait().summary()}"),
    )


def _export(*, services: Services, user_id: str, channel_id: str, **_) -> Reply:
    hook = services.export_dataset
    if hook is None:
        return Reply(NO_EXPORT)

    def run() -> str:
        if _accepts(hook, "user_id"):
            result = hook(user_id=user_id, channel_id=channel_id)
        else:
            result = hook()
        if getattr(result, "examples", None) == 0:
            return "Nothing to export yet: no approved or corrected answers."
        return f"Export finished: {result}"

    return Reply("Exporting the training data; I'll send you the file…", Followup(run))


def _accepts(function, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


COMMANDS: dict[str, Callable[..., Reply]] = {
    "status": _status,
    "experts": _experts,
    "channel": _channel,
    "train": _train,
    "adapters": _adapters,
    "rollback": _rollback,
    "pause": _pause,
    "resume": _resume,
    "export": _export,
}
