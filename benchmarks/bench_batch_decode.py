"""Batched bf16 decoding on CPUs: what a step of 1 to 16 rows costs (a continuous-batching engine's steps).

Two measurements, on the 0.85B shape of bench_decode.py (random weights, far more bytes than the caches hold):

- `gemv`: one pass of `rows` input rows through every linear weight of a decode step, by the C kernel of
  llama/kernels/cpu_gemv.py (called through ctypes, as the C step calls it), by torch's bf16 ``F.linear``, and by
  torch's fp32 ``F.linear`` on fp32 copies of the weights (made beforehand, not timed: the best torch does with
  twice the bytes).
- `step`: the one-call C decode step (llama/engine/cpu_decode.py's ``CpuDecoder``) with 1 row and with `rows`
  rows, each row at its own position and cache slot, as the engine calls it.

    python benchmarks/bench_batch_decode.py                             # both, rows 1,2,4,8,16
    python benchmarks/bench_batch_decode.py --what gemv --flags=-mno-avx512f   # the AVX2 loop, on an AVX-512 CPU
    python benchmarks/bench_batch_decode.py --what step --step_rows 8

Times are the best of --repeat passes (the least disturbed by other work on a shared machine); ratios are to the
1-row figure of the same column, measured in the same run.
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Callable

import torch
import torch.nn.functional as F
from bench_decode import SHAPES, random_model, read_bandwidth

from llama.distributed import setup_model_parallel
from llama.engine.cpu_decode import CpuDecoder
from llama.kernels import cpu_gemv
from llama.model import ModelArgs, rope_cos_sin


def best_of(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_gemv(model: torch.nn.Module, opts: argparse.Namespace) -> None:
    variant = cpu_gemv.kernel_variant(opts.flags.split() if opts.flags else [])
    if variant is None:
        raise SystemExit("the C kernel could not be built here with these flags")
    fn, loop = variant
    weights = [p.data for name, p in model.named_parameters() if p.ndim == 2 and not name.startswith("tok_")]
    total = sum(w.numel() * 2 for w in weights)
    upcast = [w.float() for w in weights] if opts.fp32 else None
    gen = torch.Generator().manual_seed(0)
    print(f"\nGEMV: {len(weights)} weights, {total / 1e9:.2f} GB in bf16; C loop {loop!r} "
          f"(extra flags {opts.flags or 'none'}); ms per pass (x the 1-row time)")  # fmt: skip
    header = "| rows | C kernel | torch bf16 F.linear |" + (" torch fp32 F.linear (upcast copy) |" if opts.fp32 else "")
    print(header)
    print("|---:|---:|---:|" + ("---:|" if opts.fp32 else ""))
    first: dict[str, float] = {}
    for rows in opts.rows:
        xs = {k: torch.randn(rows, k, generator=gen).bfloat16() for k in {w.shape[1] for w in weights}}
        x32 = {k: x.float() for k, x in xs.items()}
        ys = {n: torch.empty(rows, n, dtype=torch.bfloat16) for n in {w.shape[0] for w in weights}}
        calls = [(xs[w.shape[1]].data_ptr(), w.data_ptr(), ys[w.shape[0]].data_ptr(), rows, *w.shape) for w in weights]

        def ours(calls=calls) -> None:
            for args in calls:
                fn(*args)

        def torch_bf16(xs=xs) -> None:
            for w in weights:
                F.linear(xs[w.shape[1]], w)

        def torch_fp32(x32=x32) -> None:
            for w in upcast:
                F.linear(x32[w.shape[1]], w)

        cells = []
        contenders = [("ours", ours), ("bf16", torch_bf16)] + ([("fp32", torch_fp32)] if opts.fp32 else [])
        with torch.inference_mode():
            for name, f in contenders:
                f()  # warm-up
                t = best_of(f, opts.repeat)
                first.setdefault(name, t)
                cells.append(f"{t * 1e3:.1f} ({t / first[name]:.2f}x)")
        print(f"| {rows} | " + " | ".join(cells) + " |")


def bench_step(model: torch.nn.Module, opts: argparse.Namespace) -> None:
    stacks = model.stack_projections()
    cos, sin = rope_cos_sin(model.freqs_cis)
    decoder = CpuDecoder.build(model, stacks, cos, sin)
    if decoder is None:
        raise SystemExit("the C step does not serve this model here (kernels not built?)")
    max_rows = min(decoder.max_rows, model.params.max_batch_size)
    print(f"\nC step (CpuDecoder): max_rows {decoder.max_rows}; rows at their own positions and slots")
    print("| rows | ms per step | x the 1-row step | ms per row |")
    print("|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(1)
    base = None
    for rows in sorted({1, *[r for r in opts.step_rows if r <= max_rows]}):
        tokens = torch.randint(3, model.params.vocab_size, (rows, 1), generator=gen)
        # slots in reverse, positions spread over the first half of the cache (attention reads 0..pos)
        slots = torch.arange(rows - 1, -1, -1) + (model.params.max_batch_size - rows)
        pos = torch.randint(opts.context // 2, opts.context, (rows,), generator=gen)
        decoder(tokens, pos, slots)
        t = best_of(lambda tokens=tokens, pos=pos, slots=slots: decoder(tokens, pos, slots), opts.repeat)
        base = base or t
        print(f"| {rows} | {t * 1e3:.1f} | {t / base:.2f}x | {t * 1e3 / rows:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", default="gemv,step", help="gemv, step or both (comma-separated)")
    parser.add_argument("--rows", default="1,2,4,8,16", help="input rows of the GEMV passes")
    parser.add_argument("--step_rows", default="8,16", help="rows of the C steps (1 is always measured)")
    parser.add_argument("--context", type=int, default=256, help="positions the step's rows have cached (about)")
    parser.add_argument("--flags", default="", help="extra compiler flags for the GEMV kernel, e.g. -mno-avx512f")
    parser.add_argument("--no_fp32", dest="fp32", action="store_false", help="skip torch's fp32 GEMM")
    parser.add_argument("--repeat", type=int, default=5)
    opts = parser.parse_args()
    opts.rows = [int(r) for r in opts.rows.split(",")]
    opts.step_rows = [int(r) for r in opts.step_rows.split(",")]
    cpu = torch.device("cpu")
    setup_model_parallel(1, cpu)
    shape = SHAPES["cpu"]
    args = ModelArgs(**shape, max_batch_size=16, max_seq_len=opts.context + 1)
    model = random_model(args, cpu, torch.bfloat16)
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads; shape {shape}; "
          f"read bandwidth {read_bandwidth(cpu) / 1e9:.1f} GB/s")  # fmt: skip
    what = opts.what.split(",")
    if "gemv" in what:
        bench_gemv(model, opts)
    if "step" in what:
        bench_step(model, opts)


if __name__ == "__main__":
    main()
