"""Weight-only int8 and int4 decoding (llama/quant/) against bf16 on a CPU, batch 1.

On random weights of the 0.85B shape (bench_decode.py's, whose helpers this reuses), one process:

1. GEMV: one input row through every linear weight, as a decode step: bf16's C kernel (cpu_gemv) against the
   int8 and int4 kernels (csrc/gemv_quant.c); ms per pass and GB/s of packed weights and scales read. The
   int8 and int4 rows are the library's default kernels (the input row rounded to int8); "exact" rows take it
   as it is (``use_int8_inputs(model, False)``). `--gemv_only` stops here.
2. Decoding: ms/token of the default loop and the fast path (compile=True) for bf16, int8 and int4, timed in
   interleaved rounds (bench_decode.decode_ms_per_token), and two shares of 32 greedy tokens of int8 and int4
   equal to bf16's: generated freely, position by position (after one flip the texts differ, so every later
   step may too), and step by step on bf16's own text (each step reads bf16's tokens so far), with how close
   bf16's top two logits are and, for scale, the step-by-step share of the same weights in fp32.
3. Memory: in a fresh process each, ``Llama.build`` of a bf16 checkpoint of these weights without and with
   quantize=...: RSS once built, peak RSS (VmHWM), and the model's tensor bytes.

    python benchmarks/bench_quant.py
    python benchmarks/bench_quant.py --dim 512 --n_layers 4 --skip_memory   # quick
    OMP_NUM_THREADS=1 python benchmarks/bench_quant.py   # one thread: per-core figures on a busy machine

On a machine shared with other jobs, OpenMP kernels whose threads wait for each other at every call lose far
more than their share when a thread is descheduled; one thread gives steadier, per-core figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, NamedTuple

import torch
from bench_decode import SHAPES, best_of, decode_ms_per_token, quantized, random_model, read_bandwidth

from llama import Llama
from llama.distributed import default_dtype_scope, setup_model_parallel
from llama.engine.fast import FastDecoder
from llama.kernels import cpu_gemv
from llama.model import ModelArgs, Transformer
from llama.quant import kernels as quant_kernels
from llama.quant.linear import QuantizedLinear, is_parallel_linear, use_int8_inputs
from llama.quant.scheme import DEFAULT_GROUP_SIZE
from llama.weights import checkpoint

MODES = ("int8", "int4")


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def tensor_bytes(model: torch.nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if not t.is_complex())


def child(ckpt_dir: str, tokenizer: str, mode: str) -> None:
    """Build from ckpt_dir in this fresh process; print memory figures as JSON."""
    before = status_mb("VmRSS")
    start = time.perf_counter()
    generator = Llama.build(ckpt_dir, tokenizer, max_seq_len=64, max_batch_size=1, device="cpu",
                            dtype=torch.bfloat16, quantize=None if mode == "bf16" else mode)  # fmt: skip
    seconds = time.perf_counter() - start
    built = status_mb("VmRSS")
    generator.model.forward(torch.tensor([[1]]), 0)  # reads every weight
    print(json.dumps({"mode": mode, "build_s": seconds, "rss_before_MB": before, "rss_built_MB": built,
                      "rss_after_forward_MB": status_mb("VmRSS"), "peak_rss_MB": status_mb("VmHWM"),
                      "tensor_MB": tensor_bytes(generator.model) / 2**20}))  # fmt: skip


def memory_rows(model: Transformer, workdir: Path) -> list[dict]:
    """Write model as a bf16 checkpoint with a 32000-piece tokenizer; build it in fresh processes."""
    import mistral_common

    tokenizer = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    ckpt = workdir / "bf16"
    params = {k: getattr(model.params, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of")}
    checkpoint.save_checkpoint(ckpt, [model.state_dict()], {**params, "norm_eps": 1e-5, "vocab_size": -1})
    rows = []
    for mode in ("bf16", *MODES):
        cmd = [sys.executable, __file__, "--child", str(ckpt), str(tokenizer), mode]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), *sys.path])}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def demo_agreement(steps: int) -> dict[str, float]:
    """Share of `steps` greedy tokens equal to bf16's, position by position, on the trained demo model (random
    weights give near-tied logits, where any rounding flips the choice at once) for three prompts, bf16."""
    from llama.demo import DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH

    prompts = ["A computer is", "The meaning of life is", "Never trust a man who"]
    greedy = {}
    for mode in ("bf16", *MODES):
        g = Llama.build(str(DEMO_CKPT_DIR), str(DEMO_TOKENIZER_PATH), max_seq_len=64, max_batch_size=3,
                        device="cpu", dtype=torch.bfloat16, quantize=None if mode == "bf16" else mode)  # fmt: skip
        ids = [g.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        # one prompt at a time: batch 1, the C kernels' path; EOS is not a stop (ids -1 never come)
        g.tokenizer.stop_ids = [-1]
        greedy[mode] = [g.generate([i], max_gen_len=steps, temperature=0)[0][0] for i in ids]
    out = {}
    for mode in MODES:
        same = [sum(a == b for a, b in zip(x, y)) for x, y in zip(greedy[mode], greedy["bf16"])]
        out[mode] = sum(same) / (steps * len(prompts))
        print(f"  demo model, {mode}: {out[mode] * 100:.0f}% of {steps} greedy tokens equal to bf16's, per prompt "
              f"{same}")  # fmt: skip
    return out


class Forced(NamedTuple):
    share: float  # of the steps where the variant's greedy token equals the reference's
    gaps: list[float]  # at each step, the variant's top-1 logit minus its top-2


def forced_agreement(decoder: FastDecoder, prompt: list[int], reference: list[int]) -> Forced:
    """Greedy agreement step by step, on the same text: the variant reads the prompt and then the reference's
    own tokens, and at each step its greedy choice is compared with the reference's next token. Unlike the
    free-running share, one flip does not send the two down different texts for every later step."""
    tokens = torch.tensor([prompt + reference])
    picks, gaps = [], []
    with torch.inference_mode():
        logits = decoder.prefill(tokens[:, : len(prompt)], 0)[:, -1]
        for pos in range(len(prompt), len(prompt) + len(reference)):
            picks.append(int(logits[0].argmax()))  # as generate() picks: the first of tied logits
            top = logits[0].float().topk(2).values
            gaps.append(float(top[0] - top[1]))
            if pos < tokens.shape[1] - 1:
                logits = decoder(tokens[:, pos : pos + 1], pos)[:, -1]
    return Forced(sum(a == b for a, b in zip(picks, reference)) / len(reference), gaps)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        return child(*sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, default in SHAPES["cpu"].items():
        parser.add_argument(f"--{key}", type=int, default=default)
    parser.add_argument("--max_seq_len", type=int, default=256)
    parser.add_argument("--gen_short", type=int, default=8)
    parser.add_argument("--gen_long", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds of timing")
    parser.add_argument("--agree_steps", type=int, default=32)
    parser.add_argument("--group_size", type=int, default=DEFAULT_GROUP_SIZE)
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--demo_only", action="store_true", help="only the greedy agreement on the demo model")
    parser.add_argument("--gemv_only", action="store_true", help="the demo model's agreement and the GEMV pass only")
    parser.add_argument("--json", default=None)
    opts = parser.parse_args()

    cpu = torch.device("cpu")
    setup_model_parallel(1, cpu)
    print("Greedy agreement on the trained demo model:")
    demo = demo_agreement(opts.agree_steps)
    if opts.demo_only:
        return
    shape = {k: getattr(opts, k) for k in SHAPES["cpu"]}
    args = ModelArgs(**shape, max_batch_size=1, max_seq_len=opts.max_seq_len)
    models = {"bf16": random_model(args, cpu, torch.bfloat16)}
    for mode in MODES:  # a model sharing the bf16 embedding and norms, its linear layers quantized
        start = time.perf_counter()
        models[mode] = quantized(models["bf16"], mode, opts.group_size)
        print(f"quantized to {mode} in {time.perf_counter() - start:.1f} s")

    bandwidth = read_bandwidth(cpu)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads, load average {os.getloadavg()[0]:.1f}; shape {shape}")  # fmt: skip
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; C kernels: bf16 {cpu_gemv.available()}, "
          f"quantized {quant_kernels.available()}")  # fmt: skip
    results: dict = {"shape": shape, "bandwidth_GBps": bandwidth / 1e9, "torch": torch.__version__,
                     "demo_greedy_agreement": demo}  # fmt: skip

    # Variants: name -> (model, int8 inputs). "exact": the kernels take the input rows as they are (the
    # library's default rounds them to int8).
    variants = {"bf16": ("bf16", False)}
    for mode in MODES:
        variants[mode], variants[f"{mode} exact"] = (mode, True), (mode, False)

    def select(name: str) -> Transformer:
        mode, int8_x = variants[name]
        return models[mode] if mode == "bf16" else use_int8_inputs(models[mode], int8_x)

    # 1. GEMV: every linear weight once, one input row
    print("\nGEMV, one row through every linear weight:   ms/pass   GB/s   MB read   % of read bandwidth")
    gemv = []
    for name in variants:
        model = select(name)
        layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) or is_parallel_linear(m)]
        size = sum(tensor_bytes(m) for m in layers)
        x = {m: torch.randn(1, getattr(m, "in_features", None) or m.weight.shape[1]).bfloat16() for m in layers}

        def one_pass(layers=layers, x=x, bf16=name == "bf16") -> None:
            with torch.inference_mode():
                for m in layers:
                    torch.ops.llama.linear_bf16(x[m], m.weight) if bf16 else m(x[m])

        one_pass()
        t = best_of(one_pass, cpu, 5)
        gemv.append({"variant": name, "ms": t * 1e3, "GBps": size / t / 1e9, "MB": size / 1e6})
        print(f"  {name:8s} {'':34s} {t * 1e3:7.1f} {size / t / 1e9:6.1f} {size / 1e6:9.0f}   "
              f"{size / t / bandwidth * 100:5.0f}%")  # fmt: skip
    results["gemv"] = gemv
    if opts.gemv_only:
        if opts.json:
            Path(opts.json).write_text(json.dumps(results, indent=2))
        return

    # 2. Decoding
    tokenizer = SimpleNamespace(eos_id=-2, pad_id=-1, stop_ids=[-2])  # an EOS that never comes
    no_chat = SimpleNamespace()  # generate() needs no chat format
    prompt = [[1] + [100 + i for i in range(15)]]
    default, fast = {}, {}
    for mode, model in models.items():
        default[mode] = Llama(model, tokenizer, formatter=no_chat)  # type: ignore[arg-type]
        decoder = FastDecoder(model, compile=True)
        fast[mode] = Llama(model, tokenizer, fast=decoder, formatter=no_chat)  # type: ignore[arg-type]

    def run(name: str, path: str) -> Callable[[int], object]:
        def generate(n: int) -> object:
            select(name)  # sets the int8-input switch of the shared quantized model
            return (fast if path == "fast" else default)[variants[name][0]].generate(prompt, max_gen_len=n,
                                                                                     temperature=0)  # fmt: skip

        return generate

    contenders = {}
    for name in variants:
        for path in ("default", "fast"):
            if path == "fast":
                start = time.perf_counter()
                run(name, path)(opts.gen_short)
                print(f"{name} fast path compile + first run: {time.perf_counter() - start:.1f} s")
            if path == "fast" or not name.endswith("exact"):
                contenders[f"{name} {path}"] = run(name, path)
    ms = decode_ms_per_token(contenders, cpu, opts.gen_short, opts.gen_long, opts.repeat)
    greedy = {name: run(name, "fast")(opts.agree_steps)[0][0] for name in variants}
    agree = {name: sum(a == b for a, b in zip(greedy[name], greedy["bf16"])) / opts.agree_steps for name in variants}
    # once one token differs, the sequences continue from different text: the first difference says more
    first = {name: next((i for i, (a, b) in enumerate(zip(greedy[name], greedy["bf16"])) if a != b), opts.agree_steps)
             for name in variants}  # fmt: skip
    forced = {}
    for name in variants:
        select(name)
        forced[name] = forced_agreement(fast[variants[name][0]].fast, prompt[0], greedy["bf16"])
    # bf16 rounding alone, for scale: the same weights in fp32, step by step on bf16's text
    with default_dtype_scope(torch.float32):
        model32 = Transformer(args).eval()
    model32.load_state_dict(models["bf16"].state_dict())  # widened to fp32 as it is copied
    fp32 = forced_agreement(FastDecoder(model32, compile=True), prompt[0], greedy["bf16"])
    results["per_step_agreement_fp32_vs_bf16"] = fp32.share
    del model32
    results["decode_ms_per_token"], results["greedy_agreement"] = ms, agree
    results["greedy_first_difference"], results["per_step_agreement"] = first, forced
    print(f"\nbatch 1, {opts.max_seq_len}-position cache:  ms/token   tok/s   vs bf16 (same path)   greedy = bf16"
          "   equal up to step   per step = bf16")  # fmt: skip
    for name, t in ms.items():
        variant, path = name.rsplit(" ", 1)  # "int8 exact fast" -> ("int8 exact", "fast")
        print(f"  {name:16s} {'':15s} {t:8.1f} {1e3 / t:7.1f}   {ms[f'bf16 {path}'] / t:5.2f}x"
              f"{'':14s}{agree[variant] * 100:5.0f}%   {first[variant]:8d}"
              f"{'':11s}{forced[variant].share * 100:5.0f}%")  # fmt: skip
    print(f"  the same weights in fp32 against bf16, step by step on bf16's text: {fp32.share * 100:.0f}% equal "
          "(what rounding to bf16 alone does)")  # fmt: skip
    gaps = forced["bf16"].gaps
    print(f"bf16's top-1 minus top-2 logit over those steps: median {sorted(gaps)[len(gaps) // 2]:.4f}, "
          f"min {min(gaps):.4f}")  # fmt: skip

    # 3. Memory
    if not opts.skip_memory:
        with tempfile.TemporaryDirectory(prefix="bench_quant_") as workdir:
            rows = memory_rows(models["bf16"], Path(workdir))
        results["memory"] = rows
        print("\nLlama.build, fresh process: build s   RSS built MB   RSS after forward MB   peak RSS MB   tensors MB")
        for r in rows:
            print(f"  {r['mode']:6s} {'':22s}{r['build_s']:7.1f} {r['rss_built_MB']:13.0f} "
                  f"{r['rss_after_forward_MB']:21.0f} {r['peak_rss_MB']:13.0f} {r['tensor_MB']:12.0f}")  # fmt: skip
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
