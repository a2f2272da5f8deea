"""Weights in 2 MB pages on CPUs (Linux transparent huge pages), for faster decoding.

Decoding one token streams every weight from memory once, and each 4 KB page of a weight costs the CPU a
translation (TLB) entry: over gigabytes of weights the misses cap how fast the cores read. In 2 MB pages the same
weights need 512 times fewer entries. On a 2-core Zen 4 (benchmarks/RESULTS.md, 2026-12-05) the bf16 matrix-vector
product over the 0.85B shape's 1.57 GB of weights took 33 ms a pass in 2 MB pages against 48 ms in 4 KB pages, the
same code on the same bytes; llama.cpp gets them from the page cache of its memory-mapped file, in large pages.

Linux gives an anonymous mapping 2 MB pages where asked (``madvise(MADV_HUGEPAGE)``, with transparent huge pages
set to "always" or "madvise", the usual defaults) before its memory is first touched, so a tensor already written
cannot be moved into them in place: ``move_to_huge_pages`` copies each large CPU tensor of a module into a new
2 MB-aligned mapping so marked, and points the module at the copy. The values are the same bits; only where they
lie changes. Elsewhere (no THP, other systems) nothing moves.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20  # bytes
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether this system gives anonymous memory 2 MB pages on request (Linux THP "always" or "madvise")."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D CPU tensor of numel elements (uninitialized) in its own mapping, asked for 2 MB pages and aligned to
    them. The mapping lives as long as the tensor (and its views)."""
    nbytes = numel * dtype.itemsize
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(region, dtype=torch.uint8)  # holds the mapping for as long as it or a view lives
    skip = -whole.data_ptr() % HUGE_PAGE
    return whole[skip : skip + nbytes].view(dtype)


def huge_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of the contiguous CPU tensor t in 2 MB pages (``empty``), same shape and values."""
    return empty(t.numel(), t.dtype).view(t.shape).copy_(t)


def move_to_huge_pages(module: nn.Module, min_bytes: int = HUGE_PAGE) -> int:
    """Copy each CPU parameter and buffer of module of at least min_bytes into 2 MB pages and point the module
    at the copy (``param.data``: the Parameter objects stay); returns how many bytes moved. Tensors that share a
    storage with another (views, tied weights) stay where they are, so that they keep sharing it; so does
    everything where ``available()`` is false."""
    if not available():
        return 0
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.device.type == "cpu"]
    owners: dict[int, int] = {}
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        owners[key] = owners.get(key, 0) + 1
    moved = 0
    with torch.no_grad():
        for t in tensors:
            whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
            if t.numel() * t.element_size() < min_bytes or not whole or owners[t.untyped_storage().data_ptr()] > 1:
                continue
            copy = huge_copy(t)  # (a view into its mapping: moving the module again leaves it there)
            t.data = copy
            moved += copy.numel() * copy.element_size()
    return moved
