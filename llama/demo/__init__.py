"""A tiny Llama 2 architecture model trained on Debian's fortune cookies, shipped for demos and tests.

This folder is a Meta-layout checkpoint (``consolidated.00.pth``, ``params.json``) plus its ``tokenizer.model``;
see MODEL_CARD.md at the repository root for the data, training and evaluation, and tools/train_demo.py to
rebuild it::

    from llama import Llama
    from llama.demo import DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH

    generator = Llama.build(str(DEMO_CKPT_DIR), str(DEMO_TOKENIZER_PATH), max_seq_len=128, max_batch_size=4)
    print(generator.text_completion(["A computer is"], max_gen_len=48)[0]["generation"])
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DEMO_CKPT_DIR = DEMO_DIR
DEMO_TOKENIZER_PATH = DEMO_DIR / "tokenizer.model"

__all__ = ["DEMO_CKPT_DIR", "DEMO_DIR", "DEMO_TOKENIZER_PATH"]
