"""Perplexity and KL divergence of a checkpoint on a text, as llama.cpp's ``llama-perplexity`` computes them:
``python -m llama.eval perplexity --help``.

The text is tokenized whole, with BOS in front (as llama.cpp's ``common_tokenize(..., add_special=true)``), then:

- chunks (default, llama.cpp's method): the tokens are cut into ``len // ctx`` non-overlapping chunks of ctx tokens
  (the rest is dropped). Each chunk is fed from position 0 with its first token replaced by BOS; only the second
  half is scored: the logits at positions ctx/2 .. ctx-2 predict the chunk's tokens ctx/2 + 1 .. ctx-1, so every
  scored token sees at least ctx/2 tokens of context, and each chunk scores ctx - 1 - ctx/2 tokens.
- stride (``--stride S``, the plain sliding window of Hugging Face's perplexity guide): windows of ctx tokens
  starting every S tokens, fed as they are (no BOS replaced); each token after the first is scored exactly once,
  in the first window that holds it at its end, so with at least ctx - S tokens of context (the first window's
  tokens with less). S = ctx gives disjoint windows that score every token.

PPL = exp(mean nll) over the scored tokens, with llama.cpp's uncertainty PPL * sqrt((E[nll^2] - E[nll]^2) /
(count - 1)), printed as llama.cpp prints it: ``Final estimate: PPL = 12.3456 +/- 0.12345``.

Windows run through the model in batches of ``batch_size`` (``Transformer.forward(tokens, 0)``; with
``compile=True``, ``FastDecoder.prefill``, see ``forward_logits``). Under torchrun every rank runs the same calls
on its slice of the model and rank 0 prints.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

import torch

from llama.checks import check_positive_int, parse_dtype
from llama.distributed import is_main_process
from llama.eval.kld import KLStats, LogProbHeader, LogProbReader, LogProbWriter, check_same_run, token_kl_values
from llama.quant.scheme import MODES

if TYPE_CHECKING:
    from llama.generation import Llama

logger = logging.getLogger(__name__)

DEFAULT_CTX = 512  # llama-perplexity's default context


@dataclass(frozen=True)
class Window:
    """tokens[start:end] fed from position 0 (the first replaced by BOS if bos); the logits at positions
    first_scored .. end - start - 2 score the tokens start + first_scored + 1 .. end - 1."""

    start: int
    end: int
    first_scored: int
    bos: bool

    @property
    def n_scored(self) -> int:
        return self.end - self.start - 1 - self.first_scored


def chunk_windows(n_tokens: int, ctx: int) -> list[Window]:
    """llama.cpp's chunks: n_tokens // ctx chunks of ctx tokens, BOS first, the second half scored."""
    return [Window(i * ctx, (i + 1) * ctx, ctx // 2, True) for i in range(n_tokens // ctx)]


def stride_windows(n_tokens: int, ctx: int, stride: int) -> list[Window]:
    """Windows of ctx tokens every stride tokens, up to the text's end; each token after the first scored once."""
    windows, begin, next_target = [], 0, 1
    while True:
        end = min(begin + ctx, n_tokens)
        windows.append(Window(begin, end, next_target - begin - 1, False))
        next_target = end
        if end == n_tokens:
            return windows
        begin += stride


def check_settings(n_tokens: int, ctx: int, stride: Optional[int], max_seq_len: int) -> None:
    """ValueError for a ctx the model cannot hold, a stride outside [1, ctx], or a text shorter than two chunks."""
    ctx = check_positive_int("ctx", ctx)
    if ctx < 3:
        raise ValueError(f"ctx must be at least 3 (a chunk scores ctx - 1 - ctx // 2 tokens), got {ctx}")
    if ctx > max_seq_len:
        raise ValueError(f"ctx {ctx} is larger than the model's max_seq_len {max_seq_len}: build the Llama with "
                         f"max_seq_len >= {ctx}, or give a smaller --ctx")  # fmt: skip
    if stride is not None and not (check_positive_int("stride", stride) <= ctx):
        raise ValueError(f"stride must be in [1, ctx] = [1, {ctx}], got {stride}")
    if n_tokens < 2 * ctx:
        raise ValueError(f"the text is {n_tokens} tokens long, shorter than two chunks of ctx {ctx} ({2 * ctx} "
                         "tokens, as llama-perplexity requires): give a longer text or a smaller --ctx")  # fmt: skip


def windows_for(n_tokens: int, ctx: int, stride: Optional[int]) -> list[Window]:
    return chunk_windows(n_tokens, ctx) if stride is None else stride_windows(n_tokens, ctx, stride)


@torch.inference_mode()
def forward_logits(generator: Llama, tokens: torch.Tensor, fast: bool) -> torch.Tensor:
    """Logits (bsz, seqlen, vocab) in fp32 of tokens (bsz, seqlen) from position 0, holding the generator's lock on
    its KV cache. fast: the fast path's prefill (``FastDecoder.prefill``: on CPUs, products with half-precision
    weights in fp32 and attention in fp32, so its bf16 numbers are the faithful path's within bf16 rounding);
    otherwise the model's own forward, the reference's numbers."""
    with generator.engine.lock:
        if fast:
            return generator.fast.prefill(tokens, 0)
        return generator.model.forward(tokens, 0)


@dataclass
class Scored:
    """One window's scored positions: logits (n, vocab) fp32 and the text's next tokens targets (n,)."""

    window: Window
    logits: torch.Tensor
    targets: torch.Tensor


def scored_windows(
    generator: Llama, tokens: Sequence[int], windows: Sequence[Window], batch_size: int, fast: bool
) -> Iterator[Scored]:
    """Each window's scored logits, running batch_size windows a forward pass (windows of one length together;
    shorter rows are padded after their end, which the causal mask keeps out of their logits)."""
    device = generator.device
    text = torch.tensor(tokens, dtype=torch.long)
    bos = generator.tokenizer.bos_id
    for first in range(0, len(windows), batch_size):
        batch = windows[first : first + batch_size]
        width = max(w.end - w.start for w in batch)
        grid = torch.zeros((len(batch), width), dtype=torch.long)
        for row, w in enumerate(batch):
            grid[row, : w.end - w.start] = text[w.start : w.end]
            if w.bos:
                grid[row, 0] = bos
        logits = forward_logits(generator, grid.to(device), fast)
        for row, w in enumerate(batch):
            last = w.end - w.start - 1
            yield Scored(w, logits[row, w.first_scored : last].float(), text[w.start + w.first_scored + 1 : w.end])


def nll_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per row, in float64 (llama.cpp sums exp in double too)."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return -logprobs.gather(1, targets.to(logits.device).view(-1, 1)).squeeze(1)


@dataclass
class PerplexityResult:
    """A perplexity run: PPL with llama.cpp's uncertainty, and every scored token's nll (float64) in text order."""

    ppl: float
    uncertainty: float
    nlls: torch.Tensor
    n_windows: int
    ctx: int
    stride: Optional[int]
    seconds: float = 0.0
    kl: Optional[KLStats] = field(default=None, repr=False)

    @property
    def count(self) -> int:
        return self.nlls.numel()

    def line(self) -> str:
        return f"Final estimate: PPL = {self.ppl:.4f} +/- {self.uncertainty:.5f}"


def ppl_with_uncertainty(nlls: torch.Tensor) -> tuple[float, float]:
    """(exp(mean nll), llama.cpp's uncertainty of it: ppl * sqrt((E[nll^2] - E[nll]^2) / (count - 1)))."""
    nlls = nlls.double()
    mean = float(nlls.mean())
    variance = float((nlls * nlls).mean()) - mean * mean
    ppl = math.exp(mean)
    return ppl, ppl * math.sqrt(variance / (nlls.numel() - 1)) if variance > 0 and nlls.numel() > 1 else float("nan")


def text_tokens(generator: Llama, text: str) -> list[int]:
    """The text's tokens with BOS in front, as llama-perplexity tokenizes it."""
    return generator.tokenizer.encode(text, bos=True, eos=False)


def perplexity(
    generator: Llama,
    text: str | Sequence[int],
    ctx: int = DEFAULT_CTX,
    stride: Optional[int] = None,
    batch_size: Optional[int] = None,
    fast: Optional[bool] = None,
    base: Optional[Llama | str | os.PathLike] = None,
    save_logprobs: Optional[str | os.PathLike] = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of generator's model on text (a str, or its token ids with BOS first), llama.cpp's way (see the
    module's docstring); with base, also the KL divergence from the base model (``result.kl``).

    Args:
        ctx: tokens per chunk (window); at most the generator's max_seq_len.
        stride: None for llama.cpp's chunks; else the sliding window's step, in [1, ctx].
        batch_size: windows per forward pass; default and at most the generator's max_batch_size.
        fast: use the fast path's prefill (default: where the generator has one, i.e. ``compile=True``).
        base: a Llama of the base model (same vocabulary; fed the same tokens), or a file of its log-probabilities
            written by ``save_logprobs``: the KL divergence of this model's distributions from the base's.
        save_logprobs: write this model's log-probabilities of every scored position to this file, to serve as
            ``base`` later (4 bytes x vocabulary per scored token).
        progress: a progress bar with the ETA on stderr (rank 0 only).
    """
    tokens = text_tokens(generator, text) if isinstance(text, str) else [int(t) for t in text]
    params = generator.model.params
    check_settings(len(tokens), ctx, stride, params.max_seq_len)
    batch_size = params.max_batch_size if batch_size is None else check_positive_int("batch_size", batch_size)
    if batch_size > params.max_batch_size:
        raise ValueError(f"batch_size {batch_size} is larger than the model's max_batch_size {params.max_batch_size}: "
                         "build the Llama with a larger max_batch_size, or give a smaller --batch_size")  # fmt: skip
    fast = generator.fast is not None if fast is None else bool(fast)
    if fast and generator.fast is None:
        raise ValueError("fast=True needs a generator built with compile=True (it has no fast path)")
    windows = windows_for(len(tokens), ctx, stride)
    total = sum(w.n_scored for w in windows)
    base_model, reader, stats = None, None, None
    if base is not None:
        stats = KLStats()
        if isinstance(base, (str, os.PathLike)):
            reader = LogProbReader(base)
            check_same_run(reader.header, tokens, ctx, stride, params.vocab_size)
        else:
            base_model = base
            if base_model.model.params.vocab_size != params.vocab_size:
                raise ValueError(f"the base model's vocabulary has {base_model.model.params.vocab_size} tokens, the "
                                 f"model's {params.vocab_size}: KL divergence compares two models of the same "
                                 "vocabulary (and tokenizer)")  # fmt: skip
    writer = None
    if save_logprobs is not None:
        writer = LogProbWriter(save_logprobs, LogProbHeader(tokens, ctx, stride, params.vocab_size, total))
    base_batches = None
    if base_model is not None:
        base_fast = base_model.fast is not None and fast
        base_batches = scored_windows(base_model, tokens, windows, batch_size, base_fast)
    bar = Progress(len(windows), "kl-divergence" if stats is not None else "perplexity", progress)
    nlls: list[torch.Tensor] = []
    running = [0.0, 0]  # summed nll, count: the bar's running perplexity
    start = time.perf_counter()
    try:
        for scored in scored_windows(generator, tokens, windows, batch_size, fast):
            nll = nll_of(scored.logits, scored.targets)
            nlls.append(nll.cpu())
            if writer is not None:
                writer.write(torch.log_softmax(scored.logits, dim=-1))
            if stats is not None:
                if reader is not None:
                    base_logprobs = reader.read(scored.targets.numel())
                else:
                    base_logprobs = torch.log_softmax(next(base_batches).logits, dim=-1)
                stats.add(token_kl_values(scored.logits, base_logprobs.to(scored.logits.device), scored.targets))
            running[0] += float(nll.sum())
            running[1] += nll.numel()
            bar(math.exp(running[0] / running[1]))
    finally:
        if writer is not None:
            writer.close()
        if reader is not None:
            reader.close()
        bar.close()
    seconds = time.perf_counter() - start
    all_nlls = torch.cat(nlls)
    ppl, uncertainty = ppl_with_uncertainty(all_nlls)
    return PerplexityResult(ppl, uncertainty, all_nlls, len(windows), ctx, stride, seconds, stats)


class Progress:
    """A tqdm bar with ETA on stderr (a plain count line where tqdm is not installed), on rank 0 only;
    called once per window with the running perplexity."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.bar = None
        self.fallback: Optional[Callable[[float], None]] = None
        if not enabled or not is_main_process():
            return
        try:
            from tqdm import tqdm
        except ImportError:  # the eval extra brings tqdm; without it, a line per 10% with no ETA
            self.done, self.total = 0, total
            self.fallback = self._line
            return
        self.bar = tqdm(total=total, desc=label, unit="chunk", file=sys.stderr, dynamic_ncols=True)

    def _line(self, ppl: float) -> None:
        self.done += 1
        if self.done == self.total or self.done % max(1, self.total // 10) == 0:
            print(f"{self.done}/{self.total} chunks, PPL so far {ppl:.4f}", file=sys.stderr, flush=True)

    def __call__(self, ppl: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(ppl=f"{ppl:.4f}", refresh=False)
            self.bar.update(1)
        elif self.fallback is not None:
            self.fallback(ppl)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- the command line


def default_tokenizer_path(ckpt_dir: str) -> str:
    """The folder's own tokenizer.model (Llama 3, the demo model), else the one next to it (Meta's Llama 2 layout)."""
    for candidate in (Path(ckpt_dir) / "tokenizer.model", Path(ckpt_dir).parent / "tokenizer.model"):
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"no tokenizer.model in {ckpt_dir!r} or next to it: give --tokenizer_path")


def main(
    ckpt_dir: str,
    text: str,
    tokenizer_path: Optional[str] = None,
    ctx: int = DEFAULT_CTX,
    stride: Optional[int] = None,
    batch_size: int = 1,
    quantize: Optional[str] = None,
    compile: bool = False,
    dtype: Optional[str] = None,
    device: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    kl_divergence: Optional[str] = None,
    base_dtype: Optional[str] = None,
    save_logprobs: Optional[str] = None,
) -> None:
    """Perplexity of a checkpoint on a text file, computed as llama.cpp's llama-perplexity does.

    Chunks (default): the text's tokens (BOS first) are cut into non-overlapping chunks of --ctx tokens; each chunk
    starts with BOS in place of its first token, and only its second half is scored, so every scored token has at
    least ctx/2 tokens of context. The figures compare with llama.cpp's on the same text and ctx.
    --stride S: a plain sliding window instead: windows of ctx tokens every S tokens, fed as they are, scoring each
    token once (with at least ctx - S tokens of context), as in Hugging Face's perplexity guide.

    Prints "Final estimate: PPL = x +/- u" (u: llama.cpp's uncertainty); with --kl_divergence, llama.cpp's
    perplexity, KL divergence and token probability statistics against a base model.

    Args:
        ckpt_dir: checkpoint folder (float or written by python -m llama.quantize).
        text: a UTF-8 text file; it must hold at least two chunks (2 x ctx tokens).
        tokenizer_path: default: ckpt_dir/tokenizer.model, else the one next to ckpt_dir.
        ctx: tokens per chunk (llama.cpp's -c; default 512).
        stride: sliding-window step in [1, ctx]; default: llama.cpp's chunks.
        batch_size: chunks per forward pass.
        quantize: int8 or int4: quantize the float checkpoint while loading it.
        compile: the fast path's prefill (on CPUs: products and attention in fp32; in fp32 the same numbers as the
            default path within rounding).
        dtype: float32, float16 or bfloat16 (default: bfloat16 on CPUs, float16 on CUDA).
        device: cpu, cuda or cuda:N.
        max_seq_len: the model's KV cache length; default ctx, and never smaller than ctx.
        kl_divergence: a base model's checkpoint folder (same vocabulary; loaded too, with the same tokenizer and
            the same device), or a file written by --save_logprobs: report the KL divergence from it.
        base_dtype: the base model's dtype (default: --dtype).
        save_logprobs: write the log-probabilities of every scored token to this file (4 bytes x vocabulary each),
            for a later --kl_divergence FILE run on the same text and ctx.
    """
    check_main_args(ckpt_dir, text, tokenizer_path, ctx, stride, batch_size, quantize, dtype, max_seq_len,
                    kl_divergence, base_dtype, save_logprobs)  # fmt: skip
    from llama.generation import Llama

    tokenizer_path = tokenizer_path or default_tokenizer_path(ckpt_dir)
    document = Path(text).read_text(encoding="utf-8")
    build = dict(max_seq_len=max_seq_len or ctx, max_batch_size=batch_size, device=device)
    generator = Llama.build(ckpt_dir, tokenizer_path, dtype=parse_dtype(dtype), quantize=quantize, compile=compile,
                            **build)  # fmt: skip
    base = None
    if kl_divergence is not None:
        if Path(kl_divergence).is_dir():
            base = Llama.build(kl_divergence, tokenizer_path, dtype=parse_dtype(base_dtype or dtype), **build)
        else:
            base = kl_divergence
    tokens = text_tokens(generator, document)
    if is_main_process():
        print(f"perplexity: {len(tokens)} tokens, ctx {ctx}, "
              + (f"stride {stride}" if stride else f"{len(tokens) // ctx} chunks"), file=sys.stderr)  # fmt: skip
    result = perplexity(generator, tokens, ctx, stride, batch_size, base=base, save_logprobs=save_logprobs,
                        progress=True)  # fmt: skip
    if not is_main_process():
        return
    print(f"perplexity: {result.count} tokens scored in {result.seconds:.2f} s "
          f"({result.n_windows * ctx / max(result.seconds, 1e-9):.1f} tokens/s fed)", file=sys.stderr)  # fmt: skip
    if result.kl is not None:
        print(result.kl.report())
    print(result.line())


def check_main_args(
    ckpt_dir: str, text: str, tokenizer_path: Optional[str], ctx: int, stride: Optional[int], batch_size: int,
    quantize: Optional[str], dtype: Optional[str], max_seq_len: Optional[int], kl_divergence: Optional[str],
    base_dtype: Optional[str], save_logprobs: Optional[str],
) -> None:  # fmt: skip
    """Every flag of ``main`` checked before anything is loaded (ValueError / FileNotFoundError naming it)."""
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"--ckpt_dir {ckpt_dir!r} is not a folder")
    if not Path(text).is_file():
        raise FileNotFoundError(f"--text {text!r} is not a file")
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise FileNotFoundError(f"--tokenizer_path {tokenizer_path!r} is not a file")
    ctx = check_positive_int("ctx", ctx)
    check_positive_int("batch_size", batch_size)
    if max_seq_len is not None and ctx > check_positive_int("max_seq_len", max_seq_len):
        raise ValueError(f"--ctx {ctx} is larger than --max_seq_len {max_seq_len}: the model holds at most "
                         "max_seq_len tokens; raise --max_seq_len or lower --ctx")  # fmt: skip
    if ctx < 3:
        raise ValueError(f"--ctx must be at least 3 (a chunk scores ctx - 1 - ctx // 2 tokens), got {ctx}")
    if stride is not None and not 1 <= check_positive_int("stride", stride) <= ctx:
        raise ValueError(f"--stride must be in [1, ctx] = [1, {ctx}], got {stride}")
    if quantize is not None and quantize not in MODES:
        raise ValueError(f"--quantize must be one of {', '.join(MODES)}, got {quantize!r}")
    parse_dtype(dtype)
    parse_dtype(base_dtype)
    if kl_divergence is not None and not Path(kl_divergence).exists():
        raise FileNotFoundError(f"--kl_divergence {kl_divergence!r}: no such folder (a base checkpoint) or file "
                                "(written by --save_logprobs)")  # fmt: skip
    if kl_divergence is not None and save_logprobs is not None:
        raise ValueError("give --save_logprobs on the base model's run and --kl_divergence on the other's, not both")
    if save_logprobs is not None and Path(save_logprobs).exists():
        raise FileExistsError(f"--save_logprobs {save_logprobs!r} exists; choose a new file")
