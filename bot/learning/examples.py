"""Training examples: a question and the answer the team wants, read from JSONL or built from
Slack verdicts by the learning cycle.

Everything here is pure. The split into train and held-out is decided per example by a stable
hash of its question (salted with the seed), not by list order: as the data grows from one
cycle to the next an example stays on its side, so a held-out fact never leaks into training
just because rows were added in front of it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """Training data that cannot be used; the message names the file, line and the fix."""


@dataclass(frozen=True)
class Example:
    question: str
    answer: str
    id: str | None = None  # e.g. "answer:42" for one built from a verdict; free text from JSONL

    @property
    def key(self) -> str:
        """A stable identity: the given id, else a hash of the normalised question."""
        if self.id:
            return str(self.id)
        digest = hashlib.sha256(_normalise(self.question).encode()).hexdigest()
        return f"q:{digest[:16]}"


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def load_examples_jsonl(path: Path | str) -> list[Example]:
    """Read `{"question": ..., "answer": ..., "id": optional}` objects, one a line.

    Blank lines and lines starting with `#` are skipped. Raises `DataError` saying which line is
    wrong and how to fix it.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file; pass a JSONL file with one example a line")
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass a JSONL file with one example a line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8 JSONL") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror}); check its permissions") from exc

    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); each line must be "
                'one object like {"question": "...", "answer": "..."}'
            ) from exc
        if not isinstance(row, dict):
            raise DataError(
                f'{where}: expected a JSON object like {{"question": "...", "answer": "..."}}, '
                f"got {type(row).__name__}"
            )
        values = {}
        for key in ("question", "answer"):
            value = row.get(key)
            if value is None:
                raise DataError(f'{where}: missing "{key}"; add "{key}": "..." to the object')
            if not isinstance(value, str) or not value.strip():
                raise DataError(f'{where}: "{key}" must be a non-empty string')
            values[key] = value.strip()
        ident = row.get("id")
        examples.append(
            Example(values["question"], values["answer"], None if ident is None else str(ident))
        )
    if not examples:
        raise DataError(
            f'{path}: no examples found; add lines like {{"question": "...", "answer": "..."}}'
        )
    return examples


def dataset_hash(examples: Iterable[Example]) -> str:
    """SHA-256 of the examples' content, independent of their order."""
    rows = sorted(
        json.dumps([_normalise(e.question), e.answer.strip()], ensure_ascii=False) for e in examples
    )
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def deduplicate(examples: Iterable[Example]) -> list[Example]:
    """Keep the last example of each normalised question (a later correction wins)."""
    by_question: dict[str, Example] = {}
    for example in examples:
        by_question.pop(_normalise(example.question), None)
        by_question[_normalise(example.question)] = example
    return list(by_question.values())


def _bucket(example: Example, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{_normalise(example.question)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_examples(
    examples: list[Example], *, eval_fraction: float, seed: int, min_eval_examples: int = 0
) -> tuple[list[Example], list[Example]]:
    """(train, held_out), decided per example by a seeded hash of its question.

    An example is held out when its hash bucket (uniform in [0, 1)) is below `eval_fraction`,
    so its side depends on its own question alone: list order and more data never move an
    example across the line (a trained example must never become an evaluation one). Two
    fallbacks for small sets: if no bucket falls below the line, the lowest one is held out
    (at least one, once there are `min_eval_examples`); if every one does, the highest trains.
    Below `min_eval_examples` examples nothing is held out.
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), not {eval_fraction}")
    if eval_fraction == 0 or len(examples) < max(2, min_eval_examples):
        return list(examples), []
    buckets = [_bucket(example, seed) for example in examples]
    held = {i for i, bucket in enumerate(buckets) if bucket < eval_fraction}
    if not held:
        held = {min(range(len(examples)), key=buckets.__getitem__)}
    elif len(held) == len(examples):
        held.discard(max(range(len(examples)), key=buckets.__getitem__))
    train = [e for i, e in enumerate(examples) if i not in held]
    held_out = [e for i, e in enumerate(examples) if i in held]
    return train, held_out
