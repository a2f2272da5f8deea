"""Choosing the next token and scoring tokens: plain functions of logits, shared by every decoding path."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose probability reaches p (nucleus sampling).

    probs: (bsz, vocab). The token whose cumulative probability crosses p is kept. Returns (bsz, 1) token ids.
    generator: where the random draws come from (None: torch's global generator, as in the reference).
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p  # mass strictly before this token already exceeds p
    probs_sort.masked_fill_(mask, 0.0)  # not probs_sort[mask] = 0: boolean indexing would sync with the host
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def select_next_token(
    last_logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Next token ids (bsz,) from the logits (bsz, vocab) of the last position: greedy at temperature 0.
    generator: as for ``sample_top_p``."""
    # Unlike the reference, which divides the logits themselves: logits / 1e-45 overflows to inf and the
    # softmax to NaN. Shifted so that the largest is 0, every scaled logit is 0 or negative (at worst -inf, a
    # probability of 0), so the probabilities stay finite for any temperature the dtype can hold; one too small
    # to hold (below its smallest normal number) would make 0 / 0, and is the limit it tends to: greedy.
    if temperature >= torch.finfo(last_logits.dtype).tiny:
        shifted = last_logits - last_logits.max(dim=-1, keepdim=True).values
        probs = torch.softmax(shifted / temperature, dim=-1)
        return sample_top_p(probs, top_p, generator).reshape(-1)
    return torch.argmax(last_logits, dim=-1).reshape(-1)


def token_logprobs_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[:, j]) under logits[:, j]: logits (bsz, n, vocab), targets (bsz, n) -> (bsz, n)."""
    return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
