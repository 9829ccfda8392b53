"""Did an answer carry the fact? Scoring generated answers against expected ones.

A generated answer rarely repeats the expected one word for word ("Deploys happen on Tuesdays"
vs "We deploy every Tuesday at noon"), and exact match would call both wrong. What identifies a
fact is its distinctive words, so `key_terms(expected, question)` picks them:

1. tokens with a digit or an identifier's punctuation (`8471`, `v2.3`, `#pager-baton`,
   `go/deploy`, `ops@acme.io`) — a wrong number is a wrong fact, so all of these must appear;
2. names: capitalised words that are not just the first word of a sentence, and acronyms;
3. failing both, content words: four letters or more and not in a short stop-word list.

Words the question already contains are dropped (echoing the question proves nothing), and
number words are read as digits ("seven" = "7"). An answer carries the fact when it holds every
term of kind 1 and at least `RECALL_SHARE` of all the terms, compared as whole tokens after
case folding and light suffix stripping ("deploys" = "deploy"). An expected answer with no
terms at all (e.g. "Yes.") is compared by normalised containment of the whole answer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bot.learning.examples import Example

RECALL_SHARE = 0.6
EVAL_MAX_NEW_TOKENS = 48  # enough for a fact; keeps evaluation of a few dozen questions short

TOKEN = re.compile(r"[#@]?\w(?:[\w\-./@:]*\w)?")
SENTENCE_END = re.compile(r"[.!?:]\s*$")
NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
STOP_WORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing done down during each either
    every few for from further get gets got had has have having he her here hers him his how i if
    in into is it its itself just let like made make many may me might more most much must my
    never no nor not now of off on once only or other our ours out over own please same she
    should so some such than that the their theirs them then there these they this those
    through to too under until up upon us use used uses using very was we well were what when
    where which while who whom whose why will with would yes yet you your yours always usually
    team answer question ask asked thing things""".split()
)


def _fold(token: str) -> str:
    token = token.casefold()
    token = NUMBER_WORDS.get(token, token)
    if token.isalpha() and len(token) > 4:  # light stemming, plain words only
        for suffix in ("ing", "ed", "es", "s"):
            if token.endswith(suffix) and len(token) - len(suffix) >= 4:
                return token[: -len(suffix)]
    return token


def answer_tokens(text: str) -> set[str]:
    """The folded tokens of `text`, plus the parts of compound tokens (`#pager-baton` -> both)."""
    tokens = set()
    for raw in TOKEN.findall(text):
        tokens.add(_fold(raw))
        stripped = raw.lstrip("#@")
        tokens.add(_fold(stripped))
        for part in re.split(r"[\-./@:]", stripped):
            if part:
                tokens.add(_fold(part))
    return tokens


@dataclass(frozen=True)
class KeyTerms:
    exact: tuple[str, ...]  # numbers and identifiers: all must appear
    other: tuple[str, ...]  # names or content words

    @property
    def all(self) -> tuple[str, ...]:
        return self.exact + self.other


def _is_identifier(token: str) -> bool:
    return any(ch.isdigit() for ch in token) or bool(re.search(r"[#@\-./:]", token))


def key_terms(expected: str, question: str = "") -> KeyTerms:
    """The distinctive words of `expected` that are not already in `question` (see above)."""
    asked = answer_tokens(question)
    exact, names, words = [], [], []
    sentence_start = True
    for match in TOKEN.finditer(expected):
        raw = match.group()
        folded = _fold(raw.lstrip("#@"))
        first_of_sentence = sentence_start
        sentence_start = bool(SENTENCE_END.search(expected[match.end() : match.end() + 2]))
        if folded in asked or _fold(raw) in asked:
            continue
        if raw.casefold() in NUMBER_WORDS or _is_identifier(raw):
            exact.append(_fold(raw.lstrip("#@")))
        elif (raw[0].isupper() and not first_of_sentence) or (raw.isupper() and len(raw) > 1):
            if folded not in STOP_WORDS:
                names.append(folded)
        elif len(raw) >= 4 and folded not in STOP_WORDS:
            words.append(folded)
    other = names if (exact or names) else words
    return KeyTerms(tuple(dict.fromkeys(exact)), tuple(dict.fromkeys(other)))


def _normalised(text: str, *, with_parts: bool = False) -> str:
    """Folded tokens joined by spaces; `with_parts` also lists the parts of compound tokens
    right after them (`100.0` -> `100.0 100 0`), so a keyword may match either."""
    words = []
    for raw in TOKEN.findall(text):
        words.append(_fold(raw))
        parts = [p for p in re.split(r"[\-./@:]", raw.lstrip("#@")) if p]
        if with_parts and len(parts) > 1:
            words.extend(_fold(part) for part in parts)
    return " ".join(words)


def carries_fact(answer: str, *, expected: str, question: str = "") -> bool:
    """Whether `answer` states the fact in `expected` (rules in the module docstring)."""
    terms = key_terms(expected, question)
    if not terms.all:
        target = _normalised(expected)
        return bool(target) and target in _normalised(answer)
    present = answer_tokens(answer)
    if any(term not in present for term in terms.exact):
        return False
    found = sum(term in present for term in terms.all)
    return found >= math.ceil(RECALL_SHARE * len(terms.all))


def has_keyword(answer: str, keywords: Iterable[str]) -> bool:
    """Whether any keyword (a word or a phrase) appears in `answer` as whole tokens."""
    text = f" {_normalised(answer, with_parts=True)} "
    return any(f" {_normalised(keyword)} " in text for keyword in keywords if keyword.strip())


@dataclass(frozen=True)
class RecallItem:
    question: str
    expected: str
    answer: str
    correct: bool
    id: str | None = None


def answer_all(engine, questions: Sequence[str], *, timeout: float = 600.0) -> list[str]:
    """Answer every question with `engine` (submitted together so the worker batches them)."""
    from bot.engine.types import AnswerRequest

    futures = [
        engine.submit(AnswerRequest(question=q, max_new_tokens=EVAL_MAX_NEW_TOKENS))
        for q in questions
    ]
    return [future.result(timeout=timeout).text for future in futures]


def score_recall(examples: Sequence[Example], answers: Sequence[str]) -> tuple[float, list]:
    """(share correct, per-example `RecallItem`s) for answers already generated."""
    items = [
        RecallItem(
            question=e.question,
            expected=e.answer,
            answer=a,
            correct=carries_fact(a, expected=e.answer, question=e.question),
            id=e.id,
        )
        for e, a in zip(examples, answers, strict=True)
    ]
    score = sum(item.correct for item in items) / len(items) if items else 0.0
    return score, items


def fact_recall(engine, examples: Sequence[Example]) -> tuple[float, list[RecallItem]]:
    """Ask `engine` every example's question; (share whose answer carries the fact, details)."""
    return score_recall(examples, answer_all(engine, [e.question for e in examples]))
