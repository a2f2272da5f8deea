"""The layers Meta's model is made of: RMSNorm, RoPE (complex ``freqs_cis``) and fairscale's parallel layers,
each of which declares how model-parallel ranks split its weight (``split_dims``)."""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fs_layers
from torch import nn

from llama.kernels import pages


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

    def kernel_operands(self) -> tuple[torch.Tensor, float]:
        """(weight, eps): what a kernel computing this norm itself reads (the C step of ``llama.engine.cpu_decode``)."""
        return self.weight, self.eps


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
    # freqs_cis: (seqlen, head_dim // 2), the same positions for every row; x: (bsz, seqlen, n_heads, head_dim // 2)
    # -> (1, seqlen, 1, head_dim // 2). Or (bsz, seqlen, head_dim // 2), each row at its own positions (rows of a
    # continuous batch) -> (bsz, seqlen, 1, head_dim // 2): the same products, row by row.
    if freqs_cis.shape not in ((x.shape[1], x.shape[-1]), (x.shape[0], x.shape[1], x.shape[-1])):
        raise ValueError(f"freqs_cis shape {tuple(freqs_cis.shape)} does not fit input shape {tuple(x.shape)}")
    if freqs_cis.ndim == 3:
        return freqs_cis.unsqueeze(2)
    shape = [d if i in (1, x.ndim - 1) else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


def apply_rotary_emb(
    xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate adjacent pairs (x[2k], x[2k+1]) of q and k, viewed as complex numbers, in fp32 (freqs_cis: see
    ``reshape_for_broadcast``)."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = reshape_for_broadcast(freqs_cis, xq_)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def rope_cos_sin(freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (end, head_dim // 2) of the rotations in a complex freqs_cis (end, head_dim // 2), in fp32."""
    return freqs_cis.real.contiguous(), freqs_cis.imag.contiguous()


def apply_rotary_emb_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary_emb`` with real cos/sin tables (``rope_cos_sin``), which ``torch.compile`` and C kernels take
    where complex numbers are awkward: adjacent pairs (x[2k], x[2k+1]) rotated in fp32, equal to the complex form
    within rounding (tested).

    x: (bsz, seqlen, n_heads, head_dim); cos, sin: (seqlen, head_dim // 2), or (bsz, seqlen, head_dim // 2) with
    each row at its own positions.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    even, odd = xf[..., 0], xf[..., 1]  # (bsz, seqlen, n_heads, head_dim // 2)
    cos, sin = (cos[:, :, None, :], sin[:, :, None, :]) if cos.ndim == 3 else (cos[None, :, None], sin[None, :, None])
    out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return out.flatten(-2).type_as(x)


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


def repeat_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(bsz, n_kv_heads, a, b) -> (bsz, n_kv_heads * n_rep, a, b), each head n_rep times in place, as one contiguous
    tensor: ``repeat_kv``'s repetition for tensors whose heads come before the positions (``attention``)."""
    bsz, n_kv_heads, a, b = x.shape
    return x[:, :, None].expand(bsz, n_kv_heads, n_rep, a, b).reshape(bsz, n_kv_heads * n_rep, a, b).contiguous()


def split_dim_of(module: nn.Module, name: str) -> Optional[int]:
    """The dimension along which model-parallel ranks split `module`'s own tensor `name` ("weight"), as the module
    declares it in ``split_dims``; None for a tensor that every rank holds whole (a module that declares none)."""
    return getattr(module, "split_dims", {}).get(name)


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


class _LocalProducts:
    """Mixin for the float parallel linear layers: what the fast path needs to compute their local product with a
    kernel of its choosing (``product``), call a C kernel on their weight (``kernel_operands``) and stack layers that
    read one input into one product (``stack``)."""

    def product(self, x: torch.Tensor, matmul: Callable[..., torch.Tensor] = F.linear) -> torch.Tensor:
        """This rank's product of x by the weight, as matmul(x, weight) computes it (``F.linear``, or a faster
        kernel the caller picked), the bias added after it: ``local_forward`` with another kernel."""
        out = matmul(x, self.weight)
        return out if self.bias is None else out + self.bias

    def kernel_operands(self) -> LinearOperands:
        """The weight (n, k) of y = x @ weight.T, for a kernel that reads it by address; the bias is not in it."""
        n, k = self.weight.shape
        return LinearOperands(self.weight, None, n, k, 0)

    @classmethod
    def stack(cls, parts: Sequence[nn.Module]) -> Optional[StackedLinear]:
        """Bias-free layers of this class that read one input, as one column-parallel layer whose weight is theirs
        stacked along the outputs (one product instead of several), or None where they differ in dtype or input
        size. For one model-parallel rank. The parts' weights become views of the stacked one: nothing is held
        twice, their values and ``state_dict()`` stay as they were, and every other path computes what it did."""
        weights = [getattr(p, "weight", None) for p in parts]
        first = weights[0]
        alike = all(type(p) is cls and p.bias is None and isinstance(w, torch.Tensor) and w.ndim == 2
                    and (w.dtype, w.shape[1]) == (first.dtype, first.shape[1])
                    for p, w in zip(parts, weights))  # fmt: skip
        if not alike:
            return None
        with torch.no_grad():
            weight = stack_rows(weights)
        sizes = tuple(w.shape[0] for w in weights)
        for p, w, view in zip(parts, weights, weight.split(sizes)):
            p.weight = nn.Parameter(view, requires_grad=w.requires_grad)
        with torch.device("meta"):  # the constructor's own weight would only be replaced
            layer = ColumnParallelLinear(weight.shape[1], weight.shape[0], bias=False, gather_output=False,
                                         init_method=_keep)  # fmt: skip
        layer.weight = nn.Parameter(weight, requires_grad=first.requires_grad)
        return StackedLinear(layer, tuple(parts), sizes)


class ColumnParallelLinear(_LocalProducts, _OneRankShortcut, fs_layers.ColumnParallelLinear):
    # Each module states which of its tensors model-parallel ranks split, and along which dimension (read by
    # llama.weights.layout); a module that declares none is held whole by every rank (the norms).
    split_dims = {"weight": 0, "bias": 0}  # the output rows (and their biases)

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(_LocalProducts, _OneRankShortcut, fs_layers.RowParallelLinear):
    split_dims = {"weight": 1}  # the input columns

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)  # the bias is added after the (here empty) reduction, as fairscale does
        return out if self.bias is None else out + self.bias


class ParallelEmbedding(_OneRankShortcut, fs_layers.ParallelEmbedding):
    split_dims = {"weight": 1}  # the embedding columns (Llama 2's checkpoints)

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)  # fmt: skip


class VocabParallelEmbedding(_OneRankShortcut, fs_layers.VocabParallelEmbedding):
    """Llama 3's embedding: ranks split the vocabulary (rows) rather than the embedding columns."""

    split_dims = {"weight": 0}
    local_forward = ParallelEmbedding.local_forward


# ------------------------------------------------------------------------------------- operands for kernels


class LinearOperands(NamedTuple):
    """What a C kernel reads of a linear layer y = x @ W.T, with W of n rows of k inputs: its tensors (by address)
    and sizes. weight: the float weight (n, k), or quantized codes; scales: the quantized codes' scales (None for
    float weights); group_size: inputs per scale (0 for float weights)."""

    weight: torch.Tensor
    scales: Optional[torch.Tensor]
    n: int
    k: int
    group_size: int


class StackedLinear(NamedTuple):
    """Linear layers that read one input (``parts``), as one layer of their kind (``layer``) whose outputs are
    theirs side by side, ``sizes`` wide each (see ``_LocalProducts.stack``)."""

    layer: nn.Module
    parts: tuple[nn.Module, ...]
    sizes: tuple[int, ...]

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each part's output, from the stacked layer's output y."""
        return y.split(self.sizes, dim=-1)


def stack_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-D tensors concatenated along the rows: a view where they already lie one after another in one storage
    (layers stacked before, by another decoder), else a new tensor."""
    first = tensors[0]
    offsets = [first.storage_offset() + sum(t.numel() for t in tensors[:i]) for i in range(len(tensors))]
    adjacent = all(t.is_contiguous() and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                   and t.storage_offset() == offset for t, offset in zip(tensors, offsets))  # fmt: skip
    if not adjacent:
        if first.device.type == "cpu" and pages.available():  # decoding streams it: 2 MB pages (llama.kernels.pages)
            rows = sum(t.shape[0] for t in tensors)
            return torch.cat(list(tensors), out=pages.empty(rows * first.shape[1], first.dtype).view(rows, -1))
        return torch.cat(list(tensors))
    rows = sum(t.shape[0] for t in tensors)
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(
        first.untyped_storage(), first.storage_offset(), (rows, first.shape[1])
    )


def stack_linears(parts: Sequence[nn.Module]) -> Optional[StackedLinear]:
    """Linear layers that read one input as one stacked layer, by their class's ``stack`` (float layers here,
    quantized ones in ``llama.quant``); None where they are of different kinds or do not stack."""
    stack = getattr(type(parts[0]), "stack", None)
    return None if stack is None else stack(parts)
