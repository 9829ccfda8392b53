"""The training report in the admin channel: what a cycle used, measured and decided.

After every run (promoted, refused, skipped or failed) the parent process of the cycle posts
one message to `settings.admin_channel`: the examples used (count and their lineage ids), the
before/after metrics, promoted or not and why, and — when a version was trained — the loss
curve (`loss.png`, written by the trainer next to the adapter) uploaded as a file in the
message's thread with `files_upload_v2`. No admin channel or no bot token: nothing is posted.

`format_report` is pure (Block Kit within Slack's limits); `post_report` does the Web API calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from bot.store.models import RunState

log = logging.getLogger(__name__)

SECTION_LIMIT = 2900  # Slack allows 3,000 characters in a section's text
LINEAGE_SHOWN = 12

HEADLINES = {
    RunState.PROMOTED: "✅ Training run #{run}: {version} promoted — every replica swaps to it",
    RunState.REFUSED: "🛑 Training run #{run}: {version} refused by the gate — active one kept",
    RunState.SKIPPED: "💤 Training run #{run}: skipped — nothing to learn",
    RunState.FAILED: "❌ Training run #{run} failed — the active version is unchanged",
}


@dataclass(frozen=True)
class PostedReport:
    channel: str
    ts: str
    file_id: str | None


def _pct(value) -> str:
    return "—" if value is None else f"{value:.0%}"


def _loss(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def _clip(text: str) -> str:
    return text if len(text) <= SECTION_LIMIT else text[: SECTION_LIMIT - 1] + "…"


def format_report(outcome) -> tuple[str, list[dict]]:
    """(fallback text, blocks) for a `bot.learning.cycle.CycleOutcome`."""
    m = outcome.metrics or {}
    headline = HEADLINES.get(outcome.state, "Training run #{run}: {version}").format(
        run=outcome.run_id, version=outcome.version or "no version"
    )
    blocks: list[dict] = [{"type": "section", "text": {"type": "mrkdwn", "text": f"*{headline}*"}}]

    ids = list(outcome.example_ids or [])
    shown = ", ".join(ids[:LINEAGE_SHOWN]) + (
        f" and {len(ids) - LINEAGE_SHOWN} more" if len(ids) > LINEAGE_SHOWN else ""
    )
    used = f"*Examples used:* {len(ids)}"
    if "train_examples" in m:
        used += f" ({m['train_examples']} trained, {m['held_out_examples']} held out"
        used += f", plus {m.get('general_examples', 0)} general answers against forgetting)"
    if ids:
        used += f"\n*Lineage:* {shown}"
    if m.get("preference_pairs"):
        used += (
            f"\n*Preference pairs recorded:* {m['preference_pairs']} (kept for preference "
            "training; this cycle trains on the corrected answers only)"
        )
    blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _clip(used)}})

    if "recall" in m:
        compared = m.get("compared_with") or "the base model"
        rows = [
            f"*Before → after* (compared with {compared})",
            f"• fact recall, all expert answers: {_pct(m.get('recall_before'))} → "
            f"{_pct(m.get('recall'))}",
            f"• fact recall, trained: {_pct(m.get('recall_train_before'))} → "
            f"{_pct(m.get('recall_train'))}",
        ]
        if m.get("held_out_examples"):
            rows.append(
                f"• fact recall, held out: {_pct(m.get('recall_held_out_before'))} → "
                f"{_pct(m.get('recall_held_out'))}"
            )
            rows.append(
                f"• held-out loss: {_loss(m.get('eval_loss_base'))} → {_loss(m.get('eval_loss'))}"
            )
        rows.append(
            f"• regression (general questions): {_pct(m.get('regression_before'))} → "
            f"{_pct(m.get('regression'))}"
            + (
                f" (forgot: {'; '.join(m['regression_lost'][:5])})"
                if m.get("regression_lost")
                else ""
            )
        )
        rows.append(
            f"• {m.get('steps')} steps in {m.get('train_seconds', 0):.0f} s"
            + (" (stopped early)" if m.get("stopped_early") else "")
            + (f", cycle {m['total_seconds']:.0f} s" if m.get("total_seconds") else "")
        )
        blocks.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": _clip("\n".join(rows))}}
        )

    reasons = outcome.reasons
    if reasons:
        why = "*Why:*\n" + "\n".join(f"• {reason}" for reason in reasons)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _clip(why)}})
    if outcome.state in (RunState.FAILED, RunState.SKIPPED) and outcome.error:
        first = outcome.error.splitlines()[0]
        blocks.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": _clip(f"*Why:* {first}")}}
        )
    hint = (
        "`/apprentice rollback` restores the previous version at once."
        if outcome.state == RunState.PROMOTED
        else f"`apprentice adapters promote {outcome.version}` would activate it anyway."
        if outcome.state == RunState.REFUSED and outcome.version
        else "`/apprentice train` starts another cycle."
    )
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": hint}]})
    return headline, blocks


def post_report(*, settings, outcome, client=None) -> PostedReport | None:
    """Post the report (and the loss curve) to the admin channel; None when not configured."""
    channel = (settings.admin_channel or "").strip()
    if not channel or not settings.slack_bot_token:
        return None
    if client is None:
        from slack_sdk import WebClient

        client = WebClient(token=settings.slack_bot_token, base_url=settings.slack_api_base)
    text, blocks = format_report(outcome)
    posted = client.chat_postMessage(channel=channel, text=text, blocks=blocks)
    file_id = None
    picture = Path(outcome.adapter_dir) / "loss.png" if outcome.adapter_dir else None
    if picture is not None and picture.is_file():
        uploaded = client.files_upload_v2(
            channel=posted["channel"],
            thread_ts=posted["ts"],
            file=str(picture),
            filename=f"loss-{outcome.version}.png",
            title=f"Loss curve of {outcome.version} (run #{outcome.run_id})",
        )
        files = uploaded.get("files") or [uploaded.get("file") or {}]
        file_id = files[0].get("id") if files else None
    return PostedReport(channel=posted["channel"], ts=posted["ts"], file_id=file_id)
