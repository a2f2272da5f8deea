"""Batched decoding on CPUs: what a step of 1 to 16 rows costs (a continuous-batching engine's steps).

Two measurements, on the 0.85B shape of bench_decode.py (random weights, far more bytes than the caches hold):

- `gemv`: one pass of `rows` input rows through every linear weight of a decode step, by the C kernel of
  llama/kernels/cpu_gemv.py (called through ctypes, as the C step calls it), by torch's bf16 ``F.linear``, and by
  torch's fp32 ``F.linear`` on fp32 copies of the weights (made beforehand, not timed: the best torch does with
  twice the bytes).
- `step`: the one-call C decode step (llama/engine/cpu_decode.py's ``CpuDecoder``) with 1 row and with
  --step_rows rows, each row at its own position and cache slot, as the engine calls it. With `--llama_cpp`,
  llama.cpp's batched decode step on the same weights beside it (benchmarks/llama_cpp_contender.py's
  ``batch_stepper``): the same tokens at the same positions, one llama_batch of one sequence per row, each
  sequence in its own KV stream holding its position's worth of tokens, logits for every row, as many threads;
  bf16 runs the bf16 GGUF file, int8 and int4 the q8_0 and q4_0 files llama.cpp's quantizer makes from it (as
  bench_decode.py's `--llama_cpp`), written to a temporary folder removed at the end.

    python benchmarks/bench_batch_decode.py                             # both, rows 1,2,4,8,16
    python benchmarks/bench_batch_decode.py --what gemv --flags=-mno-avx512f   # the AVX2 loop, on an AVX-512 CPU
    python benchmarks/bench_batch_decode.py --what step --step_rows 8
    python benchmarks/bench_batch_decode.py --what step --quantize int8,int4   # and the quantized C steps
    PYTHONPATH=<llama-cpp-python> python benchmarks/bench_batch_decode.py --what step --quantize int8,int4 \
        --step_rows 4,8,16 --llama_cpp                                  # and llama.cpp's batched step
    python benchmarks/bench_batch_decode.py --what step --dim 512 --n_layers 2   # a smaller shape
    python benchmarks/bench_batch_decode.py --what panels --rows 1,2,4,8,16   # quantized products: panels vs rows
    python benchmarks/bench_batch_decode.py --what step,bound --quantize int8,int4 --step_rows 8   # and the floor
    git show HEAD~1:llama/csrc/gemv_bf16.c > /tmp/old.c
    python benchmarks/bench_batch_decode.py --what gemv --other_source /tmp/old.c   # an older kernel beside ours

- `bound`: the arithmetic floor of a step's products at --step_rows rows: the multiply-adds a second this CPU's
  vector units do with the kernels' instructions (benchmarks/dot_peak.c: byte dot products for int8 and int4 weights
  with int8 inputs, bf16 dot products or fp32 FMAs for bf16 weights; every thread, operands in registers), and the
  time the step's multiply-adds take at that rate; with `step`, what the steps measured in the same run.

Times are the best of --repeat rounds (the least disturbed by other work on a shared machine), every contender
running once in each round; ratios are to the 1-row figure of the same column, measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from bench_decode import GGUF_TYPES, SHAPES, llama_cpp_files, random_model, read_bandwidth

from llama.distributed import setup_model_parallel
from llama.engine.cpu_decode import CpuDecoder, _products
from llama.kernels import cpu_gemv, pages
from llama.model import ModelArgs, Transformer, rope_cos_sin
from llama.quant import kernels as quant_kernels
from llama.quant.linear import QuantizedLinear, quantize_model
from llama.quant.scheme import Scheme


def interleaved(contenders: dict[object, Callable[[], object]], repeat: int) -> dict[object, float]:
    """The best time of each contender over `repeat` rounds, each round running every contender once in turn: on a
    shared machine the load then falls on all of them alike. (The C kernel and torch's are timed apart: right after
    torch's kernels, the C kernel ran ~20% slower on the Zen 4 of benchmarks/RESULTS.md, its threads sharing the two
    cores with torch's, which stay awake a while.)"""
    for fn in contenders.values():
        fn()  # warm-up
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(repeat):
        for key, fn in contenders.items():
            start = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - start)
    return best


def step_weights(model: Transformer) -> list[torch.Tensor]:
    """The weights a C decode step multiplies by, in its order (wq|wk|wv and w1|w3 stacked; the output layer)."""
    stacks = model.stack_projections()
    return [m.kernel_operands().weight for m in _products(model, stacks)]


def bench_gemv(model: Transformer, opts: argparse.Namespace) -> None:
    variant = cpu_gemv.kernel_variant(opts.flags.split() if opts.flags else [])
    if variant is None:
        raise SystemExit("the C kernel could not be built here with these flags")
    fn, loop = variant
    other = None
    if opts.other_source:  # another version of gemv_bf16.c (its own folder's headers first, then ours)
        source = Path(opts.other_source).resolve()
        flags = ["-I", str(source.parent), "-I", str(cpu_gemv.SOURCE.parent), *opts.flags.split()]
        fns = cpu_gemv.load_kernel(source, {cpu_gemv.SYMBOL: cpu_gemv.ARGTYPES}, "", ctypes.c_int, flags)
        if fns is None:
            raise SystemExit(f"could not build {source}")
        other = fns[cpu_gemv.SYMBOL]
    weights = step_weights(model)
    total = sum(w.numel() * 2 for w in weights)
    upcast = [w.float() for w in weights] if opts.fp32 else []
    gen = torch.Generator().manual_seed(0)
    contenders, held = {}, []
    for rows in opts.rows:
        xs = {k: torch.randn(rows, k, generator=gen).bfloat16() for k in {w.shape[1] for w in weights}}
        x32 = {k: x.float() for k, x in xs.items()}
        ys = {n: torch.empty(rows, n, dtype=torch.bfloat16) for n in {w.shape[0] for w in weights}}
        held += [xs, x32, ys]
        calls = [(xs[w.shape[1]].data_ptr(), w.data_ptr(), ys[w.shape[0]].data_ptr(), rows, *w.shape) for w in weights]

        def c_kernel(kernel, calls=calls) -> None:
            for args in calls:
                kernel(*args)

        def torch_bf16(xs=xs) -> None:
            for w in weights:
                F.linear(xs[w.shape[1]], w)

        def torch_fp32(x32=x32) -> None:
            for w in upcast:
                F.linear(x32[w.shape[1]], w)

        contenders[(rows, "ours")] = functools.partial(c_kernel, fn)
        if other is not None:
            contenders[(rows, "other")] = functools.partial(c_kernel, other)
        contenders[(rows, "bf16")] = torch_bf16
        if opts.fp32:
            contenders[(rows, "fp32")] = torch_fp32
    best = {}
    with torch.inference_mode():  # the C kernels side by side, torch's apart (see interleaved)
        for group in (("ours", "other"), ("bf16",), ("fp32",)):
            best.update(interleaved({key: f for key, f in contenders.items() if key[1] in group}, opts.repeat))
    print(
        f"\nGEMV: {len(weights)} weights (stacked as the C step has them), {total / 1e9:.2f} GB in bf16; C loop "
        f"{loop!r} (extra flags: {opts.flags or 'none'}); ms per pass, and x the 1-row pass of the same column"
    )
    columns = {"ours": "C kernel", "other": f"C kernel of {opts.other_source}", "bf16": "torch bf16 F.linear",
               "fp32": "torch fp32 F.linear (upcast copy)"}  # fmt: skip
    columns = {c: name for c, name in columns.items() if (opts.rows[0], c) in best}
    print("| rows | " + " | ".join(columns.values()) + " | C kernel vs torch bf16 |")
    print("|---:|" + "---:|" * (len(columns) + 1))
    for rows in opts.rows:
        cells = [f"{best[(rows, c)] * 1e3:.1f} ({best[(rows, c)] / best[(opts.rows[0], c)]:.2f}x)" for c in columns]
        print(f"| {rows} | " + " | ".join(cells) + f" | {best[(rows, 'bf16')] / best[(rows, 'ours')]:.2f}x faster |")


def bench_step(
    model: Transformer, opts: argparse.Namespace, gguf: Optional[Path] = None, gguf_type: str = ""
) -> dict[int, float]:
    """Time the C step at 1 and --step_rows rows; with gguf, llama.cpp's step on that file (of type gguf_type) at
    the same rows, tokens and positions, interleaved with ours. Returns our best seconds per step by rows."""
    cos, sin = rope_cos_sin(model.freqs_cis)
    decoder = CpuDecoder.build(model, model.stack_projections(), cos, sin)
    if decoder is None:
        raise SystemExit("the C step does not serve this model here (kernels not built?)")
    max_rows = min(decoder.max_rows, model.params.max_batch_size)
    gen = torch.Generator().manual_seed(1)
    contenders, inputs = {}, {}
    for rows in sorted({1, *[r for r in opts.step_rows if r <= max_rows]}):
        tokens = torch.randint(3, model.params.vocab_size, (rows, 1), generator=gen)
        # the last cache rows in reverse order, positions spread over the second half of the cache
        slots = torch.arange(model.params.max_batch_size - 1, model.params.max_batch_size - 1 - rows, -1)
        pos = torch.randint(opts.context // 2, opts.context, (rows,), generator=gen)
        contenders[(rows, "ours")] = lambda tokens=tokens, pos=pos, slots=slots: decoder(tokens, pos, slots)
        inputs[rows] = tokens, pos
    with contextlib.ExitStack() as stack:
        if gguf is not None:  # one model (its file memory-mapped), a context of `rows` sequences for each rows
            import llama_cpp_contender as lcpp

            theirs = stack.enter_context(lcpp.gguf_model(gguf))
            for rows, (tokens, pos) in inputs.items():
                contenders[(rows, "llama.cpp")] = stack.enter_context(
                    lcpp.batch_stepper(theirs, pos.tolist(), tokens[:, 0].tolist(), opts.llama_cpp_flash_attn)
                )
        # side by side: our step and llama.cpp's both run their threads on the system's libgomp, one OpenMP pool
        best = interleaved(contenders, opts.repeat)
    print(f"\nC step (CpuDecoder, max_rows {decoder.max_rows}): rows at their own positions ({opts.context // 2}-"
          f"{opts.context - 1}) and cache slots")  # fmt: skip
    if gguf is None:
        print("| rows | ms per step | x the 1-row step | ms per row |")
        print("|---:|---:|---:|---:|")
    else:
        attention = "flash attention" if opts.llama_cpp_flash_attn else "no flash attention"
        print(f"llama.cpp {gguf_type}: the same tokens and positions, one sequence (its own KV stream) per row, "
              f"{attention}; interleaved with ours")  # fmt: skip
        name = f"llama.cpp {gguf_type}"
        print(f"| rows | ms per step | x the 1-row step | ms per row | {name} ms per step | {name} x the 1-row step "
              f"| {name} ms per row | {name} time / ours |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rows in inputs:
        t = best[(rows, "ours")]
        line = f"| {rows} | {t * 1e3:.1f} | {t / best[(1, 'ours')]:.2f}x | {t * 1e3 / rows:.1f} |"
        if gguf is not None:
            u = best[(rows, "llama.cpp")]
            line += f" {u * 1e3:.1f} | {u / best[(1, 'llama.cpp')]:.2f}x | {u * 1e3 / rows:.1f} | {u / t:.2f}x |"
        print(line)
    return {rows: best[(rows, "ours")] for rows in inputs}


PEAK_SOURCE = Path(__file__).parent / "dot_peak.c"


def dot_peaks() -> dict[str, float]:
    """Multiply-adds a second on every thread by the kernels' instructions (dot_peak.c), by weight type."""
    fns = cpu_gemv.load_kernel(PEAK_SOURCE, {"llama_dot_peak": [ctypes.c_int, ctypes.c_int64]}, "", ctypes.c_double)
    if fns is None:
        raise SystemExit(f"could not build {PEAK_SOURCE}")
    peak = fns["llama_dot_peak"]
    peak(0, 1_000_000)  # warm-up (threads started, clocks up)
    int8, bf16 = (max(peak(kind, 20_000_000) for _ in range(3)) for kind in (0, 1))
    if int8 <= 0 or bf16 <= 0:
        raise SystemExit(f"{PEAK_SOURCE.name} has no vector loop for this CPU (it measures AVX2 and AVX-512 ones)")
    return {"bf16": bf16, "int8": int8, "int4": int8}  # int4 weights meet int8 inputs by the same instructions


def bench_bound(model: Transformer, opts: argparse.Namespace, steps: dict[str, dict[int, float]]) -> None:
    """The step's products at --step_rows rows if the vector units did nothing else (dot_peaks), against the steps
    measured in this run (steps: weight type -> rows -> seconds)."""
    peaks = dot_peaks()
    per_row = sum(w.numel() for w in step_weights(model))  # multiply-adds of one row's products
    print(f"\nArithmetic floor: {per_row / 1e6:.0f} M multiply-adds a row in the step's products; "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("| weights | multiply-adds a second | rows | floor, ms | measured step, ms | floor / measured 1-row step |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in ["bf16", *[m for m in opts.quantize.split(",") if m]]:
        for rows in opts.step_rows:
            floor = rows * per_row / peaks[kind]
            measured = steps.get(kind, {})
            step = f"{measured[rows] * 1e3:.1f}" if rows in measured else "-"
            ratio = f"{floor / measured[1]:.2f}x" if 1 in measured else "-"
            print(f"| {kind} | {peaks[kind] / 1e9:.0f} G | {rows} | {floor * 1e3:.1f} | {step} | {ratio} |")


def bench_panels(quantized: Transformer, mode: str, opts: argparse.Namespace) -> None:
    """The quantized layer products of a C step (int8 inputs), on the weights as the layers hold them (panels,
    where they do) and on the same weights as rows, side by side at each of --rows; --flags builds other loops
    (``-mno-avx512f``: AVX2). A layer held as rows is timed the same way twice."""
    symbols = {f"llama_gemv_{mode}{layout}_q8x": [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5
               for layout in ("", "_panels")}  # fmt: skip
    fns = cpu_gemv.load_kernel(quant_kernels.SOURCE, symbols, "", ctypes.c_int, opts.flags.split())
    if fns is None:
        raise SystemExit("the quantized kernels could not be built here with these flags")
    layers = [m for m in _products(quantized, quantized.stack_projections()) if isinstance(m, QuantizedLinear)]
    as_rows = []  # each layer's weights as rows (copies where it holds panels), in 2 MB pages as the layers' are
    for m in layers:
        q, s = m.weights_as_rows()
        as_rows.append((pages.huge_copy(q) if opts.huge_pages and m.panels else q, s))
    gen = torch.Generator().manual_seed(0)
    contenders, kept = {}, []
    for rows in opts.rows:
        xs = {m.in_features: torch.randn(rows, m.in_features, generator=gen).bfloat16() for m in layers}
        ys = [torch.empty(rows, m.out_features, dtype=torch.bfloat16) for m in layers]
        kept += [xs, ys]

        def run(panels_where_held: bool, rows=rows, xs=xs, ys=ys) -> None:
            for m, (qr, sr), y in zip(layers, as_rows, ys):
                on_panels = m.panels and panels_where_held
                fn = fns[f"llama_gemv_{mode}{'_panels' if on_panels else ''}_q8x"]
                q, s = (m.qweight, m.scales) if on_panels else (qr, sr)
                fn(xs[m.in_features].data_ptr(), q.data_ptr(), s.data_ptr(), y.data_ptr(), rows, m.out_features,
                   m.in_features, m.scheme.group_size, quant_kernels.IO_FLAGS[torch.bfloat16])  # fmt: skip

        contenders[(rows, "rows")] = functools.partial(run, False)
        contenders[(rows, "panels")] = functools.partial(run, True)
    best = interleaved(contenders, opts.repeat)
    print(f"\n{mode} layer products of a C step ({len(layers)} calls, {sum(m.panels for m in layers)} held in "
          f"panels; extra flags: {opts.flags or 'none'}): ms per pass, x the 1-row pass")  # fmt: skip
    print("| rows | on rows | on panels | panels vs rows |")
    print("|---:|---:|---:|---:|")
    first = opts.rows[0]
    for rows in opts.rows:
        r, p = best[(rows, "rows")], best[(rows, "panels")]
        print(f"| {rows} | {r * 1e3:.1f} ({r / best[(first, 'rows')]:.2f}x) | {p * 1e3:.1f} "
              f"({p / best[(first, 'panels')]:.2f}x) | {r / p:.2f}x faster |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", default="gemv,step", help="gemv, step, panels, bound (comma-separated)")
    parser.add_argument("--rows", default="1,2,4,8,16", help="input rows of the GEMV passes")
    parser.add_argument("--step_rows", default="8,16", help="rows of the C steps (1 is always measured)")
    parser.add_argument("--context", type=int, default=256, help="positions the step's rows have cached (about)")
    parser.add_argument("--flags", default="", help="extra compiler flags for the GEMV kernel, e.g. -mno-avx512f")
    parser.add_argument("--other_source", default="", help="another gemv_bf16.c to time beside (e.g. an older one)")
    parser.add_argument("--no_fp32", dest="fp32", action="store_false", help="skip torch's fp32 GEMM")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; each contender's best is reported")
    parser.add_argument("--quantize", default="", help='step: also "int8", "int4" weights (groups of 32)')
    parser.add_argument("--no_bf16", dest="bf16", action="store_false", help="step: only the --quantize models")
    parser.add_argument("--small_pages", dest="huge_pages", action="store_false",
                        help="leave the weights in 4 KB pages (the fast path moves them to 2 MB pages)")
    parser.add_argument("--llama_cpp", action="store_true",
                        help="step: also llama.cpp's batched step on the same weights (bf16, and q8_0 / q4_0 for "
                        "int8 / int4; needs llama-cpp-python and gguf, see benchmarks/llama_cpp_contender.py)")
    parser.add_argument("--llama_cpp_flash_attn", action="store_true", help="llama.cpp's step with flash attention")
    for key in SHAPES["cpu"]:
        parser.add_argument(f"--{key}", type=int, default=None, help="override the 0.85B shape's")
    opts = parser.parse_args()
    opts.rows = [int(r) for r in opts.rows.split(",")]
    opts.step_rows = [int(r) for r in opts.step_rows.split(",")]
    if opts.llama_cpp:
        import llama_cpp_contender as lcpp

        lcpp.require()  # before minutes of setup
    cpu = torch.device("cpu")
    setup_model_parallel(1, cpu)
    shape = {k: v if getattr(opts, k) is None else getattr(opts, k) for k, v in SHAPES["cpu"].items()}
    args = ModelArgs(**shape, max_batch_size=16, max_seq_len=opts.context + 1)
    model = random_model(args, cpu, torch.bfloat16)
    if opts.huge_pages:  # as FastDecoder does on CPUs (and stack_projections makes its stacks there)
        pages.move_to_huge_pages(model)
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads; shape {shape}; "
          f"read bandwidth {read_bandwidth(cpu) / 1e9:.1f} GB/s")  # fmt: skip
    what = opts.what.split(",")
    if "gemv" in what:
        bench_gemv(model, opts)
    if "panels" in what:
        for mode in [m for m in opts.quantize.split(",") if m] or ["int8", "int4"]:
            quantized = quantize_model(random_model(args, cpu, torch.bfloat16), Scheme(mode, 32))
            if opts.huge_pages:
                pages.move_to_huge_pages(quantized)
            bench_panels(quantized, mode, opts)
    modes = [m for m in opts.quantize.split(",") if m] if "step" in what else []
    with tempfile.TemporaryDirectory(prefix="bench_batch_decode_") as folder:
        gguf: dict[str, Path] = {}  # our weights (bf16, int8, int4) -> llama.cpp's file of them (bf16, q8_0, q4_0)
        if opts.llama_cpp and "step" in what:
            print(f"llama-cpp-python {lcpp.require().__version__}")
            gguf = llama_cpp_files(model, modes, Path(folder))
        steps: dict[str, dict[int, float]] = {}
        if "step" in what and opts.bf16:
            print("\nbf16 weights")
            steps["bf16"] = bench_step(model, opts, gguf.get("bf16"), "bf16")
        for mode in modes:
            print(f"\n{mode} weights (llama.quant, groups of 32, int8 inputs: the default kernels)")
            quantized = quantize_model(random_model(args, cpu, torch.bfloat16), Scheme(mode, 32))
            if opts.huge_pages:
                pages.move_to_huge_pages(quantized)
            steps[mode] = bench_step(quantized, opts, gguf.get(mode), GGUF_TYPES.get(mode, ""))
    if "bound" in what:
        bench_bound(model, opts, steps)


if __name__ == "__main__":
    main()
