"""The reference's decoding loop, and the calls that take turns on one model's KV cache: a batch (``complete``) and,
under torchrun with several ranks, a stream (with one process, streams run on ``llama.engine.batching``'s engine).

The loop runs over a small "forward" interface: ``forward(tokens, start_pos) -> logits``, which writes the tokens'
keys and values into the KV cache at start_pos, and ``last_logits``, the same call's last position alone (what the
loop reads without logprobs). The faithful ``Transformer`` becomes one through ``ModelForward`` (its forward as is),
the fast path's ``FastDecoder`` through ``FastForward``. Sampling is ``llama.engine.sampling``'s, and where each row
ends is ``llama.engine.ends``'s, for every path.

Prompts are laid left-aligned into a (bsz, total_len) grid as in the reference; decoding starts at the shortest
prompt and longer prompts have their own tokens forced in until they run out.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Generator, Iterator, Optional, Protocol, Sequence

import torch

from llama.checks import check_prompts, check_sampling, check_stop
from llama.engine.ends import EndRule, RowEnd
from llama.engine.sampling import select_next_token, token_logprobs_of
from llama.model import Transformer
from llama.tokenizer import TokenizerLike

if TYPE_CHECKING:
    from llama.engine.fast import FastDecoder


class Forward(Protocol):
    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Logits (bsz, seqlen, vocab) of tokens (bsz, seqlen) at positions start_pos.., written into the cache."""

    def last_logits(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """The same call's logits of the last position alone, (bsz, 1, vocab): all that choosing the next token
        needs, when no logprobs are asked for."""


class ModelForward:
    """The faithful model as a Forward: the reference's forward, whose last position it also slices (its values
    bitwise, whatever the call needs)."""

    def __init__(self, model: Transformer):
        self.model = model

    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        return self.model.forward(tokens, start_pos)

    def last_logits(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        return self.model.forward(tokens, start_pos)[:, -1:]


class FastForward:
    """A ``FastDecoder`` as a Forward: its prefill for the prompts (the loop's first call, at position 0), its
    static-shape step for each new token after them."""

    def __init__(self, fast: FastDecoder):
        self.fast = fast

    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        if start_pos == 0:
            return self.fast.prefill(tokens, start_pos)
        return self.fast(tokens, start_pos)

    def last_logits(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        if start_pos == 0:  # the prompts: the output layer for their last position only
            return self.fast.prefill(tokens, start_pos, last_only=True)
        return self.fast(tokens, start_pos)


@dataclass
class DecodeState:
    """A batch being decoded: the token grid, the per-row state, and how far it has got."""

    tokens: torch.Tensor  # (bsz, total_len), prompts left-aligned, pad_id beyond them until generated
    prompt_lens: list[int]
    is_prompt: torch.Tensor  # (bsz, total_len) bool: position holds a prompt token
    finished: torch.Tensor  # (bsz,) bool: row has ended (the device's mirror of the EndRule, or a RowEnd said so)
    token_logprobs: Optional[torch.Tensor]  # (bsz, total_len) fp32 when logprobs are asked for
    filled: int  # positions [0, filled) are final for every row
    stop_ids: torch.Tensor  # (n,) EndRule.mirror: the stop ids
    limits: torch.Tensor  # (bsz,) EndRule.mirror: the position where each row's length runs out
    batch: int = 0  # the DecodeLoop's batch number when this one started: the KV cache is ours while it lasts


@dataclass
class Completion:
    """A finished batch: each row's tokens (its prompt first, if echoed), their logprobs (if asked for), and its
    RowEnd (why it ended: ``finish_reason``; with a ``stream``, its text)."""

    tokens: list[list[int]]
    logprobs: Optional[list[list[float]]]
    ends: list[RowEnd]


class DecodeLoop:
    """Decodes batches on one model and its KV cache, one call at a time.

    One KV cache serves every call. A batch holds the lock for its whole run, a stream for each step, so threads
    take turns; every batch takes a new number, so a stream whose cache another batch has overwritten since it
    last stepped finds out (``steps``) instead of going on with wrong text. The continuous-batching engine
    (``llama.engine.batching``) takes the same lock while it has requests.
    """

    def __init__(self, model: Transformer, tokenizer: TokenizerLike, fast: Optional[FastDecoder] = None):
        self.model = model  # its forward also scores prompts when there is nothing to generate
        self.tokenizer = tokenizer
        self.forward: Forward = ModelForward(model) if fast is None else FastForward(fast)
        # The reference asks the device every step whether every row has ended; the fast path only every few
        # steps, as the answer costs a host sync.
        self.check_every = 1 if fast is None else fast.eos_check_every
        self.lock = threading.RLock()
        self._batch = 0

    # ------------------------------------------------------------------ the calls

    def complete(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: Optional[int],
        temperature: float,
        top_p: float,
        logprobs: bool,
        echo: bool,
        stop: Optional[Sequence[str]] = None,
        echo_text: Optional[bool] = None,
    ) -> Completion:
        """Decode a batch (arguments as ``Llama.generate``'s, plus stop strings).

        echo_text: whether the rows' text (their RowEnd's ``stream``, with stop strings) holds the prompt's too
        (default: echo; a chat answer's does not).
        """
        prompts, rule = self.prepare(prompt_tokens, max_gen_len, temperature, top_p, stop)
        # Stop strings need each row's text as it grows, so their rows are followed every step; without, the loop
        # runs on the device alone and each row's end is read off the grid once it is over.
        rows = rule.text_rows(prompts, echo if echo_text is None else echo_text) if rule.stop else None
        with self.lock:  # the whole batch: another thread's call waits for the KV cache
            state = self.start(prompts, rule, logprobs)
            for _ in self.steps(state, temperature, top_p, follow(state, rows) if rows is not None else None):
                pass
        if rows is None:
            rows = rule.rows_after(state.tokens[:, : state.filled].tolist(), state.prompt_lens)
        return results(state, rows, echo)

    def stream(
        self,
        prompt_tokens: Sequence[int],
        temperature: float,
        top_p: float,
        max_gen_len: Optional[int],
        stop: Optional[Sequence[str]],
    ) -> Generator[str, None, RowEnd]:
        """Check the arguments now; return a generator of the text deltas of one prompt's row
        (``TextStream.delta``), which returns the row's RowEnd."""
        prompts, rule = self.prepare([prompt_tokens], max_gen_len, temperature, top_p, stop, stream=True)
        return self._deltas(prompts, rule, temperature, top_p)

    def _deltas(
        self, prompts: list[list[int]], rule: EndRule, temperature: float, top_p: float
    ) -> Generator[str, None, RowEnd]:
        [row] = rule.text_rows(prompts, echo_text=False)
        with self.lock:
            state = self.start(prompts, rule, logprobs=False)
            steps = self.steps(state, temperature, top_p, follow(state, [row]))
        while True:
            with self.lock:  # one step at a time: a batch call in another thread runs between two steps
                if next(steps, None) is None:
                    break
            piece = row.stream.delta()
            if piece:
                yield piece
        piece = row.stream.delta(final=True)
        if piece:
            yield piece
        return row

    def prepare(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: Optional[int],
        temperature: float,
        top_p: float,
        stop: Optional[Sequence[str]],
        stream: bool = False,
    ) -> tuple[list[list[int]], EndRule]:
        """Check every argument of a call; return the prompts and the rule that ends their rows.

        max_gen_len None is max_seq_len - 1; 0 (score the prompts only) is for batch calls, a stream refuses it.
        """
        params = self.model.params
        stop = check_stop(stop)
        max_gen_len = params.max_seq_len - 1 if max_gen_len is None else max_gen_len
        check_sampling(temperature, top_p, max_gen_len, stream)
        prompts = check_prompts(prompt_tokens, params.max_batch_size, params.max_seq_len, params.vocab_size)
        return prompts, EndRule(self.tokenizer, max_gen_len, params.max_seq_len, stop)

    # ------------------------------------------------------------------ the loop

    def start(self, prompts: Sequence[Sequence[int]], rule: EndRule, logprobs: bool) -> DecodeState:
        """Lay the prompts into a (bsz, total_len) grid, as the reference does, and take the KV cache."""
        device = self.model.device
        prompt_lens = [len(t) for t in prompts]
        ends = rule.limits(prompt_lens)
        total_len = max(ends)  # the reference's min(max_seq_len, max_gen_len + longest prompt)
        stop_ids, limits = rule.mirror(prompt_lens, device)
        bsz = len(prompts)
        tokens = torch.full((bsz, total_len), self.tokenizer.pad_id, dtype=torch.long, device=device)
        is_prompt = torch.zeros((bsz, total_len), dtype=torch.bool, device=device)
        for k, t in enumerate(prompts):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
            is_prompt[k, : len(t)] = True
        self._batch += 1  # the KV cache is this batch's from now on
        return DecodeState(
            tokens=tokens,
            prompt_lens=prompt_lens,
            is_prompt=is_prompt,
            finished=torch.zeros(bsz, dtype=torch.bool, device=device),
            token_logprobs=torch.zeros_like(tokens, dtype=torch.float) if logprobs else None,
            # Decoding starts at the first position where a row has tokens to generate. Where none has
            # (max_gen_len=0, or every prompt fills max_seq_len) every position is final (rows shorter than the
            # longest keep their padding), and the loop only scores the prompts.
            filled=min((p for p, end in zip(prompt_lens, ends) if end > p), default=total_len),
            stop_ids=stop_ids,
            limits=limits,
            batch=self._batch,
        )

    @torch.inference_mode()
    def steps(
        self, state: DecodeState, temperature: float, top_p: float, on_step: Optional[Callable[[int], None]] = None
    ) -> Iterator[int]:
        """Run the decoding loop over `state`, yielding each position once every row holds its token there.

        The loop ends at total_len or once every row has ended. on_step(cur_pos), when given, is called after
        each step and may mark rows of ``state.finished`` (their RowEnd ended them) to end them early.
        """
        tokens, total_len = state.tokens, state.tokens.shape[1]
        temperature, top_p = float(temperature), float(top_p)  # numpy's floats too, checked by check_sampling
        if state.filled == total_len:
            # Nothing to generate: only score the prompts if asked, in one pass over the grid. Unlike the
            # reference, token t is scored with the logits of position t - 1, and only when logprobs are wanted.
            # Padding (pad_id may be -1) becomes token 0: it lies after each row's prompt, so the causal mask
            # keeps it out of that row's scores.
            if state.token_logprobs is not None:
                grid = torch.where(state.is_prompt, tokens, 0)
                logits = self.model.forward(grid, 0)
                state.token_logprobs[:, 1:] = token_logprobs_of(logits[:, :-1], grid[:, 1:])
            return
        # without logprobs, only each call's last position's logits are read
        forward = self.forward.forward if state.token_logprobs is not None else self.forward.last_logits
        check_every = self.check_every
        prev_pos = 0
        for step, cur_pos in enumerate(range(state.filled, total_len), start=1):
            if self._batch != state.batch:
                raise RuntimeError(
                    "this stream's KV cache was overwritten by another generation on the same Llama; finish a "
                    "stream before starting another call on that Llama, or give each concurrent stream its own Llama"
                )
            logits = forward(tokens[:, prev_pos:cur_pos], prev_pos)  # (bsz, cur - prev or 1, vocab)
            next_token = select_next_token(logits[:, -1], temperature, top_p)
            # Where the prompt still has a token at cur_pos, keep it.
            generated = ~state.is_prompt[:, cur_pos]
            next_token = torch.where(generated, next_token, tokens[:, cur_pos])
            tokens[:, cur_pos] = next_token
            if state.token_logprobs is not None:
                # logits at positions prev..cur-1 score the tokens at prev+1..cur
                state.token_logprobs[:, prev_pos + 1 : cur_pos + 1] = token_logprobs_of(
                    logits, tokens[:, prev_pos + 1 : cur_pos + 1]
                )
            # The EndRule's mirror on the device: it only tells when every row has ended, so the loop can stop
            # without the host reading each token; the rows' RowEnds say where each one ends, and why.
            state.finished |= generated & EndRule.ended_on_device(next_token, cur_pos, state.stop_ids, state.limits)
            prev_pos = cur_pos
            state.filled = cur_pos + 1
            if on_step is not None:
                on_step(cur_pos)
            yield cur_pos
            # Extra steps (the fast path checks every few) only add tokens after every row's end, which the
            # RowEnds cut off.
            if step % check_every == 0 and bool(state.finished.all()):
                break


def follow(state: DecodeState, rows: Sequence[RowEnd]) -> Callable[[int], None]:
    """The per-step consumer that gives each row's RowEnd its new token, and ends the rows that it ends."""

    def on_step(cur_pos: int) -> None:
        column = state.tokens[:, cur_pos].tolist()
        for i, row in enumerate(rows):
            if cur_pos >= state.prompt_lens[i] and not row.ended and row.add(column[i]):
                state.finished[i] = True

    return on_step


def results(state: DecodeState, rows: Sequence[RowEnd], echo: bool) -> Completion:
    """Each row's prompt (if echo) and generated tokens up to its end (its RowEnd's), with their logprobs if asked.

    Only generated tokens can end a row: unlike the reference, a stop id inside an echoed prompt (an earlier chat
    turn) does not cut the prompt short.
    """
    grid = state.tokens[:, : state.filled].tolist()
    all_logprobs = state.token_logprobs[:, : state.filled].tolist() if state.token_logprobs is not None else None
    out_tokens, out_logprobs = [], []
    for i, (row, plen) in enumerate(zip(rows, state.prompt_lens)):
        start, end = (0 if echo else plen), plen + row.n_kept()
        out_tokens.append(grid[i][start:end])
        if all_logprobs is not None:
            out_logprobs.append(all_logprobs[i][start:end])
    return Completion(out_tokens, out_logprobs if all_logprobs is not None else None, list(rows))
