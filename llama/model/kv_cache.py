"""The KV cache: ``KVCache``, the one owner of a layer's cached keys and values, and its shape and size on one rank."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

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


@dataclass(frozen=True)
class CacheRows:
    """Where the rows of a call sit in the KV cache when they are not rows 0..bsz-1 at one position (the rows of a
    continuous batch): row i of the call is the cache's slot ``slots[i]``, and its tokens are at positions
    ``positions[i]``, ``positions[i] + 1``, ...

    length: the positions attention reads, 0..length-1 (at least the furthest row's last position + 1):
    ``KVCache.update`` returns each row's slot over them, gathered into (bsz, length, n_kv_heads, head_dim). None:
    it returns the whole cache, for a kernel that finds each row's slot and positions itself (``attend_one``).
    """

    slots: torch.Tensor  # (bsz,) long
    positions: torch.Tensor  # (bsz,) long
    length: Optional[int] = None


class KVCache(nn.Module):
    """One attention layer's cached keys and values, each (max_batch_size, max_seq_len, n_kv_heads, head_dim).

    The tensors are non-persistent buffers: they follow the module through ``.to(device, dtype)`` and never enter
    ``state_dict()``. ``update`` is the one way they are written, by the faithful forward and the compiled step
    alike. A kernel that reads or writes them itself (the C step of ``llama.engine.cpu_decode``) asks for their
    ``shape``, ``dtype``, ``device`` and ``pointers()``, and holds ``buffers()`` for as long as it uses the
    addresses.
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device | str] = None):  # fmt: skip
        super().__init__()
        shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len  # what update checks, as plain ints
        self.register_buffer("cache_k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, positions: int | torch.Tensor | CacheRows, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys and values k, v (bsz, seqlen, n_kv_heads, head_dim) of rows 0..bsz-1 at `positions`; return
        the keys and values attention reads, each (bsz, length, n_kv_heads, head_dim), views of the cache.

        positions is one of:
        - an int p: the rows' tokens sit at positions p..p+seqlen-1 (the faithful forward, prefill). Returns the
          positions 0..p+seqlen-1. Positions outside the cache, or more rows than it holds, are a ValueError.
        - a 1-element long tensor [p], for one token per row (seqlen 1): every row at position p. The compiled
          step passes the position as data rather than as a shape, so it is not checked here (that would wait on
          the device every step; the caller checks it). Returns all max_seq_len positions: the step's shapes stay
          fixed, and attention hides the positions after p.
        - a (bsz,) long tensor, one token per row, row i at position positions[i] (rows at different positions,
          as a continuous-batching engine has them). Unchecked and returned whole, as above.
        - a ``CacheRows``: row i in slot slots[i], its tokens at positions[i]... (any seqlen). Unchecked (the
          engine that places the rows checks them); returns what its ``length`` says.
        """
        bsz, seqlen = k.shape[:2]
        cache_k, cache_v = self.cache_k, self.cache_v
        if isinstance(positions, CacheRows):
            return self._update_rows(positions, k, v)
        if not isinstance(positions, torch.Tensor):
            end = positions + seqlen
            self._check_fits(positions, end, bsz)
            cache_k[:bsz, positions:end] = k
            cache_v[:bsz, positions:end] = v
            return cache_k[:bsz, :end], cache_v[:bsz, :end]
        cache_k, cache_v = cache_k[:bsz], cache_v[:bsz]
        if seqlen != 1:  # a shape, so checking it costs nothing in a compiled step
            raise ValueError(f"KV cache: positions as a tensor take one token per row, got {seqlen}")
        if positions.numel() == 1:  # every row at one position
            cache_k.index_copy_(1, positions, k)
            cache_v.index_copy_(1, positions, v)
        else:  # row i at positions[i]
            rows = torch.arange(bsz, device=positions.device)
            cache_k[rows, positions] = k[:, 0]
            cache_v[rows, positions] = v[:, 0]
        return cache_k, cache_v

    def _update_rows(self, rows: CacheRows, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seqlen = k.shape[1]
        at = rows.positions[:, None] + torch.arange(seqlen, device=rows.positions.device)  # (bsz, seqlen)
        slots = rows.slots[:, None]  # broadcast against at: cell (slots[i], at[i, j]) takes k[i, j]
        self.cache_k[slots, at] = k
        self.cache_v[slots, at] = v
        if rows.length is None:
            return self.cache_k, self.cache_v
        # (bsz, length, n_kv_heads, head_dim): a copy of the rows' slots, as attention reads them
        return (self.cache_k[:, : rows.length].index_select(0, rows.slots),
                self.cache_v[:, : rows.length].index_select(0, rows.slots))  # fmt: skip

    def _check_fits(self, start: int, end: int, bsz: int) -> None:
        if start < 0 or end > self.max_seq_len:
            raise ValueError(f"KV cache: {end - start} tokens at position {start} do not fit its {self.max_seq_len} "
                             "positions (max_seq_len)")  # fmt: skip
        if bsz > self.max_batch_size:
            raise ValueError(f"KV cache: {bsz} rows do not fit its {self.max_batch_size} rows (max_batch_size)")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(max_batch_size, max_seq_len, n_kv_heads, head_dim) of the keys, and of the values."""
        return tuple(self.cache_k.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        return self.cache_k.dtype

    @property
    def device(self) -> torch.device:
        return self.cache_k.device

    def is_contiguous(self) -> bool:
        """Whether keys and values are each one dense row-major block of one dtype (what a kernel indexing them by
        address assumes)."""
        return self.cache_k.is_contiguous() and self.cache_v.is_contiguous() and self.cache_v.dtype == self.dtype

    def pointers(self) -> tuple[int, int]:
        """The addresses of the keys and of the values, for kernels: valid while the caller holds ``buffers()``
        (``.to()`` to another device or dtype makes new tensors, which these addresses do not follow)."""
        return self.cache_k.data_ptr(), self.cache_v.data_ptr()
