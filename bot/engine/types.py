"""What goes into the answer engine and what comes out: plain data, no torch.

The Slack side imports only this module of the engine package, so listeners never pull in torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


class EngineError(RuntimeError):
    """A request the engine could not answer; the message says what to do."""


class EngineTimeout(EngineError):
    """The caller's wait ran out; the request may still finish later."""


class EngineStopped(EngineError):
    """The engine is shutting down and takes no more work."""


@dataclass(frozen=True)
class Turn:
    """One earlier message in a conversation (a Slack thread), oldest first."""

    role: str  # "user" | "assistant"
    text: str


@dataclass(frozen=True)
class Note:
    """A piece of team knowledge put into the prompt (a retrieved approved answer)."""

    question: str
    answer: str
    source: str = ""  # free text for citations, e.g. "corrected by @alice on 2026-11-20"


@dataclass(frozen=True)
class AnswerRequest:
    question: str
    history: tuple[Turn, ...] = ()
    notes: tuple[Note, ...] = ()
    max_new_tokens: int | None = None  # None: the engine's default


# Called from the engine worker with the text so far; must be quick and never raise into it.
PartialCallback = Callable[[str], None]


@dataclass(frozen=True)
class Timings:
    queued_s: float  # waiting for the worker
    prompt_s: float  # prefill
    generate_s: float  # decode
    total_s: float
    new_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.generate_s if self.generate_s > 0 else 0.0


@dataclass(frozen=True)
class AnswerResult:
    text: str
    adapter_version: str | None  # None = the base model alone
    timings: Timings
    truncated_input: bool = False  # the question/context was cut to fit the prompt budget
    notes_used: tuple[Note, ...] = field(default_factory=tuple)
