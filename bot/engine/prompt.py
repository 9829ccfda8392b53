"""Prompt building: an `AnswerRequest` becomes chat messages, then token ids within a budget.

Pure functions, no model: they take the tokenizer and give ids, so they are tested without
generating anything. The chat template is the tokenizer's own (`apply_chat_template` with
`add_generation_prompt=True`), so any instruct model formats its prompt the way it was trained.

Team notes (retrieved approved answers) go into the system message, under "Team notes", because
the system prompt already tells the model to prefer them; earlier turns of the Slack thread go in
as real chat turns; the question is the last user turn.

Over budget, we give up what matters least first: the oldest history turns, then the notes (the
last one first: retrieval ranks the best first), and only then the question itself. A long
question keeps its head and its tail (pasted logs often end with the actual question) around a
visible note that says how much was kept, so neither the model nor a reader is misled. A
40,000-character paste never gets tokenized whole: we cut characters around the budget first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bot.engine.types import AnswerRequest, EngineError, Note, Turn

EMPTY_QUESTION = (
    "the question is empty: type a question after the mention or the command, "
    "e.g. `@Apprentice how do deploys work?` or `/ask how do deploys work?`"
)
ELLIPSIS = "\n…\n"
# A token covers at most this many characters in practice (long runs of spaces aside); windows
# this wide around the cut always hold enough tokens, and keep tokenizing a huge paste cheap.
MAX_CHARS_PER_TOKEN = 16
HEAD_SHARE = 2 / 3  # of the question's kept tokens, from its start; the rest from its end


@dataclass(frozen=True)
class EncodedPrompt:
    input_ids: list[int]
    truncated: bool  # something was dropped or cut to fit the budget
    notes_used: tuple[Note, ...] = ()
    history_used: int = 0  # how many of the newest history turns made it in


def check_question(question: str) -> str:
    """Return the question stripped; raise `EngineError` (with what to do) if nothing is left."""
    stripped = question.strip() if isinstance(question, str) else ""
    if not stripped:
        raise EngineError(EMPTY_QUESTION)
    return stripped


def render_notes(notes: Sequence[Note]) -> str:
    blocks = []
    for number, note in enumerate(notes, start=1):
        block = f"{number}. Q: {note.question.strip()}\n   A: {note.answer.strip()}"
        if note.source:
            block += f"\n   ({note.source.strip()})"
        blocks.append(block)
    return "Team notes (answers approved by the team's experts):\n" + "\n".join(blocks)


def build_messages(request: AnswerRequest, *, system_prompt: str) -> list[dict]:
    """Chat messages for `request`: system (+ team notes), the history turns, the question."""
    system = system_prompt.strip()
    if request.notes:
        system = (
            f"{system}\n\n{render_notes(request.notes)}" if system else render_notes(request.notes)
        )
    messages = [{"role": "system", "content": system}]
    for turn in request.history:
        role = "assistant" if turn.role == "assistant" else "user"
        messages.append({"role": role, "content": turn.text})
    messages.append({"role": "user", "content": request.question.strip()})
    return messages


def _template_ids(tokenizer, messages: list[dict]) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding, older versions a plain list
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids)


def truncation_note(*, kept: int, total: int) -> str:
    return f"[question truncated to fit: {kept} of {total} characters kept]"


def _cut_question(question: str, *, keep_tokens: int, tokenizer, with_note: bool) -> str:
    """Keep about `keep_tokens` tokens of `question`: its head and its tail, plus a visible note."""
    head_tokens = max(1, int(keep_tokens * HEAD_SHARE))
    tail_tokens = max(0, keep_tokens - head_tokens)
    window = keep_tokens * MAX_CHARS_PER_TOKEN
    head_window = question[:window]
    offsets = tokenizer(head_window, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    head_end = offsets[head_tokens - 1][1] if len(offsets) >= head_tokens else len(head_window)
    tail_start = len(question)
    if tail_tokens:
        tail_window_start = max(head_end, len(question) - tail_tokens * MAX_CHARS_PER_TOKEN)
        tail_window = question[tail_window_start:]
        offsets = tokenizer(tail_window, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        if len(offsets) >= tail_tokens:
            tail_start = tail_window_start + offsets[-tail_tokens][0]
        else:
            tail_start = tail_window_start
    tail_start = max(tail_start, head_end)
    head, tail = question[:head_end].rstrip(), question[tail_start:].lstrip()
    kept = len(head) + len(tail)
    body = f"{head}{ELLIPSIS}{tail}" if tail else f"{head} …"
    if not with_note:
        return body
    return f"{body}\n\n{truncation_note(kept=kept, total=len(question))}"


def encode_prompt(
    tokenizer,
    request: AnswerRequest,
    *,
    system_prompt: str,
    max_input_tokens: int,
) -> EncodedPrompt:
    """Token ids for `request` within `max_input_tokens`; never fails on length, only on emptiness.

    Raises `EngineError` for an empty question, or when the system prompt alone leaves no room.
    """
    question = check_question(request.question)

    def ids_for(history: Sequence[Turn], notes: Sequence[Note], text: str) -> list[int]:
        trimmed = AnswerRequest(question=text, history=tuple(history), notes=tuple(notes))
        return _template_ids(tokenizer, build_messages(trimmed, system_prompt=system_prompt))

    # A question too long on its own loses all context anyway: check it first, and cheaply.
    fits_alone = len(question) <= max_input_tokens * MAX_CHARS_PER_TOKEN and (
        len(ids_for((), (), question)) <= max_input_tokens
    )
    if fits_alone:
        history, notes = list(request.history), list(request.notes)
        while True:
            ids = ids_for(history, notes, question)
            if len(ids) <= max_input_tokens:
                truncated = len(history) < len(request.history) or len(notes) < len(request.notes)
                return EncodedPrompt(ids, truncated, tuple(notes), len(history))
            if history:
                history.pop(0)  # the oldest turn matters least
            else:
                notes.pop()  # the lowest-ranked note

    # Cut the question: measure what the rest of the prompt costs, then shrink until it fits.
    # The note about the cut goes too only when a tiny budget leaves no room for it.
    for with_note in (True, False):
        placeholder = _cut_placeholder(total=len(question), with_note=with_note)
        keep = max_input_tokens - len(ids_for((), (), placeholder))
        for _ in range(8):
            if keep < 1:
                break
            text = _cut_question(
                question, keep_tokens=keep, tokenizer=tokenizer, with_note=with_note
            )
            ids = ids_for((), (), text)
            excess = len(ids) - max_input_tokens
            if excess <= 0:
                return EncodedPrompt(ids, True, (), 0)
            keep -= excess  # tokens merge differently at the cut: shrink and retry
    raise EngineError(
        f"the system prompt leaves no room for a question within {max_input_tokens} tokens: "
        "shorten APPRENTICE_SYSTEM_PROMPT or raise APPRENTICE_MAX_INPUT_TOKENS"
    )


def _cut_placeholder(*, total: int, with_note: bool) -> str:
    """A stand-in for the cut question with no question text: the ellipsis and the note alone."""
    if not with_note:
        return ELLIPSIS
    return f"{ELLIPSIS}\n\n{truncation_note(kept=total, total=total)}"
