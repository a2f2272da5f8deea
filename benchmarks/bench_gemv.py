"""The bf16 matrix-vector products of one decoded token on a CPU: torch's kernel against llama/cpu_gemv.py's.

It builds every linear weight of a model shape (defaults: the 0.85B shape of bench_decode.py), far more
bytes than the caches hold, and times one pass of one input row through all of them, as a decode step does.
Each pass reads every weight once, so bytes / time is the speed at which the kernel streams the weights;
the script prints it next to the machine's read bandwidth (a sum over a 1 GiB buffer).

    python benchmarks/bench_gemv.py
    python benchmarks/bench_gemv.py --dim 4096 --n_layers 32 --hidden 11008   # the Llama-2-7B shape
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Callable

import torch
import torch.nn.functional as F

from llama import cpu_gemv


def weight_shapes(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, hidden: int, vocab: int) -> list:
    kv_dim = dim // n_heads * n_kv_heads
    per_layer = [(dim, dim), (kv_dim, dim), (kv_dim, dim), (dim, dim), (hidden, dim), (hidden, dim), (dim, hidden)]
    return per_layer * n_layers + [(vocab, dim)]


def fastest(fn: Callable[[], object], repeat: int) -> float:
    """The fastest of `repeat` timed calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--n_layers", type=int, default=16)
    parser.add_argument("--n_heads", type=int, default=16)
    parser.add_argument("--n_kv_heads", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=5632, help="the SwiGLU hidden size")
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--repeat", type=int, default=10)
    opts = parser.parse_args()
    if not cpu_gemv.available():
        raise SystemExit("the C kernel could not be built here (see the warning above); nothing to compare")

    gen = torch.Generator().manual_seed(0)
    shapes = weight_shapes(opts.dim, opts.n_layers, opts.n_heads, opts.n_kv_heads, opts.hidden, opts.vocab_size)
    weights = [(torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for s in shapes]
    inputs = {k: torch.randn(1, k, generator=gen).to(torch.bfloat16) for k in (opts.dim, opts.hidden)}
    total = sum(w.numel() * w.element_size() for w in weights)

    buf = torch.ones(2**28, dtype=torch.float32)
    read = fastest(buf.sum, opts.repeat)
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads")
    bandwidth = buf.numel() * 4 / read
    print(f"{len(weights)} weights, {total / 1e9:.2f} GB in bf16; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    for name, linear in (("torch F.linear", F.linear), ("llama::linear_bf16", torch.ops.llama.linear_bf16)):
        def one_pass(linear=linear) -> None:  # one input row through every weight, as a decode step
            for w in weights:
                linear(inputs[w.shape[1]], w)

        one_pass()  # warm-up
        t = fastest(one_pass, opts.repeat)
        print(f"  {name:20s} {t * 1e3:7.1f} ms per pass  {total / t / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
