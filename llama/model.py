"""The Llama 2 transformer, written to match Meta's reference implementation.

Parameter names follow Meta's checkpoints (``tok_embeddings``, ``layers.N.attention.wq`` ...), so a
``consolidated.NN.pth`` loads with strict key checking. The numerics are the reference's: RMSNorm, RoPE and
the attention softmax run in fp32, and logits are returned as fp32.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fs_layers
from torch import nn

from llama.checks import check_positive_int, is_int

logger = logging.getLogger(__name__)


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # filled in from the tokenizer by Llama.build
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False  # Llama 3.1 and later: Meta's frequency scaling for long contexts
    rope_scaling_factor: Optional[float] = None  # None: Meta's reference value, 8 (see scale_rope_frequencies)

    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "multiple_of", "max_batch_size", "max_seq_len"):
            check_positive_int(f"ModelArgs.{name}", getattr(self, name))
        if self.n_kv_heads is not None:
            check_positive_int("ModelArgs.n_kv_heads", self.n_kv_heads)
        if not is_int(self.vocab_size):
            raise ValueError(f"ModelArgs.vocab_size must be an integer, got {self.vocab_size!r}")
        # NaN compares false with everything, so without the finiteness test a NaN norm_eps would pass.
        if not isinstance(self.use_scaled_rope, bool):
            raise ValueError(f"ModelArgs.use_scaled_rope must be true or false, got {self.use_scaled_rope!r}")
        for name in ("norm_eps", "rope_theta", "ffn_dim_multiplier", "rope_scaling_factor"):
            value = getattr(self, name)
            if name in ("ffn_dim_multiplier", "rope_scaling_factor") and value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 < value < math.inf):
                allowed = " or None" if name in ("ffn_dim_multiplier", "rope_scaling_factor") else ""
                raise ValueError(f"ModelArgs.{name} must be a finite positive number{allowed}, got {value!r}")
        # Meta's code reads no factor without use_scaled_rope (none of its params.json files has one), so a factor
        # given alone would be silently ignored: the model computed would not be the one asked for.
        if self.rope_scaling_factor is not None and not self.use_scaled_rope:
            raise ValueError(
                f"rope_scaling_factor={self.rope_scaling_factor!r} is given but use_scaled_rope is false: the factor "
                "only scales Llama 3.1's RoPE, so it would be ignored; set \"use_scaled_rope\": true in params.json "
                "(ModelArgs.use_scaled_rope=True) to scale the frequencies, or drop rope_scaling_factor"
            )
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(
                f"head dim dim/n_heads = {self.dim // self.n_heads} must be even for rotary embeddings"
            )
        if self.n_heads % self.kv_heads != 0:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_params(cls, params: Mapping[str, Any], **overrides: Any) -> ModelArgs:
        """Build from a ``params.json`` dict. A key this class does not know is refused: it may change the math
        (Llama 3.1's use_scaled_rope did), and ignoring it would silently compute another model."""
        # Without these the 7B model's defaults would be used, and the error would be about something else.
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params and k not in overrides]
        if missing:
            raise ValueError(f"params.json lacks {', '.join(map(repr, missing))}, which the model needs")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(
                f"params.json holds keys this version of the library does not know: {', '.join(unknown)}; "
                f"it supports {', '.join(known)}"
            )
        return cls(**{**params, **overrides})


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


def causal_mask(seqlen: int, start_pos: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask of shape (seqlen, start_pos + seqlen) for queries at positions start_pos..start_pos+seqlen-1.

    Every query sees all cached positions (zeros over the first start_pos columns) and the causal triangle of the
    new ones. The older reference mask, ``triu(full((seqlen, seqlen)), diagonal=start_pos + 1)``, had the wrong
    width whenever seqlen > 1 and start_pos > 0 (chunked prefill); this one does not.
    """
    mask = torch.full((seqlen, seqlen), float("-inf"), device=device)
    mask = torch.triu(mask, diagonal=1)
    mask = torch.hstack([torch.zeros((seqlen, start_pos), device=device), mask])
    return mask.to(dtype)


def kv_cache_shape(args: ModelArgs, mp_size: int) -> tuple[int, int, int, int]:
    """One rank's cache_k (or cache_v) of one layer: (max_batch_size, max_seq_len, n_local_kv_heads, head_dim).

    Each rank holds its share of the KV heads, and one KV head when there are more ranks than KV heads (see
    ``Attention``).
    """
    n_local_kv_heads = args.kv_heads * max(1, mp_size // args.kv_heads) // mp_size
    return (args.max_batch_size, args.max_seq_len, n_local_kv_heads, args.head_dim)


def kv_cache_bytes(args: ModelArgs, mp_size: int, dtype: torch.dtype) -> int:
    """Bytes of one rank's KV cache: keys and values of every layer, for max_batch_size rows of max_seq_len."""
    return 2 * args.n_layers * math.prod(kv_cache_shape(args, mp_size)) * dtype.itemsize


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        mp_size = fs_init.get_model_parallel_world_size()
        self.n_kv_heads = args.kv_heads
        # With more ranks than KV heads, each rank holds the one KV head its query heads share, so wk and wv
        # are built kv_repeats times larger and each KV head is repeated over kv_repeats ranks (as Meta's loader
        # repeats them). Otherwise kv_repeats is 1 and this is the reference's attention.
        self.kv_repeats = max(1, mp_size // self.n_kv_heads)
        self.n_local_heads = args.n_heads // mp_size
        cache_shape = kv_cache_shape(args, mp_size)  # (max_batch_size, max_seq_len, n_local_kv_heads, head_dim)
        self.n_local_kv_heads = cache_shape[2]
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.head_dim

        q_dim, kv_dim = args.n_heads * self.head_dim, self.n_kv_heads * self.kv_repeats * self.head_dim
        self.wq = ColumnParallelLinear(args.dim, q_dim, bias=False, gather_output=False, init_method=_keep)
        self.wk = ColumnParallelLinear(args.dim, kv_dim, bias=False, gather_output=False, init_method=_keep)
        self.wv = ColumnParallelLinear(args.dim, kv_dim, bias=False, gather_output=False, init_method=_keep)
        self.wo = RowParallelLinear(q_dim, args.dim, bias=False, input_is_parallel=True, init_method=_keep)

        # The KV cache follows the module through .to(device, dtype) and never enters state_dict().
        self.register_buffer("cache_k", torch.zeros(cache_shape), persistent=False)
        self.register_buffer("cache_v", torch.zeros(cache_shape), persistent=False)

    def update_cache(
        self, xk: torch.Tensor, xv: torch.Tensor, start_pos: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys and values (bsz, seqlen, n_local_kv_heads, head_dim) at positions start_pos... of the KV
        cache; return this batch's whole cache_k and cache_v, (bsz, max_seq_len, n_local_kv_heads, head_dim).

        The one way both paths write the cache. start_pos is an int on the faithful path, or a 1-element long
        tensor on the fast path, whose compiled step takes the position as data rather than as a shape.
        """
        bsz, seqlen = xk.shape[:2]
        cache_k, cache_v = self.cache_k[:bsz], self.cache_v[:bsz]
        if isinstance(start_pos, torch.Tensor):
            cache_k.index_copy_(1, start_pos, xk)
            cache_v.index_copy_(1, start_pos, xv)
        else:
            cache_k[:, start_pos : start_pos + seqlen] = xk
            cache_v[:, start_pos : start_pos + seqlen] = xv
        return cache_k, cache_v

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int,
        freqs_cis: torch.Tensor,
        mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        xq = xq.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)

        cache_k, cache_v = self.update_cache(xk, xv, start_pos)
        keys = cache_k[:, : start_pos + seqlen]  # (bsz, cache_len + seqlen, n_local_kv_heads, head_dim)
        values = cache_v[:, : start_pos + seqlen]
        keys = repeat_kv(keys, self.n_rep)  # (bsz, cache_len + seqlen, n_local_heads, head_dim)
        values = repeat_kv(values, self.n_rep)

        xq = xq.transpose(1, 2)  # (bsz, n_local_heads, seqlen, head_dim)
        keys = keys.transpose(1, 2)
        values = values.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask  # (bsz, n_local_heads, seqlen, cache_len + seqlen)
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        output = torch.matmul(scores, values)  # (bsz, n_local_heads, seqlen, head_dim)
        output = output.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.wo(output)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """The reference's SwiGLU hidden size: 2/3 of 4*dim, optionally scaled, rounded up to multiple_of."""
    hidden_dim = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_keep)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=_keep)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier))
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    # How ranks split the embedding: Llama 2's checkpoints split its columns; Llama3Transformer splits the vocab.
    embedding_cls: type = ParallelEmbedding

    def __init__(self, params: ModelArgs):
        super().__init__()
        # fairscale's layers ask for the model-parallel group and would fail on a bare assert without one.
        if not fs_init.model_parallel_is_initialized():
            raise RuntimeError(
                "no model-parallel process group: call llama.distributed.setup_model_parallel(None, device) "
                "before building a Transformer yourself (Llama.build does it)"
            )
        if params.vocab_size < 1:
            raise ValueError(
                f"vocab_size must be set to the tokenizer's size before building the model, got {params.vocab_size}"
            )
        check_model_parallel_fit(params, fs_init.get_model_parallel_world_size(), repeat_kv_heads=True)
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers

        self.tok_embeddings = self.embedding_cls(params.vocab_size, params.dim, init_method=_keep)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, bias=False, init_method=_keep)

        # Positions up to 2 * max_seq_len, as the reference. Kept out of the buffers on purpose: Module.to(dtype)
        # would cast this complex tensor to a real dtype and drop its imaginary part.
        self.freqs_cis = precompute_freqs_cis(
            params.head_dim, params.max_seq_len * 2, params.rope_theta, params.use_scaled_rope,
            params.rope_scaling_factor,
        )  # fmt: skip

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Logits (bsz, seqlen, vocab_size) in fp32 for tokens (bsz, seqlen) placed at positions start_pos...

        Keys and values of these positions are written to the KV cache, so later calls can continue from
        start_pos + seqlen.
        """
        bsz, seqlen = tokens.shape
        h = self.tok_embeddings(tokens)
        if self.freqs_cis.device != h.device:
            self.freqs_cis = self.freqs_cis.to(h.device)
        freqs_cis = self.freqs_cis[start_pos : start_pos + seqlen]

        mask = None
        if seqlen > 1:
            mask = causal_mask(seqlen, start_pos, tokens.device, h.dtype)
        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis, mask)
        h = self.norm(h)
        return self.output(h).float()


class Llama3Transformer(Transformer):
    """Llama 3.x: the same model, with the vocabulary-parallel embedding of Meta's Llama 3 checkpoints."""

    embedding_cls = VocabParallelEmbedding


def check_model_parallel_fit(params: ModelArgs, mp_size: int, repeat_kv_heads: bool = False) -> None:
    """Raise a ValueError naming the usable sizes when the model cannot be split over mp_size ranks.

    Heads, KV heads, dim (embedding columns), the SwiGLU hidden size and the vocabulary (output rows) are
    all split across model-parallel ranks, so each must divide evenly. repeat_kv_heads: a running model may
    use more ranks than KV heads (a multiple of them), each KV head repeated on several ranks; a checkpoint
    file cannot (its shards hold each head once).
    """

    def fits(n: int) -> bool:
        kv_ok = params.kv_heads % n == 0 or (repeat_kv_heads and n % params.kv_heads == 0)
        return kv_ok and all(size % n == 0 for name, size in sizes.items() if name != "n_kv_heads")

    sizes = {
        "n_heads": params.n_heads,
        "n_kv_heads": params.kv_heads,
        "dim": params.dim,
        "ffn hidden size": ffn_hidden_dim(params.dim, params.multiple_of, params.ffn_dim_multiplier),
        "vocab_size": params.vocab_size,
    }
    if fits(mp_size):
        return
    bad = [f"{name}={size}" for name, size in sizes.items() if size % mp_size != 0]
    most = params.n_heads if repeat_kv_heads else params.kv_heads
    usable = [n for n in range(1, most + 1) if fits(n)]
    raise ValueError(
        f"the model cannot be split over {mp_size} model-parallel processes ({', '.join(bad)} not divisible); "
        f"use a model-parallel size in {usable}"
    )
