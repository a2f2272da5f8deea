"""The statistics of ``llama-perplexity --kl-divergence`` (llama.cpp), from per-token values, and a file of a base
model's log-probabilities to compare against later.

For every scored position t of the text (the same chunks and positions as the perplexity), with q the model under
test and p the base model:

- nll(t) = -log q(x_t), nll_base(t) = -log p(x_t), x_t the text's next token;
- KLD(t) = sum_v p(v) (log p(v) - log q(v)), the divergence of q's next-token distribution from p's;
- same_top(t): q and p put their highest probability on the same token (the first of equal ones, as llama.cpp);
- dp(t) = q(x_t) - p(x_t): how much the probability of the text's next token moved. (llama.cpp calls it Δp; it is
  the probability of the token the text has next, not of either model's top token.)

``KLStats.report()`` prints what llama.cpp prints at the end of a run, with its estimators: the mean of a value
with its standard error sqrt((E[x^2] - E[x]^2) / (n - 1)) (reported as 0 with 10 values or fewer), the
covariance of ln PPL(Q) and ln PPL(base) for the uncertainty of their ratio, percentiles interpolated linearly
between sorted values. Unlike llama.cpp, the base's log-probabilities are exact fp32 values, not 16-bit codes
of the last 16 nats (so no term of the KLD is dropped), and every sum is taken in float64.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional, Sequence

import torch


def mean_and_uncertainty(values: torch.Tensor) -> tuple[float, float]:
    """(mean, standard error of the mean) of values as llama.cpp estimates them: 0 uncertainty for 10 values or
    fewer, or where the variance rounds to 0 or below."""
    count = values.numel()
    if count < 1:
        return 0.0, 0.0
    values = values.double()
    mean = float(values.mean())
    variance = float((values * values).mean()) - mean * mean
    return mean, math.sqrt(variance / (count - 1)) if variance > 0 and count > 10 else 0.0


def covariance_of_means(a: torch.Tensor, b: torch.Tensor) -> float:
    """The covariance of the means of a and b (paired values), as llama.cpp's; 0 for fewer than 10 pairs."""
    count = a.numel()
    if count < 10:
        return 0.0
    a, b = a.double(), b.double()
    return (float((a * b).mean()) - float(a.mean()) * float(b.mean())) / (count - 1)


def percentile(sorted_values: torch.Tensor, fraction: float) -> float:
    """The value at fraction of sorted_values, interpolated between the two nearest (llama.cpp's, numpy's
    'linear')."""
    n = sorted_values.numel()
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    position = fraction * (n - 1)
    low = int(position)
    high = min(low + 1, n - 1)
    weight = position - low
    return (1 - weight) * float(sorted_values[low]) + weight * float(sorted_values[high])


def token_kl_values(
    logits: torch.Tensor, base_logprobs: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-position values of the model under test (logits (n, vocab)) against the base (its log-probabilities
    (n, vocab)) for the text's next tokens targets (n,): nll, nll_base, kld, dp, same_top. The log-probabilities
    are taken in fp32 (as the base's are, live or saved, so a model against itself gives exactly 0), the rest in
    float64."""
    logprobs = torch.log_softmax(logits.float(), dim=-1).double()
    base = base_logprobs.double()
    index = targets.view(-1, 1)
    nll = -logprobs.gather(1, index).squeeze(1)
    nll_base = -base.gather(1, index).squeeze(1)
    kld = (base.exp() * (base - logprobs)).sum(dim=-1)
    same_top = logits.argmax(dim=-1) == base_logprobs.argmax(dim=-1)
    return {"nll": nll, "nll_base": nll_base, "kld": kld, "dp": (-nll).exp() - (-nll_base).exp(), "same_top": same_top}


class KLStats:
    """Collects ``token_kl_values`` over a run; ``report()`` gives llama.cpp's summary."""

    KEYS = ("nll", "nll_base", "kld", "dp", "same_top")

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {key: [] for key in self.KEYS}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for key in self.KEYS:
            self.parts[key].append(values[key].cpu())

    def values(self, key: str) -> torch.Tensor:
        parts = self.parts[key]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    @property
    def count(self) -> int:
        return sum(p.numel() for p in self.parts["nll"])

    def summary(self) -> dict[str, float]:
        """The figures llama.cpp reports, by name (ppl, ppl_base, their uncertainties, the ratio, the KLD's mean,
        uncertainty and percentiles, dp's mean, RMS and percentiles, same_top's share)."""
        nll, nll_base, kld, dp = (self.values(k) for k in ("nll", "nll_base", "kld", "dp"))
        same_top = self.values("same_top").double()
        count = nll.numel()
        out: dict[str, float] = {"count": float(count)}
        log_ppl, log_ppl_unc = mean_and_uncertainty(nll)
        log_base, log_base_unc = mean_and_uncertainty(nll_base)
        cov = covariance_of_means(nll, nll_base)
        out["ppl"], out["ppl_unc"] = math.exp(log_ppl), math.exp(log_ppl) * log_ppl_unc
        out["ppl_base"], out["ppl_base_unc"] = math.exp(log_base), math.exp(log_base) * log_base_unc
        out["log_ppl_cor"] = cov / (log_ppl_unc * log_base_unc) if log_ppl_unc * log_base_unc > 0 else float("nan")
        ratio_unc = math.sqrt(max(log_ppl_unc**2 + log_base_unc**2 - 2 * cov, 0.0))
        out["log_ppl_ratio"], out["log_ppl_ratio_unc"] = log_ppl - log_base, ratio_unc
        out["ppl_ratio"] = math.exp(log_ppl - log_base)
        out["ppl_ratio_unc"] = out["ppl_ratio"] * ratio_unc
        ppl_cov = out["ppl"] * out["ppl_base"] * cov
        out["ppl_diff"] = out["ppl"] - out["ppl_base"]
        out["ppl_diff_unc"] = math.sqrt(max(out["ppl_unc"] ** 2 + out["ppl_base_unc"] ** 2 - 2 * ppl_cov, 0.0))
        out["kld"], out["kld_unc"] = mean_and_uncertainty(kld)
        out["dp"], out["dp_unc"] = mean_and_uncertainty(dp)
        mse, mse_unc = mean_and_uncertainty(dp * dp)
        out["dp_rms"] = math.sqrt(mse)
        out["dp_rms_unc"] = 0.5 / out["dp_rms"] * mse_unc if out["dp_rms"] > 0 else 0.0
        share = float(same_top.mean()) if count else 0.0
        out["same_top"] = share
        out["same_top_unc"] = math.sqrt(share * (1 - share) / (count - 1)) if count > 1 else 0.0
        for name, values in (("kld", kld), ("dp", dp)):
            ordered = values.double().sort().values
            for label, fraction in PERCENTILES[name]:
                out[f"{name}_{label}"] = percentile(ordered, fraction) if count else float("nan")
        return out

    def report(self) -> str:
        """llama.cpp's three closing sections (perplexity, KL divergence, token probability statistics)."""
        s = self.summary()
        lines = [
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {s['ppl']:10.6f} ± {s['ppl_unc']:10.6f}",
            f"Mean PPL(base)                : {s['ppl_base']:10.6f} ± {s['ppl_base_unc']:10.6f}",
            f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s['log_ppl_cor']:6.2f}%",
            f"Mean ln(PPL(Q)/PPL(base))     : {s['log_ppl_ratio']:10.6f} ± {s['log_ppl_ratio_unc']:10.6f}",
            f"Mean PPL(Q)/PPL(base)         : {s['ppl_ratio']:10.6f} ± {s['ppl_ratio_unc']:10.6f}",
            f"Mean PPL(Q)-PPL(base)         : {s['ppl_diff']:10.6f} ± {s['ppl_diff_unc']:10.6f}",
            "",
            "====== KL divergence statistics ======",
            f"Mean    KLD: {s['kld']:10.6f} ± {s['kld_unc']:10.6f}",
        ]
        lines += [f"{_label(label)} KLD: {s['kld_' + label]:10.6f}" for label, _ in PERCENTILES["kld"]]
        lines += [
            "",
            "====== Token probability statistics ======",
            f"Mean    Δp: {100 * s['dp']:6.3f} ± {100 * s['dp_unc']:5.3f} %",
        ]
        lines += [f"{_label(label)} Δp: {100 * s['dp_' + label]:6.3f}%" for label, _ in PERCENTILES["dp"]]
        lines += [
            f"RMS Δp    : {100 * s['dp_rms']:6.3f} ± {100 * s['dp_rms_unc']:5.3f} %",
            f"Same top p: {100 * s['same_top']:6.3f} ± {100 * s['same_top_unc']:5.3f} %",
        ]
        return "\n".join(lines)


# The percentiles llama.cpp lists, top down: (label, fraction)
_COMMON = [("max", 1.0), ("99.9", 0.999), ("99.0", 0.99), ("95.0", 0.95), ("90.0", 0.9)]
_LOW = [("10.0", 0.1), ("5.0", 0.05), ("1.0", 0.01), ("0.1", 0.001), ("min", 0.0)]
PERCENTILES = {
    "kld": _COMMON + [("median", 0.5)] + _LOW,
    "dp": _COMMON + [("75.0", 0.75), ("median", 0.5), ("25.0", 0.25)] + _LOW,
}


def _label(label: str) -> str:
    names = {"max": "Maximum", "min": "Minimum", "median": "Median "}
    return names.get(label, f"{label + '%':>6} ")


# ---------------------------------------------------------------- a base model's log-probabilities, saved

MAGIC = b"LLAMA-LOGPROBS-1\n"


@dataclass
class LogProbHeader:
    """What a saved run scored: the text's tokens, the windows' settings and the vocabulary."""

    tokens: list[int]
    ctx: int
    stride: Optional[int]
    vocab_size: int
    count: int  # scored positions, each one row of vocab_size float32 log-probabilities


class LogProbWriter:
    """Writes a base model's log-probabilities, row after row, as the run scores them: a header line of JSON after
    MAGIC, then float32 rows (4 bytes x vocabulary per scored token)."""

    def __init__(self, path: str | os.PathLike, header: LogProbHeader):
        self.path = Path(path)
        self.file: BinaryIO = open(self.path, "wb")  # noqa: SIM115  (closed by close())
        meta = {"tokens": header.tokens, "ctx": header.ctx, "stride": header.stride,
                "vocab_size": header.vocab_size, "count": header.count}  # fmt: skip
        self.file.write(MAGIC + json.dumps(meta).encode() + b"\n")

    def write(self, logprobs: torch.Tensor) -> None:
        self.file.write(logprobs.float().cpu().contiguous().numpy().tobytes())

    def close(self) -> None:
        self.file.close()


class LogProbReader:
    """Reads a file of LogProbWriter's back, row block by row block, in the order it was written."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.file: BinaryIO = open(self.path, "rb")  # noqa: SIM115  (closed by close())
        if self.file.read(len(MAGIC)) != MAGIC:
            self.file.close()
            raise ValueError(f"{str(self.path)!r} is not a file of base log-probabilities written by "
                             "python -m llama.eval perplexity --save_logprobs")  # fmt: skip
        meta = json.loads(self.file.readline())
        self.header = LogProbHeader(meta["tokens"], meta["ctx"], meta["stride"], meta["vocab_size"], meta["count"])
        size = self.path.stat().st_size - self.file.tell()
        if size != self.header.count * self.header.vocab_size * 4:
            self.file.close()
            raise ValueError(f"{str(self.path)!r} is cut short: it holds {size} bytes of log-probabilities, its "
                             f"header says {self.header.count} x {self.header.vocab_size} float32 values")  # fmt: skip

    def read(self, rows: int) -> torch.Tensor:
        data = self.file.read(rows * self.header.vocab_size * 4)
        return torch.frombuffer(bytearray(data), dtype=torch.float32).view(rows, self.header.vocab_size)

    def close(self) -> None:
        self.file.close()


def check_same_run(header: LogProbHeader, tokens: Sequence[int], ctx: int, stride: Optional[int], vocab: int) -> None:
    """ValueError unless a saved base run scored the same tokens with the same windows and vocabulary."""
    if header.vocab_size != vocab:
        raise ValueError(f"the base log-probabilities are over a vocabulary of {header.vocab_size} tokens, the model's "
                         f"has {vocab}: KL divergence compares two models of the same vocabulary")  # fmt: skip
    if (header.ctx, header.stride) != (ctx, stride):
        raise ValueError(f"the base log-probabilities were computed with --ctx {header.ctx} --stride {header.stride}, "
                         f"this run has --ctx {ctx} --stride {stride}: give the same settings")  # fmt: skip
    if list(header.tokens) != list(tokens):
        raise ValueError("the base log-probabilities were computed on other tokens (another text or tokenizer): "
                         "give the same --text and --tokenizer_path as the base run")  # fmt: skip
