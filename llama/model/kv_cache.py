"""The KV cache: its shape and size on one rank."""

from __future__ import annotations

import math

import torch

from llama.model.args import ModelArgs


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


