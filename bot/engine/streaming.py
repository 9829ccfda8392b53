"""Streaming a batch: one `generate` call, one partial-text callback per request in it.

transformers' own `TextStreamer` refuses batches. `generate` calls `put(prompt_ids)` once and
then `put(next_tokens)`, shape (batch,), after every decoding step, so one streamer can follow
every row: it keeps each row's new tokens, stops a row at its first stop token (eos, ChatML
`<|im_end|>`) or at its own token limit (rows that finished get padding afterwards), and
hands the decoded text so far to that row's callback.

Callbacks run on the engine worker thread between decoding steps: they must be quick. One that
raises is logged once and not called again; it never breaks the batch. Text that ends in half a
UTF-8 character (byte-level tokens) is held back, so every partial is a prefix of the final text,
and the last call always carries exactly the final text.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from transformers.generation.streamers import BaseStreamer

from bot.engine.types import PartialCallback

log = logging.getLogger(__name__)


def answer_ids(ids: Sequence[int], *, stop_ids: frozenset[int], limit: int) -> list[int]:
    """The answer's tokens: up to (not including) the first stop token, at most `limit`."""
    kept = []
    for token in ids[:limit]:
        if token in stop_ids:
            break
        kept.append(token)
    return kept


def decode_answer(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


class BatchStreamer(BaseStreamer):
    """Follows every row of a batched greedy `generate`, calling each row's `on_partial`."""

    def __init__(
        self,
        *,
        tokenizer,
        callbacks: Sequence[PartialCallback | None],
        stop_ids: frozenset[int],
        limits: Sequence[int],
    ):
        self.tokenizer = tokenizer
        self.callbacks = list(callbacks)
        self.stop_ids = stop_ids
        self.limits = list(limits)
        self.ids: list[list[int]] = [[] for _ in self.callbacks]
        self.done = [False] * len(self.callbacks)
        self.sent = [""] * len(self.callbacks)
        self.first_token_at: float | None = None  # end of prefill, for the timings
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # the first call carries the (padded) prompts
            self._prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if token in self.stop_ids:
                self.done[row] = True
                continue
            self.ids[row].append(token)
            if len(self.ids[row]) >= self.limits[row]:
                self.done[row] = True
            if self.callbacks[row] is not None:
                text = decode_answer(self.tokenizer, self.ids[row])
                if text and not text.endswith("\ufffd"):
                    self._send(row, text)

    def end(self) -> None:
        pass

    def finish(self, row: int, final_text: str) -> None:
        """Make sure the last partial a caller saw is the final text."""
        if self.callbacks[row] is not None:
            self._send(row, final_text)

    def _send(self, row: int, text: str) -> None:
        if text == self.sent[row]:
            return
        self.sent[row] = text
        try:
            self.callbacks[row](text)
        except Exception:
            log.exception("an on_partial callback failed; it gets no more partial answers")
            self.callbacks[row] = None
