"""Where each generated row ends, and why: the one rule for the batch calls, the streams and the fast path.

A row ends at the first of the tokenizer's stop ids (which is not returned), once its text holds one of the call's
stop strings (the text is cut right before it), or when it has used its length: max_gen_len tokens, or fewer where
the KV cache (max_seq_len positions) runs out first. ``EndRule`` holds those facts for one call; ``RowEnd`` applies
them to one row, token by token, and keeps the reason (``finish_reason``: "stop", with the ``stop_id`` or
``stop_string``, or "length").

The decoding loop runs on the device and must not wait for the host every step, so it gets a mirror of the rule
from ``EndRule.mirror``: the stop ids as a tensor and the position where each row's length runs out. The loop uses
it only to stop once every row has ended; where a row ends and why is always its RowEnd's to say, fed each step
(a stream, stop strings) or once the loop is over.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from llama.engine.stream import TextStream
from llama.tokenizer import TokenizerLike


class RowEnd:
    """Follows one row's generated tokens and decides where the row ends (the rule: see the module's docstring).

    ``finish_reason`` is None while the row runs, then "stop" (``stop_id`` or ``stop_string`` says which) or
    "length". With a ``stream``, the row's text is followed too: it searches the stop strings.
    """

    def __init__(self, budget: int, stop_ids: frozenset[int], stream: Optional[TextStream] = None):
        self.budget = budget  # the most tokens the row may generate
        self.stop_ids = stop_ids
        self.stream = stream
        self.tokens: list[int] = []  # generated tokens up to the end (a stop id excluded)
        self.finish_reason: Optional[str] = "length" if budget == 0 else None  # 0: ended before any token
        self.stop_id: Optional[int] = None  # the stop id that ended the row
        self.stop_string: Optional[str] = None  # the stop string that ended the row

    @property
    def ended(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> bool:
        """Take the row's next generated token; True once the row has ended (later tokens are ignored)."""
        if self.ended:
            return True
        if token in self.stop_ids:
            self.finish_reason, self.stop_id = "stop", token
            return True
        self.tokens.append(token)
        if self.stream is not None:
            self.stream.add(token)
            if self.stream.stopped:
                self.finish_reason, self.stop_string = "stop", self.stream.stop_string
                return True
        if len(self.tokens) >= self.budget:
            self.finish_reason = "length"
        return self.ended

    def n_kept(self) -> int:
        """How many generated tokens the result keeps: those that cover the text up to a stop string."""
        return self.stream.n_tokens_for_text() if self.stop_string is not None else len(self.tokens)


class EndRule:
    """The facts that end the rows of one call: the tokenizer's stop ids, max_gen_len, max_seq_len, stop strings."""

    def __init__(self, tokenizer: TokenizerLike, max_gen_len: int, max_seq_len: int, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer  # for the rows' text, when it is followed
        self.stop_ids = frozenset(tokenizer.stop_ids)
        self.max_gen_len = max_gen_len
        self.max_seq_len = max_seq_len
        self.stop = list(stop)

    def budget(self, prompt_len: int) -> int:
        """How many tokens a row after a prompt of prompt_len tokens may generate."""
        return min(self.max_gen_len, self.max_seq_len - prompt_len)

    def limits(self, prompt_lens: Sequence[int]) -> list[int]:
        """The position where each row's length runs out (after its last token), for rows after these prompts."""
        return [p + self.budget(p) for p in prompt_lens]

    def mirror(self, prompt_lens: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """What the decoding loop checks on the device: the stop ids (n,) and each row's ``limits`` (bsz,)."""
        stop_ids = torch.tensor(sorted(self.stop_ids), dtype=torch.long, device=device)
        return stop_ids, torch.tensor(self.limits(prompt_lens), dtype=torch.long, device=device)

    @staticmethod
    def ended_on_device(
        next_token: torch.Tensor, cur_pos: int, stop_ids: torch.Tensor, limits: torch.Tensor
    ) -> torch.Tensor:
        """RowEnd.add's stop-id and length tests for a whole batch on the device, with ``mirror``'s tensors: (bsz,)
        True where the token at cur_pos is a stop id or the row's length runs out there. Stop strings need the
        text, so only the RowEnds find those."""
        return torch.isin(next_token, stop_ids) | (cur_pos + 1 >= limits)

    def text_rows(self, prompts: Sequence[Sequence[int]], echo_text: bool) -> list[RowEnd]:
        """A RowEnd with a TextStream for each prompt, to be fed every step; echo_text: the streams' text starts
        with the prompt's (stop strings are searched only after it)."""
        return [
            RowEnd(self.budget(len(p)), self.stop_ids, TextStream(self.tokenizer, self.stop, p if echo_text else ()))
            for p in prompts
        ]

    def rows_after(self, grid: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> list[RowEnd]:
        """The RowEnd of each row of a finished grid (prompt, then generated tokens), fed after the loop."""
        rows = []
        for tokens, plen in zip(grid, prompt_lens):
            row = RowEnd(self.budget(plen), self.stop_ids)
            for token in tokens[plen:]:
                if row.add(token):
                    break
            rows.append(row)
        return rows
