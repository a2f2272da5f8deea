"""Batch-1 (and larger) greedy decoding speed: our faithful path, our fast path and Hugging Face transformers.

All of them run the same random weights in one process, side by side. The script first measures the machine's
memory read bandwidth, because decoding one token reads every weight once (of the embedding table, one row):
bytes of weights / bandwidth is a hard floor on the time per token, and each result is reported as a
percentage of that limit, for the bytes its own weights take.

    python benchmarks/bench_decode.py                         # CPU: the 0.85B shape in bf16, int8 and int4
    python benchmarks/bench_decode.py --device cuda           # GPU: the Llama-2-7B shape, batches 1, 8, 32
    python benchmarks/bench_decode.py --dim 512 --n_layers 4  # any shape
    PYTHONPATH=<llama-cpp-python> python benchmarks/bench_decode.py --llama_cpp   # and llama.cpp, same weights

Memory: on CPUs the fast path moves the model's weights into 2 MB pages (llama/kernels/pages.py), and the faithful
rows share those weights; transformers' copy is moved too, and llama.cpp reads its memory-mapped file's page cache
(large pages on this kind of system), so every contender streams its weights from large pages.

On a CPU with bf16 weights the fast path runs its linear layers through the C kernel of llama/kernels/cpu_gemv.py;
the row "fast, torch GEMV" is the same path with torch's kernels, to show what the kernel brings.
`--quantize int8,int4` (the default on CPUs; "" for none) adds the fast path on the same weights quantized by
llama/quant/ ("fast int8", "fast int4": the CPU kernels round the input rows to int8, the library's
default), and with the exact kernels ("fast int8 (exact)": ``use_int8_inputs(model, False)``;
`--int8_inputs` picks which of the two are shown).
`--llama_cpp` adds llama.cpp on the same weights at batch 1 on CPUs (benchmarks/llama_cpp_contender.py): the
bf16 GGUF file ("llama.cpp"), and for each mode of --quantize the file llama.cpp's own quantizer makes from it
(int8: "llama.cpp q8_0", int4: "llama.cpp q4_0"). "vs llama.cpp same dtype" is llama.cpp's time over ours for
the same weights (bf16 against bf16, int8 against q8_0, int4 against q4_0): above 1 where ours is faster.

Prefill, for each dtype: the time to evaluate a prompt of each of --prefill_lens tokens on an empty cache.
Ours are the faithful path's ``model.forward`` and the fast path's ``FastDecoder.prefill`` (fp32 attention and
GEMMs on CPUs; see llama/engine/fast.py), which both return the logits of every position, as the reference does,
and the fast path's prefill of the last position's logits alone ("fast last": what generation after a prompt
reads, and what the fast path's generate and engine compute when no prompt logprobs are asked for). llama.cpp
evaluates the prompt in one batch and computes the last position's logits only: its ratio is to "fast last".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from llama import Llama
from llama.distributed import default_dtype_scope, setup_model_parallel
from llama.engine.fast import FastDecoder
from llama.kernels import pages
from llama.model import ModelArgs, Transformer
from llama.quant import kernels as quant_kernels
from llama.quant.linear import QuantizedLinear, is_parallel_linear, quantize_model, use_int8_inputs
from llama.quant.scheme import DEFAULT_GROUP_SIZE, MODES, Scheme

SHAPES = {
    "cpu": dict(dim=2048, n_layers=16, n_heads=16, n_kv_heads=4, vocab_size=32000, multiple_of=256),
    "cuda": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=None, vocab_size=32000, multiple_of=256),
    # Llama 3.2 1B, the Llama 3 people run on CPUs (FFN 8192, 128256-token vocabulary, scaled RoPE)
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                        ffn_dim_multiplier=1.5, rope_theta=500000.0, use_scaled_rope=True),
}  # fmt: skip
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
GGUF_TYPES = {"int8": "q8_0", "int4": "q4_0"}  # llama.cpp's file type next to each of our modes
EXACT = " (exact)"  # the suffix of quantized rows whose CPU kernels take the input rows as they are


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_of(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """The fastest of `repeat` timed runs, in seconds (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def read_bandwidth(device: torch.device, gigabytes: float = 1.0) -> float:
    """Bytes per second at which this device reads a buffer far larger than its caches (a sum over it)."""
    buf = torch.ones(int(gigabytes * 2**30) // 4, dtype=torch.float32, device=device)
    buf.sum()
    seconds = best_of(lambda: buf.sum(), device, repeat=5)
    return buf.numel() * 4 / seconds


def random_model(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> Transformer:
    with torch.device(device), default_dtype_scope(dtype):
        model = Transformer(args)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def hf_model(model: Transformer, dtype: torch.dtype, device: torch.device):
    """Hugging Face's LlamaForCausalLM with model's weights, configured by the config.json that to_hf writes."""
    import transformers

    from llama.hf.config import hf_config
    from llama.weights.layout import meta_to_hf_state_dict

    a = model.params
    # bos 1, eos 2: any ids do, as the benchmark feeds ids and generate runs min_new_tokens steps.
    config = transformers.LlamaConfig.from_dict(hf_config(a, 1, 2, dtype, max_position_embeddings=a.max_seq_len))
    with torch.device(device), default_dtype_scope(dtype):
        hf = transformers.LlamaForCausalLM(config)
    hf.load_state_dict(meta_to_hf_state_dict(model.state_dict(), a), strict=True)
    return hf.eval()


def bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: the state dict (quantized weights and scales; not the KV cache), but
    of the embedding table only one row, left out."""
    state = model.state_dict()
    return sum(t.numel() * t.element_size() for k, t in state.items() if k != "tok_embeddings.weight")


def twin(model: Transformer, args: ModelArgs) -> Transformer:
    """A model of `args` with its own KV cache and RoPE tables that runs model's layers and weights (shared)."""
    weight = model.tok_embeddings.weight
    with torch.device(weight.device), default_dtype_scope(weight.dtype):
        other = Transformer(args)
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear) or is_parallel_linear(module):
            parent, _, child = name.rpartition(".")
            setattr(other.get_submodule(parent) if parent else other, child, module)
    other.load_state_dict(model.state_dict(), assign=True)
    return other.eval()


def quantized(model: Transformer, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> Transformer:
    """A model with model's linear layers quantized to `mode` (llama.quantize), sharing its other weights."""
    return quantize_model(twin(model, model.params), Scheme(mode, group_size)).eval()


def quant_variants(modes: list[str], int8_inputs: str) -> dict[str, tuple[str, bool]]:
    """Our quantized rows: name -> (mode, int8 inputs). int8_inputs: "both", "off" (the exact kernels only) or
    "only" (the kernels with int8 inputs only). The int8-input rows need ``use_int8_inputs``."""
    variants = {}
    for mode in modes:
        if int8_inputs != "off":
            variants[f"fast {mode}"] = (mode, True)
        if int8_inputs != "only":
            variants[f"fast {mode}{EXACT}"] = (mode, False)
    return variants


def fastest_in_rounds(
    contenders: dict[str, Callable[[int], object]], device: torch.device, lengths: list[int], repeat: int
) -> dict[str, dict[int, float]]:
    """The fastest time, in seconds, of each contender (a function of a length) at each length.

    The contenders run in interleaved rounds, each round timing every one of them once at each length, so that
    the load of other work on a shared machine, which drifts over minutes, falls on all of them alike.
    """
    fastest = {name: dict.fromkeys(lengths, float("inf")) for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            for n in lengths:
                fastest[name][n] = min(fastest[name][n], best_of(lambda fn=fn, n=n: fn(n), device, 1))
    return fastest


def decode_ms_per_token(
    contenders: dict[str, Callable[[int], object]], device: torch.device, short: int, long: int, repeat: int
) -> dict[str, float]:
    """Time per decoded token of each contender (a function generating n tokens), in ms.

    It is the difference of two generation lengths, so prefill and setup cancel out. The contenders run in
    interleaved rounds (fastest_in_rounds), after one warm-up run each at both lengths (first-call
    allocations, compilation); the fastest of the rounds counts.
    """
    for generate in contenders.values():
        generate(short)
        generate(long)
    fastest = fastest_in_rounds(contenders, device, [short, long], repeat)
    return {name: (t[long] - t[short]) / (long - short) * 1e3 for name, t in fastest.items()}


def ours(llama: Llama, prompts: list[list[int]], int8_inputs: Optional[bool] = None) -> Callable[[int], object]:
    """A function that greedily generates n tokens after each prompt with llama. int8_inputs: the state that
    ``use_int8_inputs`` sets first, when one quantized model serves two rows."""

    def generate(n: int) -> object:
        if int8_inputs is not None:
            use_int8_inputs(llama.model, int8_inputs)
        return llama.generate(prompts, max_gen_len=n, temperature=0)

    return generate


def ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def llama_cpp_row(weights: str, model_dtype: str) -> str:
    """The name of llama.cpp's row on the same weights as ours: "llama.cpp" for the model's dtype (bf16),
    "llama.cpp q8_0" for int8, "llama.cpp q4_0" for int4."""
    return "llama.cpp" if weights == model_dtype else f"llama.cpp {GGUF_TYPES[weights]}"


def llama_cpp_files(model: Transformer, modes: list[str], folder: Path) -> dict[str, Path]:
    """Write model as a GGUF file and quantize it with llama.cpp for each mode: our weights name -> the file."""
    import llama_cpp_contender as lcpp

    dtype_name = DTYPE_NAMES[model.tok_embeddings.weight.dtype]
    files = {dtype_name: folder / f"model-{dtype_name}.gguf"}
    lcpp.write_gguf(model, files[dtype_name])
    for mode in modes:
        files[mode] = folder / f"model-{GGUF_TYPES[mode]}.gguf"
        start = time.perf_counter()
        lcpp.quantize_gguf(files[dtype_name], files[mode], GGUF_TYPES[mode])
        print(f"llama.cpp quantized the {dtype_name} GGUF to {GGUF_TYPES[mode]} in {time.perf_counter() - start:.1f} s")
    return files


def decode_table(
    ms: dict[str, float], bsz: int, weights_of: dict[str, str], bytes_of: dict[str, int], bandwidth: float
) -> dict[str, dict]:
    """Each row's columns: the weights it runs, ms/token, tok/s, the ratio to transformers and to llama.cpp on the
    same weights (their time over ours: above 1 where ours is faster), % of its bandwidth limit (batch 1)."""
    model_dtype = weights_of["faithful"]
    table = {}
    for name, t in ms.items():
        weights = weights_of[name]
        theirs = name.startswith("llama.cpp")
        same = None if theirs or name == "transformers" else ms.get(llama_cpp_row(weights, model_dtype))
        table[name] = {
            "weights": GGUF_TYPES.get(weights, weights) if theirs else weights,
            "ms": t,
            "tok_per_s": bsz * 1e3 / t,
            "vs_transformers": ms["transformers"] / t if "transformers" in ms else None,
            "vs_llama_cpp_same_dtype": None if same is None else same / t,
            "percent_of_limit": bytes_of[name] / bandwidth / (t * 1e-3) * 100 if bsz == 1 else None,
        }
    return table


DECODE_ROW = "  {:24s} {:7s} {:>9s} {:>9s} {:>16s} {:>24s} {:>21s}"
PREFILL_ROW = "  {:7s} {:>7} {:>12s} {:>9s} {:>12s} {:>9s}"
PREFILL_THEIRS = "   {:15s} {:>10s} {:>9s} {:>18s}"


def print_decode_table(table: dict[str, dict], bsz: int) -> None:
    print(f"\nbatch {bsz}:")
    print(DECODE_ROW.format("", "weights", "ms/token", "tok/s", "vs transformers", "vs llama.cpp same dtype",
                            "% of bandwidth limit"))  # fmt: skip
    for name, r in table.items():
        pct = "-" if r["percent_of_limit"] is None else f"{r['percent_of_limit']:.0f}%"
        print(DECODE_ROW.format(name, r["weights"], f"{r['ms']:.1f}", f"{r['tok_per_s']:.1f}",
                                ratio(r["vs_transformers"]), ratio(r["vs_llama_cpp_same_dtype"]), pct))  # fmt: skip


def prefill_table(models: dict[str, Transformer], gguf: dict[str, Path], lengths: list[int], repeat: int) -> list[dict]:
    """Time prefilling a prompt of each length on an empty cache, ours and llama.cpp's (if gguf names its files)
    for each of our weights, in interleaved rounds; print the table and return its rows."""
    import llama_cpp_contender as lcpp

    model_dtype = next(iter(models))
    prompts = {n: torch.full((1, n), 100, device=models[model_dtype].tok_embeddings.weight.device) for n in lengths}
    prefill = {}  # "ours <weights>" or llama.cpp's row name -> a function prefilling n tokens
    for weights, model in models.items():
        # a cache as long as the prompt: a model of that length sharing the weights
        long_args = dataclasses.replace(model.params, max_batch_size=1, max_seq_len=max(lengths))
        long_model = twin(model, long_args)
        use_int8_inputs(long_model, True)  # the library's default (the decode rows may have left it off)
        prefill[f"ours {weights}"] = lambda n, m=long_model: m.forward(prompts[n], 0)
        decoder = FastDecoder(long_model, compile=False)  # its prefill is eager
        prefill[f"ours fast {weights}"] = lambda n, d=decoder: d.prefill(prompts[n], 0)
        # what generating after the prompt needs (and what llama.cpp computes): the last position's logits
        prefill[f"ours fast last {weights}"] = lambda n, d=decoder: d.prefill(prompts[n], 0, last_only=True)
        if gguf:  # the longest prompt in one batch; prefiller's reset() and eval() empty the cache each time
            llm = lcpp.load(gguf[weights], max(lengths), n_batch=max(lengths))
            prefill[llama_cpp_row(weights, model_dtype)] = lcpp.prefiller(llm)
    fastest = fastest_in_rounds(prefill, prompts[lengths[0]].device, lengths, repeat)

    print(
        f"\nprefill, the fastest of {repeat} interleaved round(s); ours: logits of every position, and (fast "
        "last) of the last position alone" + ("; llama.cpp: one batch, the last position's logits" if gguf else "")
    )
    theirs_header = PREFILL_THEIRS.format("llama.cpp", "ms", "tok/s", "fast last vs llama.cpp") if gguf else ""
    print(PREFILL_ROW.format("weights", "tokens", "faithful ms", "tok/s", "fast ms", "tok/s")
          + " {:>13s}".format("fast last ms") + theirs_header)  # fmt: skip
    rows = []
    for weights in models:
        for n in lengths:
            t, fast = fastest[f"ours {weights}"][n], fastest[f"ours fast {weights}"][n]
            last = fastest[f"ours fast last {weights}"][n]
            row = {"weights": weights, "tokens": n, "ms": t * 1e3, "tok_per_s": n / t, "fast_ms": fast * 1e3,
                   "fast_tok_per_s": n / fast, "fast_last_ms": last * 1e3}  # fmt: skip
            line = PREFILL_ROW.format(weights, n, f"{t * 1e3:.1f}", f"{n / t:.1f}", f"{fast * 1e3:.1f}",
                                      f"{n / fast:.1f}") + f" {last * 1e3:13.1f}"  # fmt: skip
            if gguf:
                name = llama_cpp_row(weights, model_dtype)
                theirs = fastest[name][n]
                row.update(llama_cpp=name, llama_cpp_ms=theirs * 1e3, llama_cpp_tok_per_s=n / theirs,
                           vs_llama_cpp=theirs / last)  # fmt: skip
                line += PREFILL_THEIRS.format(name, f"{theirs * 1e3:.1f}", f"{n / theirs:.1f}", ratio(theirs / last))
            rows.append(row)
            print(line)
    return rows


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --shape, --dtype and the shape's overrides (--dim, --n_layers...), shared by the benchmarks."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: the device's (cpu/cuda)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of"):
        parser.add_argument(f"--{key}", type=int, default=None)


def model_shape(opts: argparse.Namespace, device: torch.device) -> dict:
    """The ModelArgs fields of --shape (default: the device's), with the overrides given (add_model_arguments)."""
    shape = dict(SHAPES[opts.shape or ("cuda" if device.type == "cuda" else "cpu")])
    shape.update({k: getattr(opts, k) for k in shape if getattr(opts, k, None) is not None})
    return shape


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batch_sizes", default=None, help="comma-separated; default 1 on CPU, 1,8,32 on GPU")
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--gen_short", type=int, default=8)
    parser.add_argument("--gen_long", type=int, default=40)
    parser.add_argument(
        "--max_seq_len", type=int, default=256,
        help="KV cache length for the decode runs (the fast path attends over all of it every step)",
    )  # fmt: skip
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds of decode timing")
    parser.add_argument("--prefill_lens", default="128,512", help='comma-separated prompt lengths; "" for none')
    parser.add_argument("--prefill_repeat", type=int, default=2, help="interleaved rounds of prefill timing")
    parser.add_argument("--skip_hf", action="store_true")
    parser.add_argument(
        "--quantize", default=None,
        help='comma-separated modes of llama.quantize (int8, int4) to add rows for; default "int8,int4" on CPU, '
        '"" (none) on GPU',
    )  # fmt: skip
    parser.add_argument(
        "--int8_inputs", default="both", choices=["both", "off", "only"],
        help="quantized rows with int8 inputs (the default kernels on CPUs), with the exact kernels, or both",
    )  # fmt: skip
    parser.add_argument("--group_size", type=int, default=DEFAULT_GROUP_SIZE, help="of --quantize")
    parser.add_argument(
        "--llama_cpp", action="store_true",
        help="CPU: also time llama.cpp on the same weights, as they are and quantized by llama.cpp (decode at "
        "batch 1, prefill; needs llama-cpp-python and gguf, see benchmarks/llama_cpp_contender.py)",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the results to this file")
    opts = parser.parse_args(argv)

    device = torch.device(opts.device)
    dtype = getattr(torch, opts.dtype)
    dtype_name = DTYPE_NAMES[dtype]
    shape = model_shape(opts, device)
    batch_sizes = [int(b) for b in (opts.batch_sizes or ("1,8,32" if device.type == "cuda" else "1")).split(",")]
    prefill_lens = [int(n) for n in opts.prefill_lens.split(",") if n]
    max_seq_len = max(opts.max_seq_len, opts.prompt_len + opts.gen_long)
    modes = [m for m in (opts.quantize or "").split(",") if m]
    if opts.quantize is None and device.type == "cpu":
        modes = list(MODES)
    if any(m not in MODES for m in modes):
        raise SystemExit(f"--quantize {opts.quantize!r}: use a comma-separated list of {', '.join(MODES)}")
    with_llama_cpp = opts.llama_cpp and device.type == "cpu"
    if opts.llama_cpp and not with_llama_cpp:
        print("--llama_cpp: llama.cpp runs on CPUs only here; skipped")
    if with_llama_cpp:
        import llama_cpp_contender as lcpp

        llama_cpp = lcpp.require()  # before minutes of setup

    setup_model_parallel(1, device)
    # One compiled decode step per model, batch size and int8-input switch: more than dynamo's default of 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    args = ModelArgs(**shape, max_batch_size=max(batch_sizes), max_seq_len=max_seq_len)
    model = random_model(args, device, dtype)
    models = {dtype_name: model}  # our weights name (the dtype's, or a mode of --quantize) -> the model
    results: dict[str, object] = {"shape": shape, "dtype": opts.dtype, "device": str(device),
                                  "torch": torch.__version__, "quantize": modes, "group_size": opts.group_size,
                                  "quantize_s": {}, "decode": [], "prefill": []}  # fmt: skip
    for mode in modes:
        start = time.perf_counter()
        models[mode] = quantized(model, mode, opts.group_size)
        results["quantize_s"][mode] = time.perf_counter() - start
        print(f"quantized to {mode} (groups of {opts.group_size}) in {results['quantize_s'][mode]:.1f} s")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = {weights: bytes_per_token(m) for weights, m in models.items()}
    bandwidth = read_bandwidth(device)
    floor_ms = per_token[dtype_name] / bandwidth * 1e3

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device {device}, {dtype}")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    else:
        print(f"CPU threads: {torch.get_num_threads()}")
    print(f"shape {shape}, {weight_bytes / 1e9:.2f} GB of weights")
    print("read per decoded token (every weight but the embedding table): "
          + ", ".join(f"{w} {n / 1e9:.3f} GB" for w, n in per_token.items()))  # fmt: skip
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s -> limit {floor_ms:.1f} ms/token at batch 1 in {dtype_name}")
    results.update(bandwidth_GBps=bandwidth / 1e9, limit_ms_per_token=floor_ms, bytes_per_token=per_token)

    # llama.cpp runs the weights as they are and as its own quantizer makes them: our weights name -> its file.
    scratch = tempfile.TemporaryDirectory(prefix="bench_decode_")
    gguf: dict[str, Path] = {}
    if with_llama_cpp:
        gguf = llama_cpp_files(model, modes, Path(scratch.name))
        files = {llama_cpp_row(w, dtype_name): lcpp.file_summary(path) for w, path in gguf.items()}
        print(f"llama.cpp's GGUF files (llama-cpp-python {llama_cpp.__version__}):")
        for name, f in files.items():
            types = ", ".join(f"{n} {t}" for t, n in f["tensor_types"].items())
            print(f"  {name:16s} {f['MB']:8.1f} MB   tensors: {types}")
        results["llama_cpp"] = {"version": llama_cpp.__version__, "files": files}

    # An EOS that never comes: every run decodes to the end.
    tokenizer = SimpleNamespace(eos_id=-2, pad_id=-1, stop_ids=[-2])
    faithful = Llama(model, tokenizer)  # type: ignore[arg-type]
    fast = Llama(model, tokenizer, fast=FastDecoder(model, compile=True))  # type: ignore[arg-type]
    fast_torch_gemv = None
    if fast.fast.use_cpu_gemv:
        decoder = FastDecoder(model, compile=True, use_cpu_gemv=False)
        fast_torch_gemv = Llama(model, tokenizer, fast=decoder)  # type: ignore[arg-type]
    fast_quant = {mode: Llama(models[mode], tokenizer, fast=FastDecoder(models[mode], compile=True))  # type: ignore[arg-type]
                  for mode in modes}  # fmt: skip
    # Our quantized rows: name -> (mode, int8 inputs). The int8-input kernels are C kernels, on a CPU.
    variants = quant_variants(modes, opts.int8_inputs)
    if any(x8 for _, x8 in variants.values()) and not (device.type == "cpu" and quant_kernels.available()):
        print("no rows with int8 inputs: they need the quantized C kernels, on a CPU")
        variants = {name: v for name, v in variants.items() if not v[1]}
    # Each row's weights (our dtype name or mode) and the bytes of them a decode step reads.
    weights_of = {name: dtype_name for name in ("faithful", "fast", "fast, torch GEMV", "transformers")}
    weights_of.update({name: mode for name, (mode, _) in variants.items()})
    weights_of.update({llama_cpp_row(w, dtype_name): w for w in gguf})
    bytes_of = {name: per_token[w] for name, w in weights_of.items()}
    if gguf:
        bytes_of.update({name: f["bytes_per_token"] for name, f in files.items()})
    results["bytes_per_token_of_row"] = bytes_of

    hf = None if opts.skip_hf else hf_model(model, dtype, device)
    if hf is not None and device.type == "cpu":
        # The fast path moved the weights our rows share into 2 MB pages (llama.kernels.pages); transformers' copy
        # goes there too, so that every contender reads its weights from large pages (llama.cpp from its file's).
        pages.move_to_huge_pages(hf)
    for bsz in batch_sizes:
        prompts = [[1] + [100 + i] * (opts.prompt_len - 1) for i in range(bsz)]

        contenders = {"faithful": ours(faithful, prompts), "fast": ours(fast, prompts)}
        if fast_torch_gemv is not None and bsz == 1:  # the kernel only serves one row
            contenders["fast, torch GEMV"] = ours(fast_torch_gemv, prompts)
        if hf is not None:
            ids = torch.tensor(prompts, device=device)

            def hf_generate(n: int, ids: torch.Tensor = ids) -> object:
                with torch.inference_mode():
                    return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

            contenders["transformers"] = hf_generate
        llama_cpp_here = with_llama_cpp and bsz == 1
        if llama_cpp_here:
            contenders["llama.cpp"] = lcpp.generator(lcpp.load(gguf[dtype_name], max_seq_len), prompts[0])
        for mode in modes:
            for name, (m, x8) in variants.items():
                if m == mode and (bsz == 1 or not x8):
                    contenders[name] = ours(fast_quant[mode], prompts, x8)
            if llama_cpp_here:
                contenders[llama_cpp_row(mode, dtype_name)] = lcpp.generator(
                    lcpp.load(gguf[mode], max_seq_len), prompts[0]
                )
        if bsz == batch_sizes[0]:
            for name in ("fast", *(n for n in variants if n in contenders)):
                start = time.perf_counter()
                contenders[name](opts.gen_short)
                results.setdefault("compile_s", {})[name] = time.perf_counter() - start
                print(f"{name}: compile + first run {results['compile_s'][name]:.1f} s")
        ms = decode_ms_per_token(contenders, device, opts.gen_short, opts.gen_long, opts.repeat)
        table = decode_table(ms, bsz, weights_of, bytes_of, bandwidth)
        # name -> ms/token as before, and each other column as a dict name -> value
        row = {"batch": bsz, **ms, **{k: {n: r[k] for n, r in table.items()} for k in next(iter(table.values()))}}
        del row["ms"]
        results["decode"].append(row)
        print_decode_table(table, bsz)
        contenders = None  # llama.cpp's models of this batch go

    fast = fast_torch_gemv = fast_quant = hf = None  # free their memory
    if prefill_lens:
        results["prefill"] = prefill_table(models, gguf, prefill_lens, opts.prefill_repeat)
    scratch.cleanup()

    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
