"""The Llama 2 transformer, written to match Meta's reference implementation.

Parameter names follow Meta's checkpoints (``tok_embeddings``, ``layers.N.attention.wq`` ...), so a
``consolidated.NN.pth`` loads with strict key checking. The numerics are the reference's: RMSNorm, RoPE and
the attention softmax run in fp32, and logits are returned as fp32.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from torch import nn

from llama.model.args import ModelArgs, ffn_hidden_dim
from llama.model.kv_cache import kv_cache_shape
from llama.model.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    _keep,
    apply_rotary_emb,
    precompute_freqs_cis,
    repeat_kv,
)

logger = logging.getLogger(__name__)


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
