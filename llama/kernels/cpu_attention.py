"""Attention of one new token per row over the KV cache on CPUs, for the fast path (``llama.engine.fast``).

A decode step's attention is tiny (one query per head), but ``F.scaled_dot_product_attention`` over the static
cache costs ~240 us a layer on two cores (setup and dispatch more than arithmetic), and it reads every cached
position, visible or not. ``csrc/attend_one.c`` reads only the positions up to the query's and computes the
reference's attention in fp32 (see its header), in one call a layer: the torch operator
``llama::attend_one``, which ``torch.compile`` calls as one opaque step. It is built like ``llama.kernels.cpu_gemv``'s
kernel (same compiler, cache folder and fallback); without it, ``attend_one`` is SDPA.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from llama.kernels import cpu_gemv

SOURCE = Path(__file__).parent.parent / "csrc" / "attend_one.c"
SYMBOL = "llama_attend_one"
ARGTYPES = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 7 + [ctypes.c_int]  # of SYMBOL
_IO_FLAGS = {torch.float32: 0, torch.bfloat16: 1}  # attend_one.c's IO_BF16

_state: dict[str, object] = {}  # "fn": the loaded function, or None once building it has failed


def kernel() -> Optional[ctypes._CFuncPtr]:
    """The compiled kernel, built on first call; None where it cannot be built (warned once)."""
    return cpu_gemv.load_once(_state, SOURCE, SYMBOL, ARGTYPES, "the fast path uses SDPA")


def applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel serves a KV cache on `device` in `dtype` (``KVCache.device``, ``.dtype``): fp32 or bf16 on
    the CPU, and a built kernel."""
    return device.type == "cpu" and dtype in _IO_FLAGS and kernel() is not None


def sdpa(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """What ``attend_one`` computes, by torch's SDPA over the whole cache with the later positions masked."""
    bsz, _, n_heads, head_dim = q.shape
    n_kv = cache_k.shape[2]
    grouped = q.reshape(bsz, n_kv, n_heads // n_kv, head_dim)  # the query heads that share a KV head, as rows
    visible = torch.arange(cache_k.shape[1], device=q.device)[None, :] <= pos
    keys, values = cache_k.transpose(1, 2), cache_v.transpose(1, 2)  # (bsz, n_kv, max_len, head_dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=visible)
    return out.reshape(bsz, 1, n_heads, head_dim)


_library = torch.library.Library("llama", "FRAGMENT")
_library.define("attend_one(Tensor q, Tensor cache_k, Tensor cache_v, Tensor pos) -> Tensor")


def attend_one(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Attention of q (bsz, 1, n_heads, head_dim) at position pos (a 1-element long tensor) over the cached
    keys and values (bsz, max_len, n_kv_heads, head_dim) at positions 0..pos; (bsz, 1, n_heads, head_dim).

    Query head h reads KV head h // (n_heads // n_kv_heads), as ``repeat_kv`` has it. Also the torch operator
    ``torch.ops.llama.attend_one``. A decode step makes one call a layer, so the checks are few and cheap.
    """
    bsz, seqlen, n_heads, head_dim = q.shape
    _, max_len, n_kv, _ = cache_k.shape
    if seqlen != 1 or cache_k.shape != cache_v.shape or cache_k.shape[0] != bsz or cache_k.shape[3] != head_dim:
        raise ValueError(f"attend_one: q {tuple(q.shape)} (one query per row) does not fit the cache "
                         f"{tuple(cache_k.shape)} / {tuple(cache_v.shape)}")  # fmt: skip
    if n_heads % n_kv:
        raise ValueError(f"attend_one: {n_heads} query heads do not group over {n_kv} KV heads")
    if pos.numel() != 1 or pos.dtype != torch.long:
        raise TypeError(f"attend_one: pos must be a 1-element long tensor, got {pos.dtype} {tuple(pos.shape)}")
    fn = kernel()
    flags = _IO_FLAGS.get(q.dtype)
    served = fn is not None and flags is not None and cache_k.dtype == cache_v.dtype == q.dtype
    if not served or q.device.type != "cpu" or cache_k.device.type != "cpu" or pos.device.type != "cpu":
        return sdpa(q, cache_k, cache_v, pos)
    q = q.contiguous()
    strides = cache_k.stride()
    if strides[2:] != (head_dim, 1) or cache_v.stride() != strides:  # the kernel wants each cached row whole
        cache_k, cache_v = cache_k.contiguous(), cache_v.contiguous()
        strides = cache_k.stride()
    out = torch.empty(q.shape, dtype=q.dtype)
    code = fn(q.data_ptr(), cache_k.data_ptr(), cache_v.data_ptr(), out.data_ptr(), pos.data_ptr(), bsz, n_kv,
              n_heads // n_kv, head_dim, max_len, strides[0], strides[1], flags)  # fmt: skip
    if code == 2:
        raise ValueError(f"attend_one: position {int(pos)} is outside the cache of {max_len} positions")
    if code:
        raise MemoryError(f"attend_one: out of memory for the scores of {int(pos) + 1} positions")
    return out


_library.impl("attend_one", attend_one, "CompositeExplicitAutograd")


@torch.library.register_fake("llama::attend_one")
def _(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)
