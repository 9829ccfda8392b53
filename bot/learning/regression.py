"""The regression set: general questions the base model answers right, to catch forgetting.

A LoRA adapter that learns a team's facts can overwrite what the small base model knew (a probe
on SmolLM2-135M ended with "The days in a week are 5"). `regression.jsonl` beside this module
holds general-knowledge questions with the keywords a right answer contains, in two roles:

- `gate`: the gate asks the candidate and the active version these; a candidate that drops
  more than one of them is refused (`bot.learning.pipeline`). Never trained on, so the score
  measures forgetting rather than memory.
- `mix`: the base model's own answers to these are mixed into every training set (the trainer's
  `general_mix`), so training keeps pulling the model toward its old behaviour.

`general_mix.jsonl` adds a larger replay bank (counts, capitals, science, people, words; none
of them a gate question), also with keywords. Targets are the base model's own greedy answers,
cut after the sentence with the fact, and only the ones its keywords confirm: self-distilling
the wrong ones spread them (measured: "How many hours are in a day? -> A day is a day" became
the answer to "How many days are in a week?"). SmolLM2-135M gets 29 of the 64 bank questions
right. The answers depend on the base model and the prompt, so `replay_examples` caches them
per model and prompt in the model cache folder and asks the base only what is not cached.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from bot.learning.evaluate import has_keyword
from bot.learning.examples import Example

REGRESSION_FILE = Path(__file__).with_name("regression.jsonl")
GENERAL_FILE = Path(__file__).with_name("general_mix.jsonl")


@dataclass(frozen=True)
class RegressionItem:
    question: str
    keywords: tuple[str, ...]  # any one of them, as whole words, makes the answer right
    role: str  # "gate" | "mix"

    def is_right(self, answer: str) -> bool:
        return has_keyword(answer, self.keywords)


@cache
def load_regression_set(path: Path = REGRESSION_FILE) -> tuple[RegressionItem, ...]:
    items = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            items.append(
                RegressionItem(
                    row["question"], tuple(row.get("keywords", ())), row.get("role", "mix")
                )
            )
    return tuple(items)


def gate_items() -> tuple[RegressionItem, ...]:
    return tuple(item for item in load_regression_set() if item.role == "gate")


def mix_items() -> tuple[RegressionItem, ...]:
    """The replay questions in the order they are used: the keyword-checked ones of
    `regression.jsonl` first, then the bank of `general_mix.jsonl` (no keywords)."""
    regression = tuple(item for item in load_regression_set() if item.role == "mix")
    return regression + load_regression_set(GENERAL_FILE)


def regression_score(
    answers: Sequence[str], items: Sequence[RegressionItem] | None = None
) -> float:
    """Share of `answers` (in the order of `items`, default the gate items) that are right."""
    items = gate_items() if items is None else tuple(items)
    if len(answers) != len(items):
        raise ValueError(f"expected {len(items)} answers, got {len(answers)}")
    if not items:
        return 1.0
    return sum(item.is_right(answer) for item, answer in zip(items, answers, strict=True)) / len(
        items
    )


def first_sentences(answer: str, keywords: Sequence[str]) -> str:
    """`answer` up to the end of the sentence that holds a keyword: a clean training target
    (small models ramble on after the fact, and the rambling is often wrong)."""
    for match in re.finditer(r"[.!?](?=\s|$)", answer):
        head = answer[: match.end()]
        if has_keyword(head, keywords):
            return head.strip()
    return answer.strip()


def first_sentence(answer: str) -> str:
    """`answer` up to its first sentence end (all of it when it has none)."""
    match = re.search(r"[.!?](?=\s|$)", answer)
    return (answer[: match.end()] if match else answer).strip()


def general_examples(
    answers: Sequence[str], items: Sequence[RegressionItem] | None = None, *, limit: int
) -> list[Example]:
    """Training examples from the base model's own `answers` to the mix questions.

    An item with keywords is kept only when answered right (cut after the sentence with the
    fact); one without keywords (a bank another deployment may add) keeps the answer's first
    sentence, whatever it says. At most `limit`.
    """
    items = mix_items() if items is None else tuple(items)
    kept = []
    for item, answer in zip(items, answers, strict=True):
        if len(kept) >= limit:
            break
        if item.keywords:
            target = first_sentences(answer, item.keywords) if item.is_right(answer) else ""
        else:
            target = first_sentence(answer)
        if target:
            kept.append(Example(item.question, target, id=f"general:{len(kept)}"))
    return kept


def replay_cache_file(engine, cache_dir: Path) -> Path:
    """Where the base answers for `engine`'s model and prompt settings are cached."""
    key = json.dumps(
        [
            engine.loaded.name,
            engine.system_prompt,
            engine.max_input_tokens,
            engine.max_new_tokens,
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    safe = re.sub(r"[^\w.-]+", "_", str(engine.loaded.name))[-60:]
    return Path(cache_dir) / "replay-answers" / f"{safe}-{digest}.json"


def base_answers(engine, questions: Sequence[str], *, cache_dir: Path) -> list[str]:
    """The answers of the model serving in `engine` (no adapter set) to `questions`, from the
    cache file where there, generating (batched) and saving only the missing ones."""
    from bot.learning.evaluate import answer_all

    path = replay_cache_file(engine, cache_dir)
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    missing = list(dict.fromkeys(q for q in questions if q not in cached))
    if missing:
        cached.update(zip(missing, answer_all(engine, missing), strict=True))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cached, indent=1, ensure_ascii=False), encoding="utf-8")
            tmp.replace(path)
        except OSError:
            pass  # a cache it cannot write costs time next run, nothing else
    return [cached[q] for q in questions]


def replay_examples(engine, *, limit: int, cache_dir: Path) -> list[Example]:
    """Up to `limit` general examples from the base model serving in `engine` (no adapter set).

    Questions are taken in `mix_items()` order; answers come from the cache file when there, and
    only missing ones are generated (batched), then saved. Generating costs ~0.5 s a question on
    2 CPU cores, so a first run pays once per model and prompt.
    """
    if limit <= 0:
        return []
    items = mix_items()
    position, kept = 0, []
    while len(kept) < limit and position < len(items):
        # ask for just enough: a keyword item the base gets wrong is dropped, so top up
        chunk = items[position : position + limit - len(kept)]
        position += len(chunk)
        answers = base_answers(engine, [item.question for item in chunk], cache_dir=cache_dir)
        kept += general_examples(answers, chunk, limit=limit - len(kept))
    return [Example(e.question, e.answer, id=f"general:{n}") for n, e in enumerate(kept)]


def anchor_examples(engine, *, limit: int, cache_dir: Path) -> list[Example]:
    """The base model's own whole answers to the first `limit` replay questions, right or
    wrong: the anchor term keeps the adapter's distribution near the base model's there
    (`bot.learning.trainer.AnchoredSFTTrainer`), it teaches nothing."""
    if limit <= 0:
        return []
    items = mix_items()[:limit]
    answers = base_answers(engine, [item.question for item in items], cache_dir=cache_dir)
    return [
        Example(item.question, answer.strip(), id=f"anchor:{n}")
        for n, (item, answer) in enumerate(zip(items, answers, strict=True))
        if answer.strip()
    ]
