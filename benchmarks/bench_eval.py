"""lm-eval loglikelihood requests per second: our lm-eval model (``llama.eval.harness.LlamaLM``) against lm-eval's
own HF backend (``HFLM``) on the same weights, and the perplexity command's tokens per second.

A random-weight model of a Llama 2 shape (with the demo model's 4096-piece tokenizer) is written as a Meta
checkpoint and converted by ``llama.convert.to_hf``; both backends score the same ``loglikelihood`` requests (a
context of held-out fortunes, then a continuation of 1 to 8 words, like a multiple-choice task's), in the same
process, best of --repeat runs each, at each batch size of --batch_sizes. Ours runs the faithful forward and, with
``compile=True``, the fast path's prefill. The loglikelihoods of the two backends are compared as a check.

    python benchmarks/bench_eval.py                                 # CPU, bf16, dim 512, 8 layers, 128 requests
    python benchmarks/bench_eval.py --dim 1024 --n_layers 12 --requests 256 --batch_sizes 8,32
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


def make_checkpoint(folder: Path, dim: int, n_layers: int, n_heads: int, n_kv_heads: int) -> Path:
    from llama.demo import DEMO_TOKENIZER_PATH
    from llama.distributed import setup_model_parallel
    from llama.model import ModelArgs, Transformer
    from llama.tokenizer import Tokenizer
    from llama.weights import checkpoint
    from llama.weights.layout import Layout

    vocab = Tokenizer(DEMO_TOKENIZER_PATH).n_words
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab,
                     multiple_of=64, max_seq_len=64, max_batch_size=1)  # fmt: skip
    torch.manual_seed(0)
    setup_model_parallel(None, torch.device("cpu"))
    with torch.device("meta"):
        model = Transformer(args)
    state = {k: torch.randn(v.shape) * (v.shape[-1] ** -0.5) for k, v in model.state_dict().items()}
    state = {k: (torch.ones_like(v) if "norm" in k else v).to(torch.bfloat16) for k, v in state.items()}
    params = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads, "multiple_of": 64,
              "norm_eps": 1e-5, "vocab_size": -1}  # fmt: skip
    out = folder / "meta"
    checkpoint.save_checkpoint(out, Layout.from_model(model).split_state_dict(state, 1), params)
    return out


def requests(n: int, seed: int = 0):
    """n (context, continuation) loglikelihood requests from the held-out fortunes."""
    from lm_eval.api.instance import Instance

    text = (REPO / "tests" / "data" / "demo_heldout.txt").read_text(encoding="utf-8")
    words = text.split()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        start = rng.randrange(0, len(words) - 200)
        n_context = rng.randrange(20, 120)
        context = " ".join(words[start : start + n_context])
        continuation = " " + " ".join(words[start + n_context : start + n_context + rng.randrange(1, 9)])
        out.append(Instance("loglikelihood", {}, (context, continuation), i, ("bench", i, 1)))
    return out


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--n_layers", type=int, default=8)
    parser.add_argument("--n_heads", type=int, default=8)
    parser.add_argument("--n_kv_heads", type=int, default=4)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--batch_sizes", default="8,32")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lm_eval.models.huggingface import HFLM

    import llama.eval.harness  # noqa: F401  (registers `llama`; imports lm-eval's models)
    from llama import Llama
    from llama.checks import parse_dtype
    from llama.demo import DEMO_TOKENIZER_PATH
    from llama.eval.harness import LlamaLM
    from llama.hf.convert import to_hf

    dtype = parse_dtype(args.dtype)
    reqs = requests(args.requests)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads; shape dim {args.dim}, {args.n_layers} layers, {args.n_heads}/{args.n_kv_heads} heads, "
          f"vocab 4096, {args.dtype}; {len(reqs)} loglikelihood requests")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp), args.dim, args.n_layers, args.n_heads, args.n_kv_heads)
        hf_dir = to_hf(str(ckpt), str(DEMO_TOKENIZER_PATH), str(Path(tmp) / "hf"))
        rows = []
        reference = None
        for bsz in [int(b) for b in args.batch_sizes.split(",")]:
            hf = HFLM(pretrained=str(hf_dir), dtype=args.dtype, batch_size=bsz, max_length=512, device="cpu")
            seconds, hf_answers = best_of(lambda hf=hf: hf.loglikelihood(reqs, disable_tqdm=True), args.repeat)
            rows.append((f"lm-eval hf, batch {bsz}", seconds, hf_answers))
            reference = reference or hf_answers
            del hf
            for compile in (False, True):
                generator = Llama.build(str(ckpt), str(DEMO_TOKENIZER_PATH), max_seq_len=512, max_batch_size=bsz,
                                        device="cpu", dtype=dtype, compile=compile)  # fmt: skip
                ours = LlamaLM(generator=generator)
                seconds, answers = best_of(lambda ours=ours: ours.loglikelihood(reqs, disable_tqdm=True), args.repeat)
                rows.append((f"llama{' compile=True' if compile else ''}, batch {bsz}", seconds, answers))
        print(f"{'backend':32} {'seconds':>8} {'requests/s':>11} {'max |dlogprob| vs hf':>22} {'same greedy':>12}")
        for name, seconds, answers in rows:
            diff = max(abs(a[0] - b[0]) for a, b in zip(answers, reference))
            same = sum(a[1] == b[1] for a, b in zip(answers, reference))
            print(f"{name:32} {seconds:8.2f} {len(reqs) / seconds:11.1f} {diff:22.2e} {same:>8}/{len(reqs)}")


if __name__ == "__main__":
    main()
