"""`/apprentice export`: the training set as chat JSONL, uploaded to the admin who asked.

The same data as `apprentice export` (`bot.cli.learning_commands`): `build_training_set`'s
scrubbed examples, in `to_chat_jsonl`'s format. It goes as a file in the admin's DM with the
bot (`conversations.open`, then `files_upload_v2`): the data comes from many channels, so it
is not posted where the command happened to be typed. Without a user it goes to the admin
channel. Building the set is a query; nothing here needs the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bot.learning.config import TrainingConfig
from bot.learning.dataset import build_training_set, split, to_chat_jsonl
from bot.store.db import session_scope


@dataclass(frozen=True)
class ExportResult:
    examples: int
    train: int
    eval: int
    preference_pairs: int
    dataset_hash: str
    excluded: dict = field(default_factory=dict)
    channel: str | None = None
    file_id: str | None = None
    filename: str | None = None

    def __str__(self) -> str:
        where = f" as `{self.filename}` in <#{self.channel}>" if self.file_id else ""
        left_out = ", ".join(f"{n} {reason}" for reason, n in self.excluded.items()) or "none"
        return (
            f"{self.examples} examples ({self.train} train, {self.eval} held out){where}; "
            f"{self.preference_pairs} preference pairs; left out: {left_out}; "
            f"dataset {self.dataset_hash[:12]}"
        )


def export_jsonl(*, db, settings=None) -> tuple[str, ExportResult]:
    """(JSONL text, counts) of the training set as a cycle would build it now."""
    with session_scope(db) as session:
        training_set = build_training_set(session=session, settings=settings)
    config = TrainingConfig()
    parts = split(
        training_set,
        eval_fraction=config.eval_fraction,
        seed=config.seed,
        min_eval_examples=config.min_eval_examples,
    )
    text = "".join(line + "\n" for line in to_chat_jsonl(training_set.examples))
    return text, ExportResult(
        examples=len(training_set.examples),
        train=len(parts.train),
        eval=len(parts.eval),
        preference_pairs=len(training_set.preference_pairs),
        dataset_hash=training_set.dataset_hash,
        excluded=dict(training_set.excluded),
    )


def export_dataset(
    *, settings, db, user_id: str | None = None, channel_id: str | None = None, client=None
) -> ExportResult:
    """Upload the training set as `training-<hash>.jsonl` to `user_id`'s DM with the bot
    (else `channel_id`, else the admin channel); returns what was sent."""
    from dataclasses import replace

    text, result = export_jsonl(db=db, settings=settings)
    if result.examples == 0:
        return result
    if client is None:
        from slack_sdk import WebClient

        client = WebClient(token=settings.slack_bot_token, base_url=settings.slack_api_base)
    target = channel_id or settings.admin_channel or None
    if user_id:
        target = client.conversations_open(users=user_id)["channel"]["id"]
    if not target:
        raise ValueError("no one to send the export to: give a user, a channel or an admin channel")
    filename = f"training-{result.dataset_hash[:12]}.jsonl"
    uploaded = client.files_upload_v2(
        channel=target,
        content=text,
        filename=filename,
        title=f"Apprentice training data ({result.examples} examples)",
        initial_comment="The training set as the next cycle would build it (scrubbed, chat JSONL).",
    )
    files = uploaded.get("files") or [uploaded.get("file") or {}]
    return replace(result, channel=target, file_id=files[0].get("id"), filename=filename)
