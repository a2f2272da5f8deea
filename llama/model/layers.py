"""The layers Meta's model is made of: RMSNorm, RoPE (complex ``freqs_cis``) and fairscale's parallel layers."""

from __future__ import annotations

import math
from typing import Any, Optional

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fs_layers
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (the reference's precision island), then scale in the input dtype.
        return self._norm(x.float()).type_as(x) * self.weight


def scale_rope_frequencies(
    freqs: torch.Tensor,
    scale_factor: float = 8.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_context: int = 8192,
) -> torch.Tensor:
    """Llama 3.1's RoPE scaling of the inverse frequencies, with Meta's reference values as defaults.

    Frequencies whose wavelength is longer than original_context / low_freq_factor are divided by scale_factor;
    those shorter than original_context / high_freq_factor are kept; in between, the two are blended linearly
    in original_context / wavelength.
    """
    wavelen = 2 * math.pi / freqs
    slow = original_context / low_freq_factor  # wavelengths beyond this are slowed down fully
    fast = original_context / high_freq_factor  # wavelengths below this are kept
    scaled = torch.where(wavelen > slow, freqs / scale_factor, freqs)
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / scale_factor + smooth * scaled
    return torch.where((wavelen >= fast) & (wavelen <= slow), blended, scaled)


def precompute_freqs_cis(
    dim: int, end: int, theta: float = 10000.0, use_scaled: bool = False, scale_factor: Optional[float] = None
) -> torch.Tensor:
    """Rotations e^{i * t * theta^(-2k/dim)} for positions t < end, as complex64 of shape (end, dim // 2).

    use_scaled: scale the frequencies as Llama 3.1 does (``scale_rope_frequencies``, factor 8 unless given).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    if use_scaled:
        inv_freq = scale_rope_frequencies(inv_freq, 8.0 if scale_factor is None else scale_factor)
    t = torch.arange(end, dtype=torch.float32)
    angles = torch.outer(t, inv_freq)  # (end, dim // 2)
    return torch.polar(torch.ones_like(angles), angles)


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # freqs_cis: (seqlen, head_dim // 2); x: (bsz, seqlen, n_heads, head_dim // 2) -> (1, seqlen, 1, head_dim // 2)
    if freqs_cis.shape != (x.shape[1], x.shape[-1]):
        raise ValueError(f"freqs_cis shape {tuple(freqs_cis.shape)} does not fit input shape {tuple(x.shape)}")
    shape = [d if i in (1, x.ndim - 1) else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


def apply_rotary_emb(
    xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate adjacent pairs (x[2k], x[2k+1]) of q and k, viewed as complex numbers, in fp32."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = reshape_for_broadcast(freqs_cis, xq_)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(bsz, seqlen, n_kv_heads, head_dim) -> (bsz, seqlen, n_kv_heads * n_rep, head_dim), each head n_rep times."""
    bsz, seqlen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (
        x[:, :, :, None, :]
        .expand(bsz, seqlen, n_kv_heads, n_rep, head_dim)
        .reshape(bsz, seqlen, n_kv_heads * n_rep, head_dim)
    )


def _keep(x: torch.Tensor) -> torch.Tensor:
    # The checkpoint provides every weight, so the parallel layers need no random initialisation.
    return x


class _OneRankShortcut:
    """Mixin for fairscale's parallel layers: with one model-parallel rank, run only the local math.

    There, fairscale's copy/reduce/gather steps are identities, but each is an autograd Function that costs
    10 to 25 us a call. A decoded token of a 16-layer model makes over a hundred such calls, about 1.5 ms on
    the CPU we measured. With more ranks the layers run fairscale's own forward.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.one_rank = fs_init.get_model_parallel_world_size() == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_forward(x) if self.one_rank else super().forward(x)  # type: ignore[misc]


class ColumnParallelLinear(_OneRankShortcut, fs_layers.ColumnParallelLinear):
    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(_OneRankShortcut, fs_layers.RowParallelLinear):
    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)  # the bias is added after the (here empty) reduction, as fairscale does
        return out if self.bias is None else out + self.bias


class ParallelEmbedding(_OneRankShortcut, fs_layers.ParallelEmbedding):
    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)  # fmt: skip


class VocabParallelEmbedding(_OneRankShortcut, fs_layers.VocabParallelEmbedding):
    """Llama 3's embedding: ranks split the vocabulary (rows) rather than the embedding columns."""

    local_forward = ParallelEmbedding.local_forward


