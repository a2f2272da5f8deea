"""Text and chat generation with the reference's API (``Llama.build``, ``generate``, ``text_completion``,
``chat_completion``), built from small functions that can be tested on their own.

Where things live: the generation's pieces come from ``llama.families`` (tokenizer, chat format as
``generator.formatter``, model class); ``Llama._decode`` is the one decoding loop; ``llama.engine.stream.RowEnd`` is the
one rule for where a row ends; ``llama.engine.stream.TextStream`` the one stop-string search.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Generator, Iterator, List, Optional, Sequence, TypedDict

import torch
import torch.nn.functional as F

from llama.chat_format import ChatFormat, Dialog, Message
from llama.checks import check_dtype, check_positive_int, check_seed, is_finite_number, is_int
from llama.distributed import (
    available_memory,
    check_device,
    default_device,
    default_dtype,
    default_dtype_scope,
    is_main_process,
    model_parallel_rank,
    setup_model_parallel,
)
from llama.engine.stream import ChatStream, RowEnd, TextStream, check_stop
from llama.families import FAMILIES, family_of, load_tokenizer
from llama.model import ModelArgs, Transformer, check_model_parallel_fit, kv_cache_bytes, kv_cache_shape
from llama.tokenizer import TokenizerLike
from llama.weights import checkpoint

if TYPE_CHECKING:
    from llama.engine.fast import FastDecoder

logger = logging.getLogger(__name__)


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose probability reaches p (nucleus sampling).

    probs: (bsz, vocab). The token whose cumulative probability crosses p is kept. Returns (bsz, 1) token ids.
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p  # mass strictly before this token already exceeds p
    probs_sort.masked_fill_(mask, 0.0)  # not probs_sort[mask] = 0: boolean indexing would sync with the host
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1)
    return torch.gather(probs_idx, -1, next_token)


def select_next_token(last_logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Next token ids (bsz,) from the logits (bsz, vocab) of the last position: greedy at temperature 0."""
    # Unlike the reference, which divides the logits themselves: logits / 1e-45 overflows to inf and the
    # softmax to NaN. Shifted so that the largest is 0, every scaled logit is 0 or negative (at worst -inf, a
    # probability of 0), so the probabilities stay finite for any temperature the dtype can hold; one too small
    # to hold (below its smallest normal number) would make 0 / 0, and is the limit it tends to: greedy.
    if temperature >= torch.finfo(last_logits.dtype).tiny:
        shifted = last_logits - last_logits.max(dim=-1, keepdim=True).values
        probs = torch.softmax(shifted / temperature, dim=-1)
        return sample_top_p(probs, top_p).reshape(-1)
    return torch.argmax(last_logits, dim=-1).reshape(-1)


def token_logprobs_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[:, j]) under logits[:, j]: logits (bsz, n, vocab), targets (bsz, n) -> (bsz, n)."""
    return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


@dataclass
class DecodeState:
    """A batch being decoded: the token grid, the per-row state, and how far it has got."""

    tokens: torch.Tensor  # (bsz, total_len), prompts left-aligned, pad_id beyond them until generated
    prompt_lens: list[int]
    is_prompt: torch.Tensor  # (bsz, total_len) bool: position holds a prompt token
    finished: torch.Tensor  # (bsz,) bool: row has ended (a stop id, its length, or stopped by a consumer)
    token_logprobs: Optional[torch.Tensor]  # (bsz, total_len) fp32 when logprobs are asked for
    filled: int  # positions [0, filled) are final for every row
    limits: Optional[torch.Tensor] = None  # (bsz,) prompt_len + max_gen_len: where each row's budget ends
    generation: int = 0  # the Llama's batch number when this one started: its KV cache is ours while it lasts


def _check_sampling(temperature: float, top_p: float, max_gen_len: Optional[int], stream: bool = False) -> None:
    if not is_finite_number(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if not is_finite_number(top_p) or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p!r}")
    if max_gen_len is None:
        return
    if stream and is_int(max_gen_len) and max_gen_len == 0:
        raise ValueError(
            "max_gen_len must be a positive integer for a stream, got 0; max_gen_len=0 only scores the prompt: "
            "call text_completion or generate with logprobs=True, echo=True for that"
        )
    if not is_int(max_gen_len) or max_gen_len < 0:
        raise ValueError(f"max_gen_len must be an integer >= 0 (0: only score the prompts), got {max_gen_len!r}")


def _check_paths(ckpt_dir: object, tokenizer_path: object) -> None:
    """TypeError unless both are paths (str or os.PathLike): None would fail deep in pathlib."""
    for name, value in (("ckpt_dir", ckpt_dir), ("tokenizer_path", tokenizer_path)):
        if not isinstance(value, (str, os.PathLike)):
            raise TypeError(
                f"{name} must be a path (str or os.PathLike), got {value!r}; for the built-in demo model pass "
                "llama.demo.DEMO_CKPT_DIR and llama.demo.DEMO_TOKENIZER_PATH"
            )


def _kv_cache_text(args: ModelArgs, mp_size: int, dtype: torch.dtype) -> str:
    """The size of the KV cache that args ask for, and where it comes from."""
    rows, positions, kv_heads, head_dim = kv_cache_shape(args, mp_size)
    ranks = f" on each of the {mp_size} model-parallel ranks" if mp_size > 1 else ""
    return (
        f"max_seq_len={positions} with max_batch_size={rows} needs a KV cache of "
        f"{kv_cache_bytes(args, mp_size, dtype) / 1e9:.3g} GB{ranks} (keys and values: 2 x {args.n_layers} layers "
        f"x {rows} rows x {positions} positions x {kv_heads} KV heads x {head_dim} x {dtype.itemsize} bytes)"
    )


def _check_kv_cache_fits(args: ModelArgs, mp_size: int, device: torch.device, dtype: torch.dtype) -> None:
    """ValueError, with the size, when the KV cache that Llama.build would allocate exceeds what `device` has
    (``llama.distributed.available_memory``): better than the allocator's raw error, or swapping for minutes."""
    have = available_memory(device)
    if have is not None and kv_cache_bytes(args, mp_size, dtype) > have:
        where = "free on this GPU" if device.type == "cuda" else "of physical memory on this host"
        raise ValueError(
            f"{_kv_cache_text(args, mp_size, dtype)}, more than the {have / 1e9:.3g} GB {where}; lower max_seq_len "
            "(the longest prompt plus generation you need) or max_batch_size"
        )


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        *,
        device: Optional[str | torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        compile: bool = False,
        rope_scaling_factor: Optional[float] = None,
        timeout_s: Optional[float] = None,
        quantize: Optional[str] = None,
    ) -> Llama:
        """Load a Meta checkpoint folder and its tokenizer, ready to generate.

        Under ``torchrun`` every process holds one model-parallel slice (NCCL on CUDA, gloo on CPU). Without a
        launcher a one-process group is started, so plain ``python`` and notebooks work. A checkpoint saved with
        any number of shards loads on any number of processes that its heads can be split over. Which Llama
        generation it is follows from the tokenizer file (``llama.families``).

        Args:
            ckpt_dir: folder with ``params.json`` and ``consolidated.NN.pth`` (``llama.demo.DEMO_CKPT_DIR`` is the
                built-in demo model's).
            tokenizer_path: Meta's ``tokenizer.model`` (``llama.demo.DEMO_TOKENIZER_PATH`` for the demo model).
            max_seq_len: longest prompt plus generation; sizes the KV cache. A KV cache larger than the memory
                (the GPU's free memory, the host's physical memory) is refused with its size.
            max_batch_size: most prompts per call; sizes the KV cache.
            model_parallel_size: ranks per model copy; defaults to the world size.
            seed: torch seed, the same on every rank so sampling agrees across ranks; any integer
                ``torch.manual_seed`` takes, in [-2**63, 2**64 - 1].
            device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; defaults to ``cuda:LOCAL_RANK`` with CUDA, else
                ``cpu``. Other device types (``meta``, ``mps``...) are refused.
            dtype: weight dtype, torch.float32, torch.float16 or torch.bfloat16; defaults to float16 on CUDA (as
                the reference) and bfloat16 on CPU.
            compile: decode with the opt-in fast path (``llama.engine.fast``): static shapes, no per-step host sync,
                ``torch.compile``. One model-parallel rank only. In fp32 it gives the default path's greedy tokens
                (tests compare them). With ``quantize``, on a CPU, both paths decode with the int8-input kernels
                (``llama.quantize``), whose rounding turns the paths' last-bit differences into logits ~1e-2
                apart, so near-ties can pick other tokens; ``llama.quantize.use_int8_inputs(model, False)``
                switches both to the exact kernels, and then the fast path gives the default path's greedy
                tokens in fp32 again. The reference for a quantized model is the default path with exact
                products, ``x @ dequantize(W).T`` (see the README's Quantization section).
            rope_scaling_factor: overrides params.json's (Llama 3.1+ scaled RoPE; Meta's code uses 8, see the
                README on Llama 3.2).
            timeout_s: seconds a collective waits for the other ranks before the job fails with an error naming
                them, instead of hanging (torch's default is 30 min); default ``llama.distributed.DEFAULT_TIMEOUT_S``
                (300 s, why: there). A process group that already exists keeps its own timeout.
            quantize: "int8" or "int4": weight-only quantization of the linear layers while loading
                (``llama.quantize``). A checkpoint written by ``python -m llama.quantize`` loads quantized
                without it.
        """
        _check_paths(ckpt_dir, tokenizer_path)
        max_seq_len = check_positive_int("max_seq_len", max_seq_len)
        max_batch_size = check_positive_int("max_batch_size", max_batch_size)
        seed = check_seed(seed)
        device = check_device(device) if device is not None else default_device()
        dtype = default_dtype(device) if dtype is None else check_dtype(dtype)

        # Check the files before starting any process group, so a typo fails fast and clearly.
        params = checkpoint.read_params(ckpt_dir)
        shard_paths = checkpoint.find_shards(ckpt_dir)
        tokenizer = load_tokenizer(tokenizer_path)
        family = family_of(tokenizer)
        scheme, prequantized = None, checkpoint.QUANTIZATION_KEY in params  # written by llama.quantize
        if quantize is not None or prequantized:
            from llama import quantize as quantization  # only when asked for: it registers its kernels' operators

            params, scheme = quantization.split_params(params, quantize, repr(str(ckpt_dir)))

        mp_size = setup_model_parallel(model_parallel_size, device, timeout_s)
        torch.manual_seed(seed)  # same seed on every rank: they must sample the same tokens

        start = time.time()
        # Shapes first, from the memory-mapped shards: nothing of the model's size exists before they fit.
        if prequantized:
            shards = quantization.float_shaped_shards(shard_paths, scheme)
        else:
            shards = [checkpoint.load_shard(p) for p in shard_paths]
        vocab = tokenizer.n_words
        model_args, _ = checkpoint.fit_params_to_shards(params, shard_paths, shards, vocab, family.model_cls)
        del shards
        overrides = {"max_seq_len": max_seq_len, "max_batch_size": max_batch_size}
        if rope_scaling_factor is not None:
            overrides["rope_scaling_factor"] = rope_scaling_factor
        model_args = dataclasses.replace(model_args, **overrides)
        check_model_parallel_fit(model_args, mp_size, repeat_kv_heads=True)
        _check_kv_cache_fits(model_args, mp_size, device, dtype)
        try:
            with torch.device(device), default_dtype_scope(dtype):
                model = family.model_cls(model_args)
        except RuntimeError as e:  # torch.OutOfMemoryError (CUDA) is one; the CPU allocator's is a plain one
            if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
                raise
            raise MemoryError(
                f"{_kv_cache_text(model_args, mp_size, dtype)}; building the model ran out of memory on {device}: "
                f"lower max_seq_len or max_batch_size. torch said: {e}"
            ) from e
        if scheme is None:
            checkpoint.load_weights(model, shard_paths, model_parallel_rank(), mp_size, device, dtype)
        else:
            quantization.load_weights(
                model, shard_paths, model_parallel_rank(), mp_size, device, dtype, scheme, prequantized
            )
        if is_main_process():
            logger.info(
                "loaded %s (%s, %d shard(s) on %d rank(s), %s, %s) in %.2f s",
                ckpt_dir, family.name, len(shard_paths), mp_size, device, dtype, time.time() - start,
            )
        fast = None
        if compile:
            from llama.engine.fast import FastDecoder  # only when asked for: it registers the C kernel's operator

            fast = FastDecoder(model)
        return Llama(model, tokenizer, fast=fast, formatter=family.chat_format(tokenizer))

    def __init__(
        self,
        model: Transformer,
        tokenizer: TokenizerLike,
        fast: Optional[FastDecoder] = None,
        formatter: Optional[ChatFormat] = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        if formatter is None:
            family = next((f for f in FAMILIES if isinstance(tokenizer, f.tokenizer_cls)), None)
            formatter = family.chat_format(tokenizer) if family is not None else None
        self.formatter: Optional[ChatFormat] = formatter  # None: a tokenizer of no family (benchmarks), no chat
        self.fast = fast  # decode steps on the static-shape path when set
        self._stop_ids = torch.tensor(tokenizer.stop_ids, dtype=torch.long, device=self.device)
        # One KV cache serves every call. Each batch call holds the lock for its whole run, a stream for each
        # step, so threads take turns; every batch takes a new number, so a stream whose cache another batch
        # has overwritten since it last stepped finds out (``_decode``) instead of going on with wrong text.
        self._lock = threading.RLock()
        self._generation = 0

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    # ------------------------------------------------------------------ the decoding loop

    def _check_prompts(self, prompt_tokens: Sequence[Sequence[int]]) -> list[list[int]]:
        """The prompts as lists of Python ints, after checking them against the model's limits."""
        params = self.model.params
        if not isinstance(prompt_tokens, (list, tuple)) or not prompt_tokens:
            raise ValueError("prompt_tokens must be a non-empty list of token-id lists")
        if len(prompt_tokens) > params.max_batch_size:
            raise ValueError(
                f"{len(prompt_tokens)} prompts exceed max_batch_size={params.max_batch_size}; "
                "pass fewer prompts per call or build with a larger max_batch_size"
            )
        checked = []
        for i, t in enumerate(prompt_tokens):
            if not isinstance(t, (list, tuple)) or not t:
                raise ValueError(f"prompt {i} must be a non-empty list of token ids")
            if len(t) > params.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(t)} tokens, more than max_seq_len={params.max_seq_len}; "
                    "shorten it or build with a larger max_seq_len"
                )
            bad = next((x for x in t if not is_int(x)), None)
            if bad is not None:
                raise TypeError(f"prompt {i} holds {bad!r} ({type(bad).__name__}); token ids must be integers")
            ids = [int(x) for x in t]
            if not all(0 <= x < params.vocab_size for x in ids):
                raise ValueError(f"prompt {i} holds token ids outside [0, {params.vocab_size})")
            checked.append(ids)
        return checked

    def _start(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int, logprobs: bool) -> DecodeState:
        """Lay the prompts into a (bsz, total_len) grid, as the reference does."""
        max_prompt_len = max(len(t) for t in prompt_tokens)
        max_seq_len = self.model.params.max_seq_len
        # No row can generate more than max_seq_len tokens, so a larger budget means the same as max_seq_len;
        # clamped, it cannot overflow the int64 limits below (sys.maxsize would, and end every row at once).
        max_gen_len = min(int(max_gen_len), max_seq_len)
        total_len = min(max_seq_len, max_gen_len + max_prompt_len)
        bsz = len(prompt_tokens)
        tokens = torch.full((bsz, total_len), self.tokenizer.pad_id, dtype=torch.long, device=self.device)
        is_prompt = torch.zeros((bsz, total_len), dtype=torch.bool, device=self.device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=self.device)
            is_prompt[k, : len(t)] = True
        prompt_lens = [len(t) for t in prompt_tokens]
        self._generation += 1  # the KV cache is this batch's from now on
        return DecodeState(
            tokens=tokens,
            prompt_lens=prompt_lens,
            is_prompt=is_prompt,
            finished=torch.zeros(bsz, dtype=torch.bool, device=self.device),
            token_logprobs=torch.zeros_like(tokens, dtype=torch.float) if logprobs else None,
            # max_gen_len=0: nothing to generate, so every position is final (rows shorter than the longest
            # keep their padding); _decode then only scores the prompts.
            filled=total_len if max_gen_len == 0 else min(prompt_lens),
            limits=torch.tensor(prompt_lens, device=self.device) + max_gen_len,
            generation=self._generation,
        )

    @torch.inference_mode()
    def _decode(
        self, state: DecodeState, temperature: float, top_p: float, on_step: Optional[Callable[[int], None]] = None
    ) -> Iterator[int]:
        """Run the decoding loop over `state`, yielding each position once every row holds its token there.

        Decoding starts at the shortest prompt; longer prompts have their own tokens forced in until they run
        out. A row ends at one of the tokenizer's stop ids or at its length budget (``state.limits``); the loop
        ends at total_len or once every row has ended. on_step(cur_pos), when given, is called after each step
        and may mark rows of ``state.finished`` (a stop string was reached) to end them early.
        """
        tokens, total_len = state.tokens, state.tokens.shape[1]
        temperature, top_p = float(temperature), float(top_p)  # numpy's floats too, checked by _check_sampling
        if state.filled == total_len:
            # Nothing to generate (max_gen_len=0, or every prompt fills max_seq_len): only score the prompts if
            # asked, in one pass over the grid. Unlike the reference, token t is scored with the logits of
            # position t - 1, and only when logprobs are wanted. Padding (pad_id may be -1) becomes token 0: it
            # lies after each row's prompt, so the causal mask keeps it out of that row's scores.
            if state.token_logprobs is not None:
                grid = torch.where(state.is_prompt, tokens, 0)
                logits = self.model.forward(grid, 0)
                state.token_logprobs[:, 1:] = token_logprobs_of(logits[:, :-1], grid[:, 1:])
            return
        prev_pos = 0
        check_every = 1 if self.fast is None else self.fast.eos_check_every
        for step, cur_pos in enumerate(range(state.filled, total_len), start=1):
            if self._generation != state.generation:
                raise RuntimeError(
                    "this stream's KV cache was overwritten by another generation on the same Llama; finish a "
                    "stream before starting another call on that Llama, or give each concurrent stream its own Llama"
                )
            if self.fast is not None and prev_pos > 0:  # one new token per row: the static-shape step
                logits = self.fast(tokens[:, prev_pos:cur_pos], prev_pos)
            elif self.fast is not None:  # the prompts: the fast path's prefill (fp32 attention and GEMMs)
                logits = self.fast.prefill(tokens[:, prev_pos:cur_pos], prev_pos)
            else:
                logits = self.model.forward(tokens[:, prev_pos:cur_pos], prev_pos)  # (bsz, cur - prev, vocab)
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
            ended = torch.isin(next_token, self._stop_ids)
            if state.limits is not None:
                ended |= cur_pos + 1 >= state.limits
            state.finished |= generated & ended
            prev_pos = cur_pos
            state.filled = cur_pos + 1
            if on_step is not None:
                on_step(cur_pos)
            yield cur_pos
            # The reference asks every step; the fast path only every few steps, as the answer costs a host
            # sync. Extra steps only add tokens after every row's end, which RowEnd cuts off.
            if step % check_every == 0 and bool(state.finished.all()):
                break

    def _feed_rows(self, state: DecodeState, rows: Sequence[RowEnd]) -> Callable[[int], None]:
        """The per-step consumer that gives each row its new token, and ends rows that reach a stop string."""

        def on_step(cur_pos: int) -> None:
            column = state.tokens[:, cur_pos].tolist()
            for i, row in enumerate(rows):
                if cur_pos >= state.prompt_lens[i] and not row.ended and row.add(column[i]):
                    state.finished[i] = True

        return on_step

    def _end_rows(self, grid: list[list[int]], prompt_lens: Sequence[int], max_gen_len: int) -> list[RowEnd]:
        """The end of each row of a finished grid, found by feeding its generated tokens to a RowEnd."""
        rows = [RowEnd(max_gen_len, self.tokenizer.stop_ids) for _ in grid]
        for row, toks, plen in zip(rows, grid, prompt_lens):
            for token in toks[plen:]:
                if row.add(token):
                    break
        return rows

    def _results(
        self, state: DecodeState, max_gen_len: int, echo: bool, rows: Optional[Sequence[RowEnd]] = None
    ) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """Each row's prompt (if echo) and generated tokens up to its end, with their logprobs if asked for.

        rows: the RowEnds fed during the loop; without them, each row's tokens are fed to a new one now.
        Only generated tokens can end a row: unlike the reference, a stop id inside an echoed prompt (an
        earlier chat turn) does not cut the prompt short.
        """
        grid = state.tokens[:, : state.filled].tolist()
        if rows is None:
            rows = self._end_rows(grid, state.prompt_lens, max_gen_len)
        all_logprobs = state.token_logprobs[:, : state.filled].tolist() if state.token_logprobs is not None else None
        out_tokens, out_logprobs = [], []
        for i, (row, plen) in enumerate(zip(rows, state.prompt_lens)):
            start, end = (0 if echo else plen), plen + row.n_kept()
            out_tokens.append(grid[i][start:end])
            if all_logprobs is not None:
                out_logprobs.append(all_logprobs[i][start:end])
        return out_tokens, (out_logprobs if all_logprobs is not None else None)

    def _prepare(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: Optional[int],
        temperature: float,
        top_p: float,
        stop: Optional[Sequence[str]],
        stream: bool = False,
    ) -> tuple[list[list[int]], int, list[str]]:
        """Check every argument of a generation call; return the prompts, max_gen_len and the stop strings.

        max_gen_len=0 (score the prompts only) is for batch calls; a stream refuses it.
        """
        stop = check_stop(stop)
        max_gen_len = self._default_gen_len(max_gen_len)
        _check_sampling(temperature, top_p, max_gen_len, stream)
        return self._check_prompts(prompt_tokens), max_gen_len, stop

    def _run(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
        logprobs: bool,
        streams: Optional[Sequence[TextStream]],
    ) -> tuple[DecodeState, Optional[list[RowEnd]], Iterator[int]]:
        """Start a batch: its state, its RowEnds, and the loop's steps, which run as they are iterated.

        With streams (one per prompt), every row is followed step by step by a RowEnd that feeds its stream;
        without, the loop runs on the device alone and rows is None (``_end_rows`` then finds the ends).
        """
        state = self._start(prompt_tokens, max_gen_len, logprobs)
        rows = None
        on_step = None
        if streams is not None:
            rows = [RowEnd(max_gen_len, self.tokenizer.stop_ids, stream) for stream in streams]
            on_step = self._feed_rows(state, rows)
        return state, rows, self._decode(state, temperature, top_p, on_step)

    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: Optional[int],
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt (a list of token ids) by up to max_gen_len tokens (None: up to max_seq_len).

        max_gen_len=0 generates nothing: with logprobs=True, echo=True it returns each prompt with the
        log-probability of its tokens, from one forward pass (as researchers use the reference for).

        Returns the generated token ids of each prompt (with the prompt in front if echo), cut before the first
        stop id (Llama 2: EOS), and, if logprobs, the log-probability under the model of each returned token
        (0.0 for the first prompt token, which nothing predicts).
        """
        tokens, logprobs_, _, _ = self._complete(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, None)
        return tokens, logprobs_

    def _complete(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: Optional[int],
        temperature: float,
        top_p: float,
        logprobs: bool,
        echo: bool,
        stop: Optional[Sequence[str]],
        echo_text: Optional[bool] = None,
    ) -> tuple[List[List[int]], Optional[List[List[float]]], List[RowEnd], Optional[List[TextStream]]]:
        """Token ids, logprobs, end and (with stop strings) text stream of each completion.

        echo_text: whether the text streams hold the prompt's text too (default: echo); a chat answer's do not.
        """
        prompts, max_gen_len, stop = self._prepare(prompt_tokens, max_gen_len, temperature, top_p, stop)
        echo_text = echo if echo_text is None else echo_text
        streams = [TextStream(self.tokenizer, stop, prefix=t if echo_text else ()) for t in prompts] if stop else None
        with self._lock:  # the whole batch: another thread's call waits for the KV cache
            state, rows, steps = self._run(prompts, max_gen_len, temperature, top_p, logprobs, streams)
            for _ in steps:
                pass
        if rows is None:
            rows = self._end_rows(state.tokens[:, : state.filled].tolist(), state.prompt_lens, max_gen_len)
        tokens, logprobs_ = self._results(state, max_gen_len, echo, rows)
        return tokens, logprobs_, rows, streams

    def _texts(self, tokens: List[List[int]], streams: Optional[List[TextStream]]) -> List[str]:
        """The text of each completion: its stream's (cut before a stop string), else its tokens decoded."""
        if streams is None:
            return [self.tokenizer.decode(t) for t in tokens]
        return [stream.final_text() for stream in streams]

    def _stream(
        self,
        prompt_tokens: List[int],
        temperature: float,
        top_p: float,
        max_gen_len: Optional[int],
        stop: Optional[List[str]],
    ) -> Generator[str, None, Optional[int]]:
        """Check the arguments now, then return a generator of text deltas for one prompt (``_stream_deltas``)."""
        prompts, max_gen_len, stop = self._prepare([prompt_tokens], max_gen_len, temperature, top_p, stop, stream=True)
        return self._stream_deltas(prompts, max_gen_len, temperature, top_p, TextStream(self.tokenizer, stop))

    def _stream_deltas(
        self, prompts: list[list[int]], max_gen_len: int, temperature: float, top_p: float, stream: TextStream
    ) -> Generator[str, None, Optional[int]]:
        """Yield the text deltas of one prompt's row; return the stop id that ended it (None if none did)."""
        with self._lock:
            _, rows, steps = self._run(prompts, max_gen_len, temperature, top_p, False, [stream])
        while True:
            with self._lock:  # one step at a time: a batch call in another thread runs between two steps
                if next(steps, None) is None:
                    break
            piece = stream.delta()
            if piece:
                yield piece
        piece = stream.delta(final=True)
        if piece:
            yield piece
        return rows[0].stop_id

    # ------------------------------------------------------------------ text and chat

    def _chat_format(self) -> ChatFormat:
        if self.formatter is None:
            raise TypeError(
                f"this Llama has no chat format: its {type(self.tokenizer).__name__} belongs to no family in "
                "llama.families; pass formatter= to Llama(...)"
            )
        return self.formatter

    def _default_gen_len(self, max_gen_len: Optional[int]) -> int:
        return self.model.params.max_seq_len - 1 if max_gen_len is None else max_gen_len

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        stop: Optional[List[str]] = None,
    ) -> List[CompletionPrediction]:
        """Complete each prompt string; see ``generate`` for the arguments.

        stop: strings that end a row's generation as soon as its text contains one; the returned text ends
        right before the first of them. Other rows go on.
        """
        _check_prompt_strings(prompts)
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        tokens, logprobs_, _, streams = self._complete(
            prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, stop
        )
        texts = self._texts(tokens, streams)
        if logprobs:
            return [
                {"generation": text, "tokens": [self.tokenizer.decode([x]) for x in t], "logprobs": lp}
                for text, t, lp in zip(texts, tokens, logprobs_)
            ]
        return [{"generation": text} for text in texts]

    def text_completion_stream(
        self,
        prompt: str,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        stop: Optional[List[str]] = None,
    ) -> Iterator[str]:
        """Yield the completion of one prompt as text deltas, as its tokens are generated.

        The deltas join to exactly the ``generation`` that ``text_completion([prompt], ...)`` returns with the
        same arguments and seed. A delta never holds half of a multi-byte character, nor text that could still
        turn out to begin a stop string.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        return self._stream(self.tokenizer.encode(prompt, bos=True, eos=False), temperature, top_p, max_gen_len, stop)

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        stop: Optional[List[str]] = None,
        echo: bool = False,
    ) -> List[ChatPrediction]:
        """Answer the last user message of each dialog as the assistant, in the chat format of the model's
        generation (``generator.formatter``).

        stop: as for ``text_completion``.
        echo: with logprobs, "tokens" and "logprobs" start with the dialog's prompt tokens (the chat format's
            encoding of it) and their log-probabilities, as ``text_completion``'s do; ``generation`` stays the
            answer alone. ``max_gen_len=0, logprobs=True, echo=True`` scores each dialog's prompt.

        Nothing raises after generation: whatever text the model produced becomes a message
        (``formatter.decode_answer``), which the next dialog accepts as an assistant message.
        """
        if not isinstance(dialogs, (list, tuple)):
            raise TypeError("dialogs must be a list of dialogs (each a list of {'role', 'content'} messages)")
        formatter = self._chat_format()
        prompt_tokens = [formatter.encode_dialog_prompt(dialog) for dialog in dialogs]
        refusals = [formatter.refusal(dialog) for dialog in dialogs]
        tokens, logprobs_, rows, streams = self._complete(
            prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, stop, echo_text=False
        )
        answers = [t[len(p) :] for t, p in zip(tokens, prompt_tokens)] if echo else tokens
        texts = self._texts(answers, streams)
        results: List[ChatPrediction] = []
        for i, t in enumerate(tokens):
            answer = refusals[i] if refusals[i] is not None else texts[i]
            stop_reason = formatter.stop_reason(rows[i].stop_id)
            result: ChatPrediction = {"generation": formatter.decode_answer(answer, stop_reason)}
            if logprobs:
                result["tokens"] = [self.tokenizer.decode([x]) for x in t]
                result["logprobs"] = logprobs_[i]
            results.append(result)
        return results

    def chat_completion_stream(
        self,
        dialog: Dialog,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        stop: Optional[List[str]] = None,
    ) -> ChatStream:
        """The assistant's answer to one dialog as it is generated: a ``ChatStream``.

        Iterate it for str deltas of the answer's content; they join to exactly the ``content`` of the message
        that ``chat_completion([dialog], ...)`` returns with the same arguments and seed. Once they are exhausted,
        its ``message`` is that whole message (with Llama 3, ``stop_reason`` and ``tool_calls``): keep it, not the
        joined deltas, as the assistant's turn of the dialog. An answer that is a tool call streams no text; see
        ``ChatStream`` for the one case of a call written after some text.
        """
        formatter = self._chat_format()
        prompt_tokens = formatter.encode_dialog_prompt(dialog)
        refusal = formatter.refusal(dialog)
        if refusal is not None:
            check_stop(stop)
            return ChatStream(formatter, iter([refusal]))
        return ChatStream(formatter, self._stream(prompt_tokens, temperature, top_p, max_gen_len, stop))


def _check_prompt_strings(prompts: List[str]) -> None:
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of str (wrap a single prompt in a list)")
