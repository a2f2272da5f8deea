"""The bf16 matrix-vector products of one decoded token on a CPU: torch's kernel against llama/kernels/cpu_gemv.py's.

It builds a random model of the given shape (defaults: the 0.85B CPU shape of bench_decode.py), far more
bytes than the caches hold, and times one pass of one input row through all of its linear weights, as a
decode step does. Each pass reads every weight once, so bytes / time is the speed at which the kernel
streams the weights; the script prints it next to the machine's read bandwidth (a sum over a 1 GiB buffer).

    python benchmarks/bench_gemv.py
    python benchmarks/bench_gemv.py --dim 4096 --n_layers 32 --n_heads 32 --n_kv_heads 32   # Llama-2-7B
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
from bench_decode import SHAPES, best_of, random_model, read_bandwidth

from llama.distributed import setup_model_parallel
from llama.kernels import cpu_gemv
from llama.model import ModelArgs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = dict(SHAPES["cpu"])
    for key, default in shape.items():
        parser.add_argument(f"--{key}", type=int, default=default)
    parser.add_argument("--repeat", type=int, default=10)
    opts = parser.parse_args()
    if not cpu_gemv.available():
        raise SystemExit("the C kernel could not be built here (see the warning above); nothing to compare")

    cpu = torch.device("cpu")
    setup_model_parallel(1, cpu)
    model = random_model(ModelArgs(**{k: getattr(opts, k) for k in shape}, max_batch_size=1), cpu, torch.bfloat16)
    # Every weight a decode step multiplies by (the embedding table is only indexed).
    weights = [p for name, p in model.named_parameters() if p.ndim == 2 and not name.startswith("tok_embeddings")]
    gen = torch.Generator().manual_seed(0)
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], generator=gen).to(torch.bfloat16) for w in weights}
    total = sum(w.numel() * w.element_size() for w in weights)

    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads")
    bandwidth = read_bandwidth(cpu)
    print(f"{len(weights)} weights, {total / 1e9:.2f} GB in bf16; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    for name, linear in (("torch F.linear", F.linear), ("llama::linear_bf16", torch.ops.llama.linear_bf16)):

        def one_pass(linear=linear) -> None:  # one input row through every weight, as a decode step
            with torch.inference_mode():
                for w in weights:
                    linear(inputs[w.shape[1]], w)

        one_pass()  # warm-up
        t = best_of(one_pass, cpu, opts.repeat)
        print(f"  {name:20s} {t * 1e3:7.1f} ms per pass  {total / t / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
