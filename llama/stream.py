"""Incremental detokenization: turn one row's growing token list into text deltas that are safe to show.

SentencePiece decodes a prefix of a token list to a prefix of the full text, with one exception: a
byte-fallback piece (<0xE6>, ...) that ends part-way through a multi-byte UTF-8 character decodes to U+FFFD
until the rest of the character arrives. So each step decodes the whole row (which also gets the leading "▁"
right, exactly as the final decode does) and shows only the new text, holding back:

- trailing U+FFFD characters, which may still become a real character;
- a tail that could be the beginning of a stop string, until it is clear that it is not.
"""

from __future__ import annotations

from typing import Optional, Sequence

from llama.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


def check_stop(stop: Optional[Sequence[str]]) -> list[str]:
    """The stop strings as a list, with a clear error for anything but a list of non-empty str."""
    if stop is None:
        return []
    if isinstance(stop, str) or not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise TypeError(f"stop must be a list of str or None, got {stop!r} (wrap a single stop string in a list)")
    if any(s == "" for s in stop):
        raise ValueError("stop strings must not be empty")
    return list(stop)


class TextStream:
    """The text of one row's generated tokens, fed one token at a time, with stop-string detection."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.tokens: list[int] = []
        self.text = ""
        self.stop_at: Optional[int] = None  # index in text where the first stop string begins
        self.shown = 0  # characters of text already handed out by delta()

    @property
    def stopped(self) -> bool:
        return self.stop_at is not None

    def add(self, token: int) -> None:
        """Append a generated token (not EOS); once a stop string appears, further tokens are ignored."""
        if self.stopped:
            return
        previous = len(self.text)
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens)
        if self.stop:
            # A new match can only end in the new text, so it starts at most len(stop) - 1 characters earlier.
            begin = max(0, previous - max(len(s) for s in self.stop) + 1)
            hits = [i for i in (self.text.find(s, begin) for s in self.stop) if i >= 0]
            if hits:
                self.stop_at = min(hits)

    def final_text(self) -> str:
        """The whole generation, cut right before the first stop string."""
        return self.text if self.stop_at is None else self.text[: self.stop_at]

    def delta(self, final: bool = False) -> str:
        """Text not handed out yet that can no longer change; with final=True, all that remains."""
        end = len(self.text) if self.stop_at is None else self.stop_at
        if not final and not self.stopped:
            while end > self.shown and self.text[end - 1] == REPLACEMENT_CHAR:
                end -= 1
            end = self._before_possible_stop(end)
        piece = self.text[self.shown : end]
        self.shown = max(self.shown, end)
        return piece

    def _before_possible_stop(self, end: int) -> int:
        """Where the longest tail of text[:end] that is a proper prefix of a stop string begins (else end)."""
        for start in range(max(self.shown, end - max((len(s) for s in self.stop), default=0) + 1), end):
            tail = self.text[start:end]
            if any(s.startswith(tail) for s in self.stop):
                return start
        return end

    def n_tokens_for_text(self) -> int:
        """How many tokens it takes to cover final_text(): the tokens and logprobs returned with it."""
        if not self.stopped:
            return len(self.tokens)
        target = self.final_text()
        for k in range(len(self.tokens) + 1):
            if len(self.tokenizer.decode(self.tokens[:k]).rstrip(REPLACEMENT_CHAR)) >= len(target):
                return k
        return len(self.tokens)
