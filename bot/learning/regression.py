"""The regression set: general questions the base model answers right, to catch forgetting.

A LoRA adapter that learns a team's facts can overwrite what the small base model knew (a probe
on SmolLM2-135M ended with "The days in a week are 5"). `regression.jsonl` beside this module
holds general-knowledge questions with the keywords a right answer contains, in two roles:

- `gate`: the gate asks the candidate and the active version these; a candidate that drops
  more than one of them is refused (`bot.learning.pipeline`). Never trained on, so the score
  measures forgetting rather than memory.
- `mix`: the base model's own answers to these are mixed into every training set (the trainer's
  `general_mix`), so training keeps pulling the model toward its old behaviour.

Every question was checked against the packaged SmolLM2-135M-Instruct with the default system
prompt, greedy decoding: it answers all 32 right (8 more candidates it got wrong were dropped).
Another base model may miss some; the gate compares versions of the same base, so a question it
never knew costs both sides alike.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from bot.learning.evaluate import has_keyword
from bot.learning.examples import Example

REGRESSION_FILE = Path(__file__).with_name("regression.jsonl")


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
            items.append(RegressionItem(row["question"], tuple(row["keywords"]), row["role"]))
    return tuple(items)


def gate_items() -> tuple[RegressionItem, ...]:
    return tuple(item for item in load_regression_set() if item.role == "gate")


def mix_items() -> tuple[RegressionItem, ...]:
    return tuple(item for item in load_regression_set() if item.role == "mix")


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


def general_examples(
    answers: Sequence[str], items: Sequence[RegressionItem] | None = None, *, limit: int
) -> list[Example]:
    """Training examples from the base model's own `answers` to the mix questions.

    Only right answers are kept (cut after the sentence with the fact), at most `limit`.
    """
    items = mix_items() if items is None else tuple(items)
    kept = []
    for item, answer in zip(items, answers, strict=True):
        if len(kept) >= limit:
            break
        if item.is_right(answer):
            kept.append(
                Example(
                    item.question, first_sentences(answer, item.keywords), id=f"general:{len(kept)}"
                )
            )
    return kept
