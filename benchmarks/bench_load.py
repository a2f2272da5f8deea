"""Checkpoint loading: time and peak host memory of ``Llama.build`` against plain ``torch.load`` and the reference.

    python benchmarks/bench_load.py [--workdir DIR] [--dim 2048] [--n_layers 10]
    python benchmarks/bench_load.py --shape cpu   # bench_decode.py's 0.85B shape: a 1.7 GB file

Writes a random Llama-shaped checkpoint (bfloat16, one shard, vocabulary 32000, like Meta's files; by default
dim 2048 and 10 layers, about 1.3 GB) with mistral_common's copy of the Llama 2 SentencePiece model, unless
--workdir already holds one. Then each way of loading runs in a fresh process, so its peak RSS (VmHWM) is its
own:

- ours:       ``Llama.build(..., device="cpu", dtype=torch.bfloat16)`` (memory-mapped shards, assigned weights);
- ours int8,  ``Llama.build(..., dtype=torch.bfloat16, quantize="int8")`` (or "int4"): quantize-on-load, one
  ours int4: tensor at a time from the memory-mapped shards (llama/quant/), the float model never resident;
- torch.load: ``torch.load(path, map_location="cpu", weights_only=True)`` and nothing else;
- reference:  what Meta's ``Llama.build`` does: a full ``torch.load``, a ``Transformer`` whose weights are
              allocated under a bfloat16 default dtype, then ``load_state_dict(checkpoint, strict=False)``, which
              copies every weight.

"load" is the time until the call returns. "ready" adds one forward pass of one token, which touches every
weight: a memory-mapped load reads the file there rather than in the call, so "ready" is the fair comparison.
"weights MB" is the bytes of the loaded tensors (the state dict: quantized weights and scales for int8/int4).
Each way runs with a cold page cache (``echo 3 > /proc/sys/vm/drop_caches``, needs root) and a warm one
(``--caches warm`` skips the cold runs, which evict every other program's cached files too).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

print = functools.partial(print, flush=True)  # results appear as they come, between child runs

MODES = ("ours", "ours int8", "ours int4", "torch.load", "reference")
ROW = "{:5} {:10} {:>7} {:>8} {:>11} {:>14} {:>14} {:>11} {:>12} {:>12}"
DEFAULT_SHAPE = {"dim": 2048, "n_layers": 10}


def status_kb(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in kB (VmRSS: now; VmHWM: peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def make_checkpoint(folder: Path, tokenizer_path: Path, shape: dict) -> None:
    """A one-shard bfloat16 checkpoint with random weights, written tensor by tensor to keep memory low.

    shape: dim, n_layers and optionally n_heads (default dim / 128), n_kv_heads, multiple_of (default 256)."""
    from llama.model import ModelArgs
    from llama.tokenizer import Tokenizer
    from llama.weights import checkpoint
    from llama.weights.layout import Layout

    params = {"n_heads": shape["dim"] // 128, "multiple_of": 256, **shape, "norm_eps": 1e-5, "vocab_size": -1}
    args = ModelArgs.from_params({**params, "vocab_size": Tokenizer(tokenizer_path).n_words})
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in Layout.for_args(args).shapes.items():
        if len(shape) == 1:
            state[key] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            state[key] = (torch.randn(shape, generator=gen) / shape[1] ** 0.5).to(torch.bfloat16)
    checkpoint.save_checkpoint(folder, [state], params)
    shutil.copyfile(tokenizer_path, folder / "tokenizer.model")


def checkpoint_shape(shape_name: Optional[str], dim: Optional[int], n_layers: Optional[int]) -> dict:
    """The checkpoint's shape: bench_decode.py's SHAPES[shape_name] (its vocabulary is the tokenizer's), or the
    default, with dim and n_layers overriding either."""
    from bench_decode import SHAPES

    shape = dict(DEFAULT_SHAPE)
    if shape_name is not None:
        keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of")
        shape = {k: SHAPES[shape_name][k] for k in keys if SHAPES[shape_name].get(k) is not None}
    shape.update({k: v for k, v in (("dim", dim), ("n_layers", n_layers)) if v is not None})
    return shape


def folder_name(shape: dict) -> str:
    name = f"llama-d{shape['dim']}-l{shape['n_layers']}"
    if shape.get("n_heads", shape["dim"] // 128) != shape["dim"] // 128:
        name += f"-h{shape['n_heads']}"
    if shape.get("n_kv_heads") is not None:
        name += f"-kv{shape['n_kv_heads']}"
    if shape.get("multiple_of", 256) != 256:
        name += f"-m{shape['multiple_of']}"
    return name


def tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def child(mode: str, ckpt_dir: Path) -> dict:
    """Load the checkpoint one way in this (fresh) process; return times (s) and memory (MB)."""
    from llama import Llama
    from llama.distributed import default_dtype_scope, setup_model_parallel
    from llama.model import ModelArgs, Transformer

    rss_before = status_kb("VmRSS")
    token = torch.tensor([[1]])
    start = time.perf_counter()
    if mode.startswith("ours"):  # "ours", or "ours int8" / "ours int4": quantize-on-load
        quantize = mode.split()[1] if " " in mode else None
        generator = Llama.build(str(ckpt_dir), str(ckpt_dir / "tokenizer.model"), max_seq_len=64, max_batch_size=1,
                                device="cpu", dtype=torch.bfloat16, quantize=quantize)  # fmt: skip
        model = generator.model
    elif mode == "torch.load":
        state = torch.load(ckpt_dir / "consolidated.00.pth", map_location="cpu", weights_only=True)
        model = None
    else:
        state = torch.load(ckpt_dir / "consolidated.00.pth", map_location="cpu", weights_only=True)
        setup_model_parallel(None, torch.device("cpu"))
        params = json.loads((ckpt_dir / "params.json").read_text())
        args = ModelArgs.from_params(params, max_seq_len=64, max_batch_size=1)
        args.vocab_size = state["output.weight"].shape[0]
        with default_dtype_scope(torch.bfloat16):  # the reference: set_default_tensor_type(cuda.HalfTensor)
            model = Transformer(args)
        model.load_state_dict(state, strict=False)
        state = None
    load = time.perf_counter() - start
    rss_loaded = status_kb("VmRSS")
    weights_mb = tensor_mb((model.state_dict() if model is not None else state).values())
    if model is not None:
        model.forward(token, 0)
    ready = time.perf_counter() - start
    forward = 0.0
    if model is not None:  # the same pass again, all weights in memory: its compute alone
        tick = time.perf_counter()
        model.forward(token, 0)
        forward = time.perf_counter() - tick
    peak_ready = status_kb("VmHWM")
    # A forward reads one row of the embedding table; read one element of every page of every weight too, for
    # the worst case of a memory-mapped model: all of the file resident.
    for tensor in (model.state_dict() if model is not None else state).values():
        flat = tensor.detach().reshape(-1)
        flat[:: max(1, 4096 // flat.element_size())].float().sum()
    return {
        "load_s": load,
        "ready_s": ready,
        "forward_s": forward,
        "rss_before_mb": rss_before / 1024,
        "rss_loaded_mb": rss_loaded / 1024,
        "weights_mb": weights_mb,
        "peak_mb": peak_ready / 1024,
        "peak_all_mb": status_kb("VmHWM") / 1024,
    }


def drop_page_cache() -> bool:
    """Drop the page cache (root only); True if it worked."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def warm_page_cache(ckpt_dir: Path) -> None:
    for path in ckpt_dir.iterdir():
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def run_child(mode: str, ckpt_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--workdir", str(ckpt_dir)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = f"Python {platform.python_version()}, torch {torch.__version__}"
    return f"{model}, {os.cpu_count()} cores, {ram_gb:.0f} GB RAM; {versions}"


def summary(results: dict, caches: list[str]) -> None:
    """Ratios of each of our ways to the reference and to a plain torch.load, per cache state."""
    for cache in caches:
        for name in ("reference", "torch.load"):
            other = results[cache, name]
            for mode in (m for m in MODES if m.startswith("ours")):
                ours = results[cache, mode]
                print(
                    f"{cache}: {mode} vs {name}: ready {other['ready_s'] / ours['ready_s']:.1f}x faster, peak RSS "
                    f"{ours['peak_mb'] / other['peak_mb']:.2f}x ({ours['peak_all_mb'] / other['peak_all_mb']:.2f}x "
                    "with all of the file read)"
                )
    # Quantize-on-load should leave about the quantized size plus the runtime, and peak below a plain torch.load.
    cache = caches[-1]
    plain = results[cache, "torch.load"]["peak_mb"]
    for mode in ("ours int8", "ours int4"):
        r = results[cache, mode]
        rest = r["rss_loaded_mb"] - r["weights_mb"]
        print(f"{mode}: RSS once loaded {r['rss_loaded_mb']:.0f} MB = {r['weights_mb']:.0f} MB of weights + "
              f"{rest:.0f} MB (the process held {r['rss_before_mb']:.0f} MB before loading); peak "
              f"{r['peak_mb']:.0f} MB, {'below' if r['peak_mb'] < plain else 'NOT below'} torch.load's "
              f"{plain:.0f} MB ({cache} cache)")  # fmt: skip


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="folder for the checkpoint (kept); default: a temporary one")
    parser.add_argument(
        "--shape", choices=["cpu", "cuda"],
        help="a shape of bench_decode.py: cpu is its 0.85B one (1.7 GB), cuda Llama-2-7B's (13.5 GB); default: dim "
        f"{DEFAULT_SHAPE['dim']}, {DEFAULT_SHAPE['n_layers']} layers (1.3 GB)",
    )  # fmt: skip
    parser.add_argument("--dim", type=int, help="overrides the shape's")
    parser.add_argument("--n_layers", type=int, help="overrides the shape's")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way per cache state; best is shown")
    parser.add_argument("--caches", default="cold,warm", help="cold (needs root), warm, or both (default)")
    parser.add_argument("--tokenizer_path", type=Path, help="default: mistral_common's Llama 2 tokenizer.model")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.workdir)))
        return

    shape = checkpoint_shape(args.shape, args.dim, args.n_layers)
    tmp = None if args.workdir else Path(tempfile.mkdtemp(prefix="bench_load."))
    ckpt_dir = (args.workdir or tmp) / folder_name(shape)
    try:
        if not (ckpt_dir / "consolidated.00.pth").is_file():
            tokenizer = args.tokenizer_path
            if tokenizer is None:
                import mistral_common

                tokenizer = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
            print(f"writing a random checkpoint to {ckpt_dir} ...", file=sys.stderr)
            make_checkpoint(ckpt_dir, tokenizer, shape)
        size_mb = (ckpt_dir / "consolidated.00.pth").stat().st_size / 2**20
        print(f"machine: {machine()}")
        print(f"checkpoint: {ckpt_dir / 'consolidated.00.pth'} ({size_mb:.0f} MB, bfloat16, {shape})")
        caches = [c for c in ("cold", "warm") if c in args.caches.split(",")]
        if "cold" in caches and not drop_page_cache():
            print("cannot drop the page cache (not root?): warm-cache runs only")
            caches = ["warm"]
        header = ROW.format("cache", "way", "load s", "ready s", "(forward s)", "RSS before MB", "RSS loaded MB",
                            "weights MB", "peak RSS MB", "all read MB")  # fmt: skip
        results = {}
        for cache in caches:
            print(header)
            for mode in MODES:
                runs = []
                for _ in range(args.repeats):
                    drop_page_cache() if cache == "cold" else warm_page_cache(ckpt_dir)
                    runs.append(run_child(mode, ckpt_dir))
                best = min(runs, key=lambda r: r["ready_s"])
                best["peak_mb"] = max(r["peak_mb"] for r in runs)
                best["peak_all_mb"] = max(r["peak_all_mb"] for r in runs)
                results[cache, mode] = best
                times = (f"{best[k]:.2f}" for k in ("load_s", "ready_s", "forward_s"))
                sizes = (f"{best[k]:.0f}" for k in ("rss_before_mb", "rss_loaded_mb", "weights_mb", "peak_mb",
                                                     "peak_all_mb"))  # fmt: skip
                print(ROW.format(cache, mode, *times, *sizes))
        summary(results, caches)
        if args.json:
            rows = [{"cache": cache, "way": mode, **r} for (cache, mode), r in results.items()]
            out = {"machine": machine(), "checkpoint_MB": size_mb, "shape": shape, "rows": rows}
            args.json.write_text(json.dumps(out, indent=2))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
