"""The training set: what the experts' verdicts in the store teach, scrubbed and deduplicated.

The rules, each for a reason:
- An answer's fate is its LATEST non-withdrawn expert verdict, across experts: approve makes it
  an example, correct makes the correction an example (and a preference pair, chosen =
  correction, rejected = the original), reject keeps it out. A later expert overrules an earlier
  one; a withdrawn verdict never happened.
- The same question asked again (text compared after normalising: case, spacing, mentions,
  trailing punctuation) is ONE example: the latest expert verdict about any of its answers
  wins. If that is a rejection, the question teaches nothing this time — an older approval
  may be what the expert just found stale, and training on a stale fact is worse than missing
  one.
- 👍/👎 are soft signals from anyone: counted per answer (each person's latest), never examples.
- Privacy: only verdicts on questions asked in public channels (`channel_type == "channel"`)
  count, unless the channel opted in (`ChannelSetting.train_opt_in`) — private channels
  ("group"), DMs ("im", "mpim") and questions of unknown type stay out by default.
- Everything returned is scrubbed (`bot.learning.scrub`): an adapter memorises its data.
- `now` fixes the snapshot: verdicts and withdrawals after it are not seen, so a set can be
  rebuilt exactly as a cycle saw it.

The split into train / held-out is by a stable hash of the normalised question (see
`bot.learning.examples.split_examples`), so an example never changes side as data grows.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import or_
from sqlmodel import Session, col, func, select

from bot.learning.examples import Example, dataset_hash, split_examples
from bot.learning.scrub import scrub
from bot.settings import Settings
from bot.store.models import Answer, ChannelSetting, Question, Verdict, VerdictKind, utcnow
from bot.store.question_keys import normalise_question

EXPERT_KINDS = (VerdictKind.APPROVE.value, VerdictKind.CORRECT.value, VerdictKind.REJECT.value)
SIGNAL_KINDS = (VerdictKind.UP.value, VerdictKind.DOWN.value)
PUBLIC_CHANNEL = "channel"
DEFAULT_SPLIT_SEED = 1234  # TrainingConfig.seed's default: export and training agree

# Reasons an answer with expert verdicts is not an example (keys of TrainingSet.excluded).
PRIVATE = "private"  # asked in a private channel / DM that did not opt in
WITHDRAWN = "withdrawn"  # every expert verdict on it was withdrawn
REJECTED = "rejected"  # its latest expert verdict is a rejection
SUPERSEDED = "superseded"  # a later verdict on the same question won
EMPTY = "empty"  # nothing left to learn after scrubbing (empty question or answer)


@dataclass(frozen=True)
class PreferencePair:
    """A correction as a preference: for `prompt`, the expert's text beats the bot's."""

    prompt: str
    chosen: str
    rejected: str
    id: str


@dataclass(frozen=True)
class Signal:
    """👍/👎 counts on one answer, each person's latest counted once."""

    up: int = 0
    down: int = 0


@dataclass
class TrainingSet:
    examples: list[Example]
    preference_pairs: list[PreferencePair]
    signals: dict[str, Signal]  # "answer:<id>" -> counts, for every answer anyone thumbed
    excluded: dict[str, int] = field(default_factory=dict)  # reason -> answers left out
    built_at: datetime | None = None

    @property
    def example_ids(self) -> list[str]:
        """The lineage: which answers (`answer:<id>`) the examples came from, in order."""
        return [example.key for example in self.examples]

    @property
    def dataset_hash(self) -> str:
        return dataset_hash(self.examples)


@dataclass(frozen=True)
class DatasetSplit:
    train: list[Example]
    eval: list[Example]


# --- text --------------------------------------------------------------------------------

_MENTION = re.compile(r"<[@#!][^<>\s]*>")
_EDGE_PUNCTUATION = " \t\n.,;:!?¿¡…\"'`"


def clean_question(text: str) -> str:
    """The question as a person would read it: without the leading @bot mention(s)."""
    text = text.strip()
    while True:
        match = re.match(r"<@[A-Z0-9]+(?:\|[^>]*)?>[\s,:]*", text)
        if not match:
            return text
        text = text[match.end() :]


# --- building ----------------------------------------------------------------------------


def _allowed_channel(question: Question, opted_in: set[str]) -> bool:
    if question.channel_type == PUBLIC_CHANNEL:
        return True
    return question.channel_id is not None and question.channel_id in opted_in


def _visible_as_of(verdict: Verdict, now: datetime) -> bool:
    """Was this verdict standing at `now`: cast by then and not withdrawn by then?"""
    if verdict.created_at > now:
        return False
    return verdict.withdrawn_at is None or verdict.withdrawn_at > now


def _order(verdict: Verdict) -> tuple[datetime, int]:
    return (verdict.created_at, verdict.id or 0)


def build_training_set(
    *, session: Session, settings: Settings | None = None, now: datetime | None = None
) -> TrainingSet:
    """The examples, preference pairs and signals the store holds as of `now` (default: now).

    `settings` is accepted so the cycle can pass its settings to every builder alike; the rules
    above need only the store.
    """
    del settings
    now = now or utcnow()
    opted_in = set(
        session.exec(
            select(ChannelSetting.channel_id).where(col(ChannelSetting.train_opt_in).is_(True))
        ).all()
    )
    rows = session.exec(
        select(Verdict, Answer, Question)
        .join(Answer, col(Verdict.answer_id) == col(Answer.id))
        .join(Question, col(Answer.question_id) == col(Question.id))
        .where(col(Verdict.created_at) <= now)
        .order_by(col(Verdict.created_at), col(Verdict.id))
    ).all()

    answers: dict[int, tuple[Answer, Question]] = {}
    expert: dict[int, list[Verdict]] = {}  # answer id -> its expert verdicts, oldest first
    soft: dict[int, dict[str, Verdict]] = {}  # answer id -> author -> latest standing 👍/👎
    for verdict, answer, question in rows:
        answers[answer.id] = (answer, question)
        if verdict.kind in EXPERT_KINDS:
            expert.setdefault(answer.id, []).append(verdict)
        elif verdict.kind in SIGNAL_KINDS and _visible_as_of(verdict, now):
            soft.setdefault(answer.id, {})[verdict.author_id] = verdict

    excluded: Counter[str] = Counter()
    # normalised question -> (winning verdict, answer, scrubbed question) of each answer
    candidates: dict[str, list[tuple[Verdict, Answer, str]]] = {}
    for answer_id, verdicts in expert.items():
        answer, question = answers[answer_id]
        if not _allowed_channel(question, opted_in):
            excluded[PRIVATE] += 1
            continue
        standing = [v for v in verdicts if _visible_as_of(v, now)]
        if not standing:
            excluded[WITHDRAWN] += 1
            continue
        latest = max(standing, key=_order)
        prompt = scrub(clean_question(question.text)).strip()
        candidates.setdefault(normalise_question(prompt), []).append((latest, answer, prompt))

    examples: list[tuple[int, Example]] = []
    pairs: list[tuple[int, PreferencePair]] = []
    for key, entries in candidates.items():
        winner, answer, prompt = max(entries, key=lambda entry: _order(entry[0]))
        for verdict, _, _ in entries:
            if verdict is winner:
                continue
            excluded[REJECTED if verdict.kind == VerdictKind.REJECT else SUPERSEDED] += 1
        if winner.kind == VerdictKind.REJECT:
            excluded[REJECTED] += 1
            continue
        original = scrub(answer.text).strip()
        corrected = winner.kind == VerdictKind.CORRECT
        target = scrub(winner.text or "").strip() if corrected else original
        if not key or not target:
            excluded[EMPTY] += 1
            continue
        ident = f"answer:{answer.id}"
        examples.append((answer.id, Example(question=prompt, answer=target, id=ident)))
        if corrected and original and original != target:
            pairs.append((answer.id, PreferencePair(prompt, target, original, ident)))

    signals = {
        f"answer:{answer_id}": Signal(
            up=sum(v.kind == VerdictKind.UP for v in by_author.values()),
            down=sum(v.kind == VerdictKind.DOWN for v in by_author.values()),
        )
        for answer_id, by_author in sorted(soft.items())
        if _allowed_channel(answers[answer_id][1], opted_in)
    }
    return TrainingSet(
        examples=[example for _, example in sorted(examples, key=lambda item: item[0])],
        preference_pairs=[pair for _, pair in sorted(pairs, key=lambda item: item[0])],
        signals={k: v for k, v in signals.items() if v.up or v.down},
        excluded=dict(sorted(excluded.items())),
        built_at=now,
    )


def count_new_expert_verdicts(*, session: Session, since: datetime | None) -> int:
    """Standing expert verdicts cast after `since` (all when None) that training may use.

    The scheduler's threshold: the same privacy rule as `build_training_set`, so verdicts in a
    private channel that did not opt in never start a cycle that could not use them.
    """
    query = (
        select(func.count())
        .select_from(Verdict)
        .join(Answer, col(Verdict.answer_id) == col(Answer.id))
        .join(Question, col(Answer.question_id) == col(Question.id))
        .outerjoin(ChannelSetting, col(ChannelSetting.channel_id) == col(Question.channel_id))
        .where(
            col(Verdict.kind).in_(EXPERT_KINDS),
            col(Verdict.withdrawn_at).is_(None),
            or_(
                col(Question.channel_type) == PUBLIC_CHANNEL,
                col(ChannelSetting.train_opt_in).is_(True),
            ),
        )
    )
    if since is not None:
        query = query.where(col(Verdict.created_at) > since)
    return int(session.exec(query).one())


# --- splitting and export ----------------------------------------------------------------


def split(
    training_set: TrainingSet,
    *,
    eval_fraction: float = 0.2,
    seed: int = DEFAULT_SPLIT_SEED,
    min_eval_examples: int = 5,
) -> DatasetSplit:
    """Train / held-out by a seeded hash of each normalised question, not by order or time.

    With at least `min_eval_examples` examples at least one is held out; below it, none.
    """
    train, held_out = split_examples(
        training_set.examples,
        eval_fraction=eval_fraction,
        seed=seed,
        min_eval_examples=min_eval_examples,
    )
    return DatasetSplit(train=train, eval=held_out)


def to_chat_jsonl(examples: Iterable[Example]) -> Iterator[str]:
    """One JSON line (no newline) per example, in the chat format trainers read."""
    for example in examples:
        yield json.dumps(
            {
                "messages": [
                    {"role": "user", "content": example.question},
                    {"role": "assistant", "content": example.answer},
                ],
                "id": example.key,
            },
            ensure_ascii=False,
        )
