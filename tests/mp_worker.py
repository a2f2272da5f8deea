"""Run under torchrun by test_model_parallel.py: build a checkpoint, print greedy results as JSON on rank 0."""

import json
import sys

import torch

from llama import Llama
from llama.distributed import is_main_process


def main(ckpt_dir: str, tokenizer_path: str, prompts: str) -> None:
    generator = Llama.build(
        ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=4, device="cpu", dtype=torch.float32
    )
    texts = json.loads(prompts)
    results = generator.text_completion(texts, temperature=0, max_gen_len=12)
    tokens = torch.tensor([generator.tokenizer.encode(texts[0], bos=True, eos=False)])
    logits = generator.model.forward(tokens, 0)
    if is_main_process():
        print("RESULT " + json.dumps({"generations": [r["generation"] for r in results], "logits": logits.tolist()}))
        sys.stdout.flush()
    # Leave together: a rank that tears gloo down while rank 0 is still writing its result has been seen to
    # abort at exit ("terminate called without an active exception") with 4 ranks on 2 cores.
    torch.distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
