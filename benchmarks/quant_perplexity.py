"""Held-out perplexity of the built-in demo model in bf16, int8 and int4 (llama/quant/), fp32 compute.

The text is tests/data/demo_heldout.txt, which the demo model never saw; its first --tokens target tokens, in
chunks of at most --max_seq_len positions (tools/demo_eval.py). Each quantized mode runs twice: as the library
runs it (prefill through the exact fp32 GEMM, decoding through the kernels with int8 inputs), and with every
product through the kernels with int8 inputs, as a token-by-token evaluation would run them.

    PYTHONPATH=. python benchmarks/quant_perplexity.py [--tokens 3000] [--max_seq_len 128]  # it reads tools/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llama import Llama
from llama.demo import DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH
from llama.quant import kernels as quant_kernels
from llama.quant.scheme import MODES
from tools import demo_eval

HELDOUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "demo_heldout.txt"


def perplexity(mode: str | None, tokens: int, max_seq_len: int) -> float:
    generator = Llama.build(str(DEMO_CKPT_DIR), str(DEMO_TOKENIZER_PATH), max_seq_len=max_seq_len, max_batch_size=8,
                            device="cpu", dtype=torch.float32, quantize=mode)  # fmt: skip
    docs = demo_eval.target_documents(generator.tokenizer, demo_eval.read_texts(HELDOUT), tokens)
    return demo_eval.perplexity(*demo_eval.model_nll(generator, docs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--max_seq_len", type=int, default=128)
    opts = parser.parse_args()
    base = perplexity(None, opts.tokens, opts.max_seq_len)
    print(f"bf16 checkpoint: perplexity {base:.3f} over {opts.tokens} held-out tokens")
    default_rows = quant_kernels.KERNEL_MAX_ROWS
    for mode in MODES:
        for label, rows in (("as the library runs it", default_rows), ("all products with int8 inputs", 10**9)):
            quant_kernels.KERNEL_MAX_ROWS = rows
            ppl = perplexity(mode, opts.tokens, opts.max_seq_len)
            print(f"{mode}, {label}: {ppl:.3f} ({(ppl / base - 1) * 100:+.2f}%)")
    quant_kernels.KERNEL_MAX_ROWS = default_rows


if __name__ == "__main__":
    main()
