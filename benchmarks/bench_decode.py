"""Batch-1 (and larger) greedy decoding speed: our faithful path, our fast path and Hugging Face transformers.

All three run the same random weights in one process, side by side. The script first measures the machine's
memory read bandwidth, because decoding one token reads every weight once: bytes of weights / bandwidth is a
hard floor on the time per token, and each result is reported as a percentage of that limit.

    python benchmarks/bench_decode.py                         # CPU: the 0.85B shape in bfloat16
    python benchmarks/bench_decode.py --device cuda           # GPU: the Llama-2-7B shape, batches 1, 8, 32
    python benchmarks/bench_decode.py --dim 512 --n_layers 4  # any shape

On a CPU with bf16 weights the fast path runs its linear layers through the C kernel of llama/cpu_gemv.py;
the row "fast, torch GEMV" is the same path with torch's kernels, to show what the kernel brings.
`--llama_cpp` adds llama.cpp on the same weights at batch 1 on CPUs (benchmarks/llama_cpp_contender.py).
"""

from __future__ import annotations

import argparse
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
from llama.fast import FastDecoder
from llama.model import ModelArgs, Transformer, ffn_hidden_dim

SHAPES = {
    "cpu": dict(dim=2048, n_layers=16, n_heads=16, n_kv_heads=4, vocab_size=32000, multiple_of=256),
    "cuda": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=None, vocab_size=32000, multiple_of=256),
    # Llama 3.2 1B, the Llama 3 people run on CPUs (FFN 8192, 128256-token vocabulary, scaled RoPE)
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                        ffn_dim_multiplier=1.5, rope_theta=500000.0, use_scaled_rope=True),
}


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
    import transformers

    from llama.layout import meta_to_hf_state_dict

    a = model.params
    rope_scaling = None
    if a.use_scaled_rope:
        rope_scaling = {"rope_type": "llama3", "factor": a.rope_scaling_factor or 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    config = transformers.LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.dim, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
        num_key_value_heads=a.kv_heads, intermediate_size=ffn_hidden_dim(a.dim, a.multiple_of, a.ffn_dim_multiplier),
        rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, max_position_embeddings=a.max_seq_len,
        tie_word_embeddings=False, rope_scaling=rope_scaling,
    )  # fmt: skip
    with torch.device(device), default_dtype_scope(dtype):
        hf = transformers.LlamaForCausalLM(config)
    hf.load_state_dict(meta_to_hf_state_dict(model.state_dict(), a), strict=True)
    return hf.eval()


def decode_ms_per_token(
    contenders: dict[str, Callable[[int], object]], device: torch.device, short: int, long: int, repeat: int
) -> dict[str, float]:
    """Time per decoded token of each contender (a function generating n tokens), in ms.

    It is the difference of two generation lengths, so prefill and setup cancel out. The contenders run in
    interleaved rounds, each round timing every one of them once at each length, so that the load of other
    work on a shared machine, which drifts over minutes, falls on all of them alike; the fastest of the
    rounds counts.
    """
    for generate in contenders.values():  # warm-up (first-call allocations, compilation)
        generate(short)
        generate(long)
    fastest = {name: {short: float("inf"), long: float("inf")} for name in contenders}
    for _ in range(repeat):
        for name, generate in contenders.items():
            for n in (short, long):
                fastest[name][n] = min(fastest[name][n], best_of(lambda g=generate, n=n: g(n), device, 1))
    return {name: (t[long] - t[short]) / (long - short) * 1e3 for name, t in fastest.items()}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: the device's (cpu/cuda)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of"):
        parser.add_argument(f"--{key}", type=int, default=None)
    parser.add_argument("--batch_sizes", default=None, help="comma-separated; default 1 on CPU, 1,8,32 on GPU")
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--gen_short", type=int, default=8)
    parser.add_argument("--gen_long", type=int, default=40)
    parser.add_argument("--prefill_lens", default="128,2048")
    parser.add_argument(
        "--max_seq_len", type=int, default=256,
        help="KV cache length for the decode runs (the fast path attends over all of it every step)",
    )  # fmt: skip
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds of timing")
    parser.add_argument("--skip_hf", action="store_true")
    parser.add_argument(
        "--llama_cpp", action="store_true",
        help="CPU, batch 1: also time llama.cpp on the same weights (needs llama-cpp-python and gguf, see "
        "benchmarks/llama_cpp_contender.py)",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the results to this file")
    opts = parser.parse_args(argv)

    device = torch.device(opts.device)
    dtype = getattr(torch, opts.dtype)
    shape = dict(SHAPES[opts.shape or ("cuda" if device.type == "cuda" else "cpu")])
    shape.update({k: getattr(opts, k) for k in shape if getattr(opts, k, None) is not None})
    batch_sizes = [int(b) for b in (opts.batch_sizes or ("1,8,32" if device.type == "cuda" else "1")).split(",")]
    prefill_lens = [int(n) for n in opts.prefill_lens.split(",") if n]
    max_seq_len = max(opts.max_seq_len, opts.prompt_len + opts.gen_long)

    setup_model_parallel(1, device)
    args = ModelArgs(**shape, max_batch_size=max(batch_sizes), max_seq_len=max_seq_len)
    model = random_model(args, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = read_bandwidth(device)
    floor_ms = weight_bytes / bandwidth * 1e3

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device {device}, {dtype}")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    else:
        print(f"CPU threads: {torch.get_num_threads()}")
    print(f"shape {shape}, {weight_bytes / 1e9:.2f} GB of weights")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s -> limit {floor_ms:.1f} ms/token at batch 1")

    # An EOS that never comes: every run decodes to the end.
    tokenizer = SimpleNamespace(eos_id=-2, pad_id=-1, stop_ids=[-2])
    faithful = Llama(model, tokenizer)  # type: ignore[arg-type]
    start = time.perf_counter()
    fast = Llama(model, tokenizer, fast=FastDecoder(model, compile=True))  # type: ignore[arg-type]
    fast_torch_gemv = None
    if fast.fast.use_cpu_gemv:
        decoder = FastDecoder(model, compile=True, use_cpu_gemv=False)
        fast_torch_gemv = Llama(model, tokenizer, fast=decoder)  # type: ignore[arg-type]
    results: dict[str, object] = {"shape": shape, "dtype": opts.dtype, "device": str(device),
                                  "torch": torch.__version__, "bandwidth_GBps": bandwidth / 1e9,
                                  "limit_ms_per_token": floor_ms, "decode": [], "prefill": []}  # fmt: skip

    hf = None if opts.skip_hf else hf_model(model, dtype, device)
    scratch = tempfile.TemporaryDirectory(prefix="bench_decode_")  # llama.cpp's copy of the weights
    for bsz in batch_sizes:
        prompts = [[1] + [100 + i] * (opts.prompt_len - 1) for i in range(bsz)]

        def ours(llama: Llama, prompts: list = prompts) -> Callable[[int], object]:
            return lambda n: llama.generate(prompts, max_gen_len=n, temperature=0)

        if bsz == batch_sizes[0]:
            ours(fast)(opts.gen_short)  # compile
            compile_s = time.perf_counter() - start
            print(f"fast path compile + first run: {compile_s:.1f} s")
            results["compile_s"] = compile_s
        contenders = {"faithful": ours(faithful), "fast": ours(fast)}
        if fast_torch_gemv is not None and bsz == 1:  # the kernel only serves one row
            contenders["fast, torch GEMV"] = ours(fast_torch_gemv)
        if hf is not None:
            ids = torch.tensor(prompts, device=device)

            def hf_generate(n: int, ids: torch.Tensor = ids) -> object:
                with torch.inference_mode():
                    return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

            contenders["transformers"] = hf_generate
        if opts.llama_cpp and bsz == 1 and device.type == "cpu":
            from llama_cpp_contender import contender

            contenders["llama.cpp"] = contender(model, prompts[0], Path(scratch.name))
        row = {"batch": bsz, **decode_ms_per_token(contenders, device, opts.gen_short, opts.gen_long, opts.repeat)}
        results["decode"].append(row)
        print(f"\nbatch {bsz}:{'':14s}ms/token   tok/s    vs transformers   % of bandwidth limit")
        for name in contenders:
            ms = row[name]
            vs = f"{row['transformers'] / ms:5.2f}x" if "transformers" in row else "   - "
            pct = floor_ms / ms * 100 if bsz == 1 else float("nan")
            print(f"  {name:18s} {ms:8.1f} {bsz * 1e3 / ms:8.1f}   {vs}            {pct:5.0f}%")

    # Prefill needs a cache as long as the prompt: a second model sharing the same weight tensors.
    fast = fast_torch_gemv = hf = contenders = None  # free their memory
    scratch.cleanup()
    long_args = ModelArgs(**shape, max_batch_size=1, max_seq_len=max(prefill_lens + [max_seq_len]))
    with torch.device(device), default_dtype_scope(dtype):
        long_model = Transformer(long_args)
    long_model.load_state_dict(model.state_dict(), assign=True)
    for n in prefill_lens:
        tokens = torch.full((1, n), 100, device=device)
        seconds = best_of(lambda tokens=tokens: long_model.forward(tokens, 0), device, 1)
        results["prefill"].append({"tokens": n, "ms": seconds * 1e3})
        print(f"prefill {n:5d} tokens (faithful path): {seconds * 1e3:8.1f} ms ({n / seconds:.0f} tok/s)")

    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
