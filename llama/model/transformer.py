"""The Llama 2 transformer, written to match Meta's reference implementation.

Parameter names follow Meta's checkpoints (``tok_embeddings``, ``layers.N.attention.wq`` ...), so a
``consolidated.NN.pth`` loads with strict key checking. The numerics are the reference's: RMSNorm, RoPE and
the attention softmax run in fp32, and logits are returned as fp32.

This is the only Python transformer block. How a block computes its products, its rotations and its attention is
a ``BlockOps``: the reference's by default; the fast path (``llama.engine.fast``) and the demo's training
(``tools/train_demo.py``) run these same blocks with ops of their own.
"""

from __future__ import annotations

import functools
import logging
import math
import platform
from typing import Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from torch import nn

from llama.model.args import ModelArgs, ffn_hidden_dim
from llama.model.kv_cache import CacheRows, KVCache, kv_cache_shape
from llama.model.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RMSNorm,
    RowParallelLinear,
    StackedLinear,
    VocabParallelEmbedding,
    _keep,
    apply_rotary_emb,
    precompute_freqs_cis,
    repeat_heads,
    repeat_kv,
    stack_linears,
)

logger = logging.getLogger(__name__)

ATTENTION_LENGTH_STEP = 64  # forward_rows' attention lengths for several rows are multiples of this


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


def rows_mask(at: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (bsz, 1, seqlen, length) for rows whose queries sit at positions at (bsz, seqlen): each query
    sees the positions up to its own. For one row it is ``causal_mask``'s (zeros for a single query)."""
    keys = torch.arange(length, device=at.device)
    mask = torch.zeros(at.shape + (length,), device=at.device)
    return mask.masked_fill_(keys > at[..., None], float("-inf")).unsqueeze(1).to(dtype)


def attention(xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The reference's attention of queries xq (bsz, seqlen, n_local_heads, head_dim) over keys and values (bsz,
    cache_len + seqlen, n_local_kv_heads, head_dim), mask added to the scores; (bsz, seqlen, n_local_heads,
    head_dim). Query head h reads KV head h // n_rep."""
    bsz, seqlen, n_heads, head_dim = xq.shape
    n_kv_heads, length = keys.shape[2], keys.shape[1]
    n_rep = n_heads // n_kv_heads
    xq = xq.transpose(1, 2)  # (bsz, n_local_heads, seqlen, head_dim)
    if _matmuls_take_contiguous_operands(bsz, n_heads, seqlen, head_dim, length, keys.dtype, keys.device):
        # The reference's products on the tensors its matmuls multiply: they would copy their strided operands
        # into these contiguous ones, so the keys are repeated once, transposed at n_kv_heads (not n_heads) and
        # without the reference's copies, which cost most at long caches (the same bits: tested).
        keys_t = keys.permute(0, 2, 3, 1)  # (bsz, n_local_kv_heads, head_dim, cache_len + seqlen), a view
        keys_t = repeat_heads(keys_t.contiguous() if n_rep > 1 else keys_t, n_rep)  # (.., n_local_heads, ..)
        values = repeat_heads(values.transpose(1, 2), n_rep)  # (bsz, n_local_heads, cache_len + seqlen, head_dim)
    else:
        keys = repeat_kv(keys, n_rep)  # (bsz, cache_len + seqlen, n_local_heads, head_dim)
        values = repeat_kv(values, n_rep).transpose(1, 2)
        keys_t = keys.transpose(1, 2).transpose(2, 3)
    scores = torch.matmul(xq, keys_t) / math.sqrt(head_dim)
    if mask is not None:
        scores = scores + mask  # (bsz, n_local_heads, seqlen, cache_len + seqlen)
    scores = F.softmax(scores.float(), dim=-1).type_as(xq)
    output = torch.matmul(scores, values)  # (bsz, n_local_heads, seqlen, head_dim)
    return output.transpose(1, 2)


def _matmuls_take_contiguous_operands(
    bsz: int, n_heads: int, seqlen: int, head_dim: int, length: int, dtype: torch.dtype, device: torch.device
) -> bool:
    """Whether both of the reference attention's matmuls multiply contiguous copies of its repeated keys and values
    (batch (bsz * n_heads) of (head_dim, length) and of (length, head_dim)), never the strided views themselves.

    torch.matmul folds (bsz, n_heads) into one batch dimension, which copies the views when bsz > 1 (unless a
    dimension is 1). With one row, the views reach bmm, which copies them on its oneDNN route (bf16 CPU products
    of more than 16**3 multiply-adds, torch 2.x) and multiplies them as they are on its other routes (fp32 and
    fp16 through BLAS with strides, small products), where other strides could change the bits. False leaves
    the reference's steps as they are.
    """
    if length == 1 or n_heads == 1:  # the views are contiguous, or transposed forms that oneDNN takes as they are
        return False
    if bsz > 1:
        return True
    return (
        dtype == torch.bfloat16
        and device.type == "cpu"
        and bsz * n_heads * seqlen * head_dim * length > 16**3
        and torch.backends.mkldnn.enabled
        and _cpu_runs_bf16_matmuls_with_onednn()
    )


@functools.cache
def _cpu_runs_bf16_matmuls_with_onednn() -> bool:
    """torch's test for sending bf16 matmuls to oneDNN on this CPU (x86 with AVX-512 or AVX-NE-CONVERT)."""
    return (
        platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.mkldnn.is_available()
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


# The rotations of a call's positions: the complex freqs_cis (seqlen, head_dim // 2) for the reference's ops, or
# whatever form another path's ops.rotate takes (the fast path: real cos and sin tables).
Rotations = Union[torch.Tensor, tuple[torch.Tensor, ...]]


class BlockOps:
    """How a block computes what varies between paths, the reference's way: each layer's own forward, RoPE with
    the complex ``freqs_cis``, and ``attention``. Another path subclasses it and passes its ops to the same blocks
    (``TransformerBlock.forward(..., ops)``): the fast path's products by C kernels on stacked weights, its real
    RoPE tables and one-query attention; the demo's training with causal SDPA."""

    def linear(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """layer's output for x."""
        return layer(x)

    def linears(self, x: torch.Tensor, *layers: nn.Module) -> tuple[torch.Tensor, ...]:
        """The outputs for x of layers that all read it (wq, wk, wv; or w1, w3), in their order."""
        return tuple(layer(x) for layer in layers)

    def rotate(self, xq: torch.Tensor, xk: torch.Tensor, freqs_cis: Rotations) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys (bsz, seqlen, heads, head_dim) rotated by the rotations of their positions."""
        return apply_rotary_emb(xq, xk, freqs_cis)

    def attend(
        self, xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Attention output (bsz, seqlen, n_local_heads, head_dim) of queries over the keys and values
        ``KVCache.update`` returned."""
        return attention(xq, keys, values, mask)


REFERENCE = BlockOps()


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, kv_cache: bool = True):
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
        self.head_dim = args.head_dim

        q_dim, kv_dim = args.n_heads * self.head_dim, self.n_kv_heads * self.kv_repeats * self.head_dim
        self.wq = ColumnParallelLinear(args.dim, q_dim, bias=False, gather_output=False, init_method=_keep)
        self.wk = ColumnParallelLinear(args.dim, kv_dim, bias=False, gather_output=False, init_method=_keep)
        self.wv = ColumnParallelLinear(args.dim, kv_dim, bias=False, gather_output=False, init_method=_keep)
        self.wo = RowParallelLinear(q_dim, args.dim, bias=False, input_is_parallel=True, init_method=_keep)

        # The one owner of this layer's cached keys and values. Without one (training over whole sequences), each
        # call attends over its own tokens only.
        self.kv_cache = KVCache(*cache_shape) if kv_cache else None

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int | torch.Tensor | CacheRows,
        freqs_cis: Rotations,
        mask: Optional[torch.Tensor],
        ops: BlockOps = REFERENCE,
    ) -> torch.Tensor:
        """Attention output (bsz, seqlen, dim) for x (bsz, seqlen, dim) at positions start_pos... (an int, or the
        position tensors ``KVCache.update`` takes), whose keys and values go into the KV cache. freqs_cis: the
        rotations of these positions, in the form ops.rotate takes; mask: added to the scores (or what ops.attend
        takes instead)."""
        bsz, seqlen, _ = x.shape
        xq, xk, xv = ops.linears(x, self.wq, self.wk, self.wv)
        xq = xq.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq, xk = ops.rotate(xq, xk, freqs_cis)

        # (bsz, cache_len + seqlen, n_local_kv_heads, head_dim); the whole cache for a position tensor
        cache = self.kv_cache
        keys, values = (xk, xv) if cache is None else cache.update(start_pos, xk, xv)
        output = ops.attend(xq, keys, values, mask)  # (bsz, seqlen, n_local_heads, head_dim)
        output = output.contiguous().view(bsz, seqlen, -1)
        return ops.linear(output, self.wo)

    def heads(self) -> tuple[int, int, int]:
        """(query heads, KV heads, head_dim) on this rank: how a kernel computing this attention groups heads."""
        return self.n_local_heads, self.n_local_kv_heads, self.head_dim

    def stack_projections(self) -> Optional[StackedLinear]:
        """wq, wk and wv as one layer (``stack_linears``: their weights become views of its weight), for paths
        that make one product of them (``ops.linears`` gets them in this order); None where they do not stack."""
        return stack_linears((self.wq, self.wk, self.wv))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_keep)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=_keep)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_keep)

    def forward(self, x: torch.Tensor, ops: BlockOps = REFERENCE) -> torch.Tensor:
        gate, up = ops.linears(x, self.w1, self.w3)
        return ops.linear(F.silu(gate) * up, self.w2)

    def stack_projections(self) -> Optional[StackedLinear]:
        """w1 and w3 as one layer (see ``Attention.stack_projections``); None where they do not stack."""
        return stack_linears((self.w1, self.w3))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, kv_cache: bool = True):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, kv_cache)
        self.feed_forward = FeedForward(args.dim, ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier))
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int | torch.Tensor | CacheRows,
        freqs_cis: Rotations,
        mask: Optional[torch.Tensor],
        ops: BlockOps = REFERENCE,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask, ops)
        return h + self.feed_forward(self.ffn_norm(h), ops)

    def stack_projections(self) -> Optional[tuple[StackedLinear, StackedLinear]]:
        """(wq|wk|wv, w1|w3) stacked (see ``Attention.stack_projections``); None unless both stack."""
        qkv, w13 = self.attention.stack_projections(), self.feed_forward.stack_projections()
        return None if qkv is None or w13 is None else (qkv, w13)


class Transformer(nn.Module):
    # How ranks split the embedding: Llama 2's checkpoints split its columns; Llama3Transformer splits the vocab.
    embedding_cls: type = ParallelEmbedding

    def __init__(self, params: ModelArgs, kv_cache: bool = True):
        """kv_cache=False: no KV cache, for training over whole sequences (``tools/train_demo.py``), which calls
        ``logits`` with start_pos 0 (``forward`` needs the cache)."""
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
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers

        self.tok_embeddings = self.embedding_cls(params.vocab_size, params.dim, init_method=_keep)
        self.layers = nn.ModuleList(TransformerBlock(i, params, kv_cache) for i in range(params.n_layers))
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
        freqs_cis = self._freqs_cis_on(h.device)[start_pos : start_pos + seqlen]

        mask = None
        if seqlen > 1:
            mask = causal_mask(seqlen, start_pos, tokens.device, h.dtype)
        return self.logits(h, start_pos, freqs_cis, mask)

    @torch.inference_mode()
    def forward_rows(self, tokens: torch.Tensor, slots: list[int], positions: list[int]) -> torch.Tensor:
        """Logits (bsz, seqlen, vocab_size) in fp32 for rows that each sit in their own KV-cache slot at their own
        positions (a continuous batch): row i's tokens are at positions[i]..., in slot slots[i], and it attends
        over that slot alone. The math is ``forward``'s for each row on its own; the caller (the engine) keeps
        slots distinct and positions inside the cache.
        """
        bsz, seqlen = tokens.shape
        device = tokens.device
        h = self.tok_embeddings(tokens)
        at = torch.tensor(positions, dtype=torch.long, device=device)[:, None] + torch.arange(seqlen, device=device)
        length = max(positions) + seqlen
        if bsz > 1:
            # Rows read up to the furthest one, the rest masked; rounded up so that steps repeat a few shapes:
            # torch's bf16 kernels keep memory for each new shape (a soak grew by ~0.9 GB with exact lengths). One
            # row reads exactly its positions: the reference's shapes, so its bits.
            length = min(self.params.max_seq_len, -(-length // ATTENTION_LENGTH_STEP) * ATTENTION_LENGTH_STEP)
        rows = CacheRows(torch.tensor(slots, dtype=torch.long, device=device), at[:, 0], length)
        return self.logits(h, rows, self._freqs_cis_on(device)[at], rows_mask(at, length, h.dtype))

    def _freqs_cis_on(self, device: torch.device) -> torch.Tensor:
        """The rotations table, moved once to the device the model computes on."""
        if self.freqs_cis.device != device:
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis

    def logits(
        self,
        h: torch.Tensor,
        start_pos: int | torch.Tensor | CacheRows,
        freqs_cis: Rotations,
        mask: Optional[torch.Tensor],
        ops: BlockOps = REFERENCE,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (bsz, seqlen, vocab_size) in fp32 of the embeddings h (bsz, seqlen, dim) of tokens at positions
        start_pos...: every block, the final norm and the output layer, computed as ops says (see ``BlockOps``).
        last_only: the last position's logits alone, (bsz, 1, vocab_size) (the rows' caches are written whole)."""
        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis, mask, ops)
        h = self.norm(h[:, -1:] if last_only else h)
        return ops.linear(h, self.output).float()

    def stack_projections(self) -> Optional[list[tuple[StackedLinear, StackedLinear]]]:
        """Per block, (wq|wk|wv, w1|w3) each stacked into one layer whose weight the layers' weights now view
        (``TransformerBlock.stack_projections``): for paths that make one product of each group. None unless every
        group stacks (groups checked before it may have been stacked: their values are unchanged either way)."""
        stacks = [layer.stack_projections() for layer in self.layers]
        return None if any(s is None for s in stacks) else stacks

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the activations: the embedding's (``Llama.build`` gives every weight one dtype)."""
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        """The device the model computes on: its embedding's."""
        return self.tok_embeddings.weight.device


class Llama3Transformer(Transformer):
    """Llama 3.x: the same model, with the vocabulary-parallel embedding of Meta's Llama 3 checkpoints."""

    embedding_cls = VocabParallelEmbedding
