"""Turning a stream of token ids into a stream of text: UTF-8 safe pieces, cut at stop sequences."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from exo._core import IncrementalDetokenizer, Tokenizer
from exo.settings import TOKENIZER_LOGGER

detail = logging.getLogger(TOKENIZER_LOGGER)


class TokenText:
    """Text of tokens as they arrive; never splits a UTF-8 character across two pieces.

    Uses the Rust `IncrementalDetokenizer` for Rust tokenizers; any other tokenizer (e.g. `DummyTokenizer`) is
    decoded in full at each step and the new suffix returned. With `VERBOSE=1` each token is logged with its own text
    and the text it completes.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._native = IncrementalDetokenizer(tokenizer) if isinstance(tokenizer, Tokenizer) else None
        self._tokenizer = tokenizer
        self._tokens: list[int] = []
        self._emitted = ""

    def push(self, token: int) -> str:
        """The text that `token` completes (possibly empty)."""
        piece = self._push(int(token))
        if detail.isEnabledFor(logging.DEBUG):
            detail.debug("token %d %r -> %r", token, self._tokenizer.decode([int(token)]), piece)
        return piece

    def _push(self, token: int) -> str:
        if self._native is not None:
            return self._native.push(token)
        self._tokens.append(token)
        text = self._tokenizer.decode(self._tokens)
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self._emitted) :] if text.startswith(self._emitted) else ""
        self._emitted = text
        return piece

    def finish(self) -> str:
        """Whatever text is still held back at the end of the stream."""
        if self._native is not None:
            return self._native.finish()
        text = self._tokenizer.decode(self._tokens) if self._tokens else ""
        piece = text[len(self._emitted) :] if text.startswith(self._emitted) else ""
        self._emitted = text
        return piece


class StopScanner:
    """Holds back just enough text to recognise stop sequences that span several pieces.

    `feed` returns the text safe to emit and whether a stop sequence was found (the stop text and everything after
    it are dropped).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self._stops:
            return piece, False
        self._pending += piece
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self._pending = self._pending[:cut], ""
            self.stopped = True
            return out, True
        keep = min(self._hold, len(self._pending))
        split = len(self._pending) - keep
        out, self._pending = self._pending[:split], self._pending[split:]
        return out, False

    def flush(self) -> str:
        """The held-back text at the end of the stream (when no stop sequence completed)."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


def count_tokens(tokenizer: Any, text: str) -> int:
    """How many tokens `text` (an already templated prompt) encodes to."""
    if isinstance(tokenizer, Tokenizer):
        return len(tokenizer.encode(text, add_special_tokens=False))
    return len(tokenizer.encode(text))


def eos_token_ids(tokenizer: Any) -> set[int]:
    """Every end-of-sequence token id the tokenizer declares."""
    ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
    single = getattr(tokenizer, "eos_token_id", None)
    if single is not None:
        ids.add(int(single))
    return ids
