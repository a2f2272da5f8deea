"""Incremental detokenization of a generated row, and of a chat answer.

``TextStream`` turns one row's growing token list into text deltas that are safe to show, and is the one place
that searches for stop strings (``llama.engine.ends.RowEnd`` asks it whether one has appeared). ``ChatStream``
turns those deltas into deltas of a chat answer's content and, at the end, the answer's message.

SentencePiece decodes a prefix of a token list to a prefix of the full text, with one exception: a
byte-fallback piece (<0xE6>, ...) that ends part-way through a multi-byte UTF-8 character decodes to U+FFFD
until the rest of the character arrives. So each step decodes the whole row (which also gets the leading "▁"
right, exactly as the final decode does) and shows only the new text, holding back:

- trailing U+FFFD characters, which may still become a real character;
- a tail that could be the beginning of a stop string, until it is clear that it is not.
"""

from __future__ import annotations

from typing import Generator, Iterator, Optional, Sequence

from llama.chat_format import ChatFormat, Message
from llama.tokenizer import TokenizerLike

REPLACEMENT_CHAR = "\ufffd"


class TextStream:
    """The text of one row's generated tokens, fed one token at a time, with stop-string detection.

    With `prefix` (the prompt, when it is echoed), the text is that of prefix + tokens, and stop strings are
    searched only in the part after the prefix's text.
    """

    def __init__(self, tokenizer: TokenizerLike, stop: Sequence[str] = (), prefix: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.prefix = list(prefix)
        self.tokens: list[int] = []
        self.text = tokenizer.decode(self.prefix) if self.prefix else ""
        self.floor = len(self.text)  # stop strings may begin here at the earliest
        self.stop_at: Optional[int] = None  # index in text where the first stop string begins
        self.stop_string: Optional[str] = None  # the stop string found there
        self.shown = self.floor  # characters of text already handed out by delta()

    @property
    def stopped(self) -> bool:
        return self.stop_at is not None

    def add(self, token: int) -> None:
        """Append a generated token (not EOS); once a stop string appears, further tokens are ignored."""
        if self.stopped:
            return
        previous = len(self.text)
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.prefix + self.tokens)
        if self.stop:
            # A new match can only end in the new text, so it starts at most len(stop) - 1 characters earlier.
            begin = max(self.floor, previous - max(len(s) for s in self.stop) + 1)
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, begin)) >= 0]
            if hits:  # the earliest; of several there, the first in the list
                self.stop_at, self.stop_string = min(hits, key=lambda hit: hit[0])

    def final_text(self) -> str:
        """The whole text (the prefix's included), cut right before the first stop string."""
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
            if len(self.tokenizer.decode(self.prefix + self.tokens[:k]).rstrip(REPLACEMENT_CHAR)) >= len(target):
                return k
        return len(self.tokens)


class ChatStream(Iterator[str]):
    """The assistant's answer to one dialog as it is generated (``Llama.chat_completion_stream``).

    Iterating yields str deltas of the answer's ``content``. Once they are exhausted, ``message`` holds the
    whole answer: the message that ``chat_completion`` returns as ``generation`` for the same arguments and seed
    (with Llama 3, its ``stop_reason`` and ``tool_calls``; only the random ``call_id`` differs). Before that,
    ``message`` is None. The deltas join to exactly ``message["content"]``: a delta shows only content that no
    later token can change (``ChatFormat.settled_content``). So a Llama 3 answer shows no leading or trailing
    spaces, header or end-of-turn text, and an answer that is a tool call (``<|python_tag|>...``, a JSON call, a
    Python list of calls) shows nothing: its deltas join to its empty content, and the call is in ``message``.
    One case is beyond any stream: Meta's parser also finds a call written after some text
    (``... <function=f>{...}`` or ``... brave_search.call(query="...")``) and then empties the content; that text
    has been shown by then (the call itself never is), and ``message`` tells.
    """

    def __init__(self, formatter: ChatFormat, pieces: Iterator[str]):
        """pieces: the answer's raw text, in pieces that no later token changes (``TextStream`` deltas). A
        generator may return the answer's ``llama.engine.ends.RowEnd`` (which says the stop id that ended it);
        None, or no return (a refusal): no stop id did."""
        self.formatter = formatter
        self.message: Optional[Message] = None
        self._deltas = self._content_deltas(pieces)

    def __next__(self) -> str:
        return next(self._deltas)

    def _content_deltas(self, pieces: Iterator[str]) -> Generator[str, None, None]:
        text, shown = "", ""
        while True:
            try:
                text += next(pieces)
            except StopIteration as end:
                stop_id = end.value.stop_id if end.value is not None else None
                break
            settled = self.formatter.settled_content(text)
            if len(settled) > len(shown):  # settled_content only grows as text does
                yield settled[len(shown) :]
                shown = settled
        self.message = self.formatter.decode_answer(text, self.formatter.stop_reason(stop_id))
        rest = self.message["content"]
        if rest.startswith(shown) and len(rest) > len(shown):
            yield rest[len(shown) :]
