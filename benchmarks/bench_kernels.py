"""The C kernels alone: one input row through every linear weight of a shape, called through ctypes.

bench_gemv.py and bench_quant.py call the kernels as torch operators, as the model does; this calls the C
functions directly (the library's compiled ones: llama/kernels/cpu_gemv.py, llama/quant/kernels.py), so what it
measures is the kernels' streaming speed without any per-call overhead of torch. Weights are random (bf16
N(0, 0.02); int8/int4 random codes with unit scales), far more bytes than the caches hold.

    python benchmarks/bench_kernels.py                 # the 0.85B shape of bench_decode.py
    python benchmarks/bench_kernels.py --in_cache      # a 256 KB weight over and over: compute, not memory
    OMP_NUM_THREADS=1 python benchmarks/bench_kernels.py --in_cache   # per-core figures
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from bench_decode import SHAPES, read_bandwidth

from llama.kernels import cpu_gemv
from llama.model import ffn_hidden_dim
from llama.quant import kernels as quant_kernels
from llama.quant.scheme import DEFAULT_GROUP_SIZE

KERNELS = {"bf16": "bf16", "int8": "int8_q8x", "int8 exact": "int8", "int4": "int4_q8x", "int4 exact": "int4"}


def shapes(opts: argparse.Namespace) -> list[tuple[int, int]]:
    """(out, in) of every linear weight a decode step multiplies by."""
    if opts.in_cache:
        return [(64, 2048)] * 6000
    s = SHAPES["cpu"]
    dim, head_dim = s["dim"], s["dim"] // s["n_heads"]
    kv, ffn = s["n_kv_heads"] * head_dim, ffn_hidden_dim(dim, s["multiple_of"], None)
    layer = [(dim, dim), (kv, dim), (kv, dim), (dim, dim), (ffn, dim), (dim, ffn), (ffn, dim)]
    return layer * s["n_layers"] + [(s["vocab_size"], dim)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in_cache", action="store_true", help="one small weight, called 6000 times")
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"of {', '.join(KERNELS)}")
    opts = parser.parse_args()
    fns, bf16 = quant_kernels.kernels(), cpu_gemv.kernel()
    if fns is None or bf16 is None:
        raise SystemExit("the C kernels could not be built here; nothing to measure")
    all_shapes = shapes(opts)
    distinct = all_shapes[:1] if opts.in_cache else all_shapes
    gen = torch.Generator().manual_seed(0)
    xs = {k: torch.randn(k, generator=gen) for _, k in distinct}
    print(f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"read bandwidth {read_bandwidth(torch.device('cpu')) / 1e9:.1f} GB/s")  # fmt: skip
    for name in opts.kernels.split(","):
        mode = name.split()[0]
        weights = []
        for n, k in distinct:
            if mode == "bf16":
                w = (torch.randn(n, k, generator=gen) * 0.02).bfloat16()
                weights.append((w, None, n, k))
            else:
                low, high, cols, dtype = (-127, 128, k, torch.int8) if mode == "int8" else (0, 256, k // 2, torch.uint8)
                q = torch.randint(low, high, (n, cols), generator=gen, dtype=torch.int16).to(dtype)
                s = torch.ones(n, k // DEFAULT_GROUP_SIZE, dtype=torch.bfloat16)
                weights.append((q, s, n, k))
        if opts.in_cache:
            weights = weights * len(all_shapes)
        ys = {n: torch.empty(n, dtype=torch.bfloat16 if mode == "bf16" else torch.float32) for n, _ in distinct}
        xb = {k: x.bfloat16() for k, x in xs.items()}
        calls = []
        for w, s, n, k in weights:  # pointers taken once: only the C calls are timed
            if mode == "bf16":
                calls.append((bf16, (xb[k].data_ptr(), w.data_ptr(), ys[n].data_ptr(), 1, n, k)))
            else:
                args = (xs[k].data_ptr(), w.data_ptr(), s.data_ptr(), ys[n].data_ptr(), 1, n, k, 32, 0)
                calls.append((fns[KERNELS[name]], args))
        total = sum(w.numel() * w.element_size() + (0 if s is None else s.numel() * 2) for w, s, _, _ in weights)
        best = float("inf")
        for _ in range(opts.repeat + 1):
            start = time.perf_counter()
            for fn, args in calls:
                fn(*args)
            best = min(best, time.perf_counter() - start)
        n_weights = sum(n * k for _, _, n, k in weights)
        print(f"  {name:11s} {best * 1e3:8.1f} ms per pass  {total / best / 1e9:5.1f} GB/s  "
              f"{n_weights / best / 1e9:5.1f} G weights/s")  # fmt: skip


if __name__ == "__main__":
    main()
