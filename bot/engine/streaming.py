"""Streaming an answer while it is decoded: each row of the batch has its own `RowStream`.

The decode loop (`bot.engine.decoding`) produces one token per row per step; the worker pushes
each into that row's stream. A stream stops its row at the first stop token (eos, ChatML
`<|im_end|>`) or at the row's own token limit, and hands the decoded text so far to the row's
`on_partial` callback.

Callbacks run on the engine worker thread between decoding steps: they must be quick. One that
raises is logged once and not called again; it never breaks the batch. Text that ends in half a
UTF-8 character (byte-level tokens) is held back, so every partial is a prefix of the final text,
and the last call always carries exactly the final text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

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


class RowStream:
    """One answer being decoded: its tokens so far, whether it is done, its partial callback."""

    def __init__(
        self,
        *,
        tokenizer,
        callback: PartialCallback | None,
        stop_ids: frozenset[int],
        limit: int,
    ):
        self.tokenizer = tokenizer
        self.callback = callback
        self.stop_ids = stop_ids
        self.limit = limit
        self.ids: list[int] = []
        self.done = False
        self.sent = ""

    def push(self, token: int) -> bool:
        """Take the row's next token; return True once the row is done."""
        if self.done:
            return True
        if token in self.stop_ids:
            self.done = True
            return True
        self.ids.append(token)
        if len(self.ids) >= self.limit:
            self.done = True
        if self.callback is not None:
            text = decode_answer(self.tokenizer, self.ids)
            if text and not text.endswith("\ufffd"):
                self._send(text)
        return self.done

    def text(self) -> str:
        return decode_answer(self.tokenizer, self.ids)

    def finish(self, final_text: str) -> None:
        """Make sure the last partial the caller saw is the final text."""
        if self.callback is not None:
            self._send(final_text)

    def _send(self, text: str) -> None:
        if text == self.sent:
            return
        self.sent = text
        try:
            self.callback(text)
        except Exception:
            log.exception("an on_partial callback failed; it gets no more partial answers")
            self.callback = None
