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
# q, k, v, out, pos; n_pos; slots; bsz, max_batch, n_kv, n_rep, head_dim, max_len, batch_stride, pos_stride; io
ARGTYPES = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 8 + [ctypes.c_int]
_IO_FLAGS = {torch.float32: 0, torch.bfloat16: 1}  # attend_one.c's IO_BF16

_state: dict[str, object] = {}  # "fn": the loaded function, or None once building it has failed


def kernel() -> Optional[ctypes._CFuncPtr]:
    """The compiled kernel, built on first call; None where it cannot be built (warned once)."""
    return cpu_gemv.load_once(_state, SOURCE, SYMBOL, ARGTYPES, "the fast path uses SDPA")


def applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel serves a KV cache on `device` in `dtype` (``KVCache.device``, ``.dtype``): fp32 or bf16 on
    the CPU, and a built kernel."""
    return device.type == "cpu" and dtype in _IO_FLAGS and kernel() is not None


def check_rows(
    name: str, bsz: int, max_batch: int, pos: torch.Tensor, slots: Optional[torch.Tensor], device: torch.device
) -> None:
    """The cheap checks of the rows' positions and slots (not their values): pos a long tensor of 1 or bsz
    elements, slots None or a long tensor of bsz elements, both on `device`; without slots, at most max_batch rows.
    TypeError or ValueError naming `name`."""
    for label, t, lengths in (("pos", pos, (1, bsz)), ("slots", slots, (bsz,))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype != torch.long or t.device != device:
            got = f"{t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name}: {label} must be a long tensor on {device}, got {got}")
        if t.ndim > 1 or t.numel() not in lengths:
            raise ValueError(f"{name}: {label} {tuple(t.shape)} must have {' or '.join(map(str, sorted(set(lengths))))}"
                             f" element(s) for {bsz} rows")  # fmt: skip
    if slots is None and bsz > max_batch:
        raise ValueError(f"{name}: {bsz} rows without slots read cache rows 0..{bsz - 1}, but the cache holds "
                         f"{max_batch}; pass slots or fewer rows")  # fmt: skip


def in_range(t: torch.Tensor, low: int, high: int) -> bool:
    """Whether every element of t lies in [low, high)."""
    return bool(((t >= low) & (t < high)).all())


def bad_rows(name: str, pos: torch.Tensor, slots: Optional[torch.Tensor], max_batch: int, max_len: int) -> ValueError:
    """The ValueError naming the first position outside [0, max_len) or slot outside [0, max_batch) (the error path:
    it reads the values)."""
    for i, p in enumerate(pos.tolist()):
        if not 0 <= p < max_len:
            where = "" if pos.numel() == 1 else f" (row {i})"
            return ValueError(f"{name}: position {p}{where} is outside the KV cache of {max_len} positions")
    for i, s in enumerate([] if slots is None else slots.tolist()):
        if not 0 <= s < max_batch:
            return ValueError(f"{name}: slot {s} (row {i}) is outside the KV cache's {max_batch} rows "
                              "(max_batch_size)")  # fmt: skip
    return ValueError(f"{name}: positions {pos.tolist()} and slots {slots} are in range")  # not reached


def sdpa(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, pos: torch.Tensor,
    slots: Optional[torch.Tensor] = None,
) -> torch.Tensor:  # fmt: skip
    """What ``attend_one`` computes, by torch's SDPA over the rows' whole cache rows with the later positions masked.

    It does not look at the positions' and slots' values (a compiled step traces it, and on a GPU a check would wait
    for the device): ``attend_one`` checks them before it falls back to this."""
    bsz, _, n_heads, head_dim = q.shape
    max_len, n_kv = cache_k.shape[1:3]
    grouped = q.reshape(bsz, n_kv, n_heads // n_kv, head_dim)  # the query heads that share a KV head, as rows
    if slots is None:
        cache_k, cache_v = cache_k[:bsz], cache_v[:bsz]
    else:
        cache_k, cache_v = cache_k.index_select(0, slots), cache_v.index_select(0, slots)
    # (1 or bsz, 1, 1, max_len): row b sees the positions up to its own
    visible = (torch.arange(max_len, device=q.device)[None, :] <= pos.view(-1, 1)).view(-1, 1, 1, max_len)
    keys, values = cache_k.transpose(1, 2), cache_v.transpose(1, 2)  # (bsz, n_kv, max_len, head_dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=visible)
    return out.reshape(bsz, 1, n_heads, head_dim)


_library = torch.library.Library("llama", "FRAGMENT")
_library.define("attend_one(Tensor q, Tensor cache_k, Tensor cache_v, Tensor pos, Tensor? slots=None) -> Tensor")


def attend_one(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, pos: torch.Tensor,
    slots: Optional[torch.Tensor] = None,
) -> torch.Tensor:  # fmt: skip
    """Attention of q (bsz, 1, n_heads, head_dim), one new token per row, over the cached keys and values
    (max_batch, max_len, n_kv_heads, head_dim), the whole cache; (bsz, 1, n_heads, head_dim).

    pos: a long tensor of 1 element (every row at that position) or bsz elements (row b at pos[b]). slots: None (row
    b reads the cache's row b) or a long tensor of bsz elements (row b reads cache row slots[b]). Row b attends over
    positions 0..pos[b] of its cache row. Query head h reads KV head h // (n_heads // n_kv_heads), as ``repeat_kv``
    has it. Also the torch operator ``torch.ops.llama.attend_one``. A decode step makes one call a layer, so the
    checks are few and cheap; the kernel checks the positions and slots themselves before it writes anything (a
    ValueError naming the first one out of range).
    """
    bsz, seqlen, n_heads, head_dim = q.shape
    max_batch, max_len, n_kv, _ = cache_k.shape
    if seqlen != 1 or cache_k.shape != cache_v.shape or cache_k.shape[3] != head_dim:
        raise ValueError(f"attend_one: q {tuple(q.shape)} (one query per row) does not fit the cache "
                         f"{tuple(cache_k.shape)} / {tuple(cache_v.shape)}")  # fmt: skip
    if n_heads % n_kv:
        raise ValueError(f"attend_one: {n_heads} query heads do not group over {n_kv} KV heads")
    check_rows("attend_one", bsz, max_batch, pos, slots, q.device)
    fn = kernel()
    flags = _IO_FLAGS.get(q.dtype)
    served = fn is not None and flags is not None and cache_k.dtype == cache_v.dtype == q.dtype
    if not served or q.device.type != "cpu" or cache_k.device.type != "cpu":
        if not in_range(pos, 0, max_len) or (slots is not None and not in_range(slots, 0, max_batch)):
            raise bad_rows("attend_one", pos.cpu(), None if slots is None else slots.cpu(), max_batch, max_len)
        return sdpa(q, cache_k, cache_v, pos, slots)
    q = q.contiguous()
    pos = pos.contiguous()
    slots = None if slots is None else slots.contiguous()
    strides = cache_k.stride()
    if strides[2:] != (head_dim, 1) or cache_v.stride() != strides:  # the kernel wants each cached row whole
        cache_k, cache_v = cache_k.contiguous(), cache_v.contiguous()
        strides = cache_k.stride()
    out = torch.empty(q.shape, dtype=q.dtype)
    code = fn(q.data_ptr(), cache_k.data_ptr(), cache_v.data_ptr(), out.data_ptr(), pos.data_ptr(), pos.numel(),
              None if slots is None else slots.data_ptr(), bsz, max_batch, n_kv, n_heads // n_kv, head_dim, max_len,
              strides[0], strides[1], flags)  # fmt: skip
    if code in (2, 3):
        raise bad_rows("attend_one", pos, slots, max_batch, max_len)
    if code:
        raise MemoryError(f"attend_one: out of memory for the scores of {int(pos.max()) + 1} positions")
    return out


_library.impl("attend_one", attend_one, "CompositeExplicitAutograd")


@torch.library.register_fake("llama::attend_one")
def _(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, pos: torch.Tensor,
    slots: Optional[torch.Tensor] = None,
) -> torch.Tensor:  # fmt: skip
    return q.new_empty(q.shape)
