"""How the example scripts turn their arguments into a ``Llama`` (argument checks themselves: ``llama.checks``)."""

from __future__ import annotations

import logging
from typing import Optional

from llama.checks import parse_dtype
from llama.distributed import is_main_process
from llama.generation import Llama


def resolve_model(ckpt_dir: Optional[str], tokenizer_path: Optional[str]) -> tuple[str, str, str]:
    """(ckpt_dir, tokenizer_path, description): the built-in demo model when neither path is given."""
    if ckpt_dir is None and tokenizer_path is None:
        from llama.demo import DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH

        return str(DEMO_CKPT_DIR), str(DEMO_TOKENIZER_PATH), "the built-in demo model (see MODEL_CARD.md)"
    if ckpt_dir is None or tokenizer_path is None:
        raise ValueError("give both ckpt_dir and tokenizer_path, or neither to use the built-in demo model")
    return ckpt_dir, tokenizer_path, ckpt_dir


def build_generator(
    ckpt_dir: Optional[str],
    tokenizer_path: Optional[str],
    max_seq_len: int,
    max_batch_size: int,
    device: Optional[str],
    dtype: Optional[str],
    compile: bool,
    timeout_s: Optional[float] = None,
    quantize: Optional[str] = None,
) -> Llama:
    """Llama.build from the example scripts' arguments; rank 0 logs at INFO and says which model it uses."""
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING, format="%(message)s")
    ckpt_dir, tokenizer_path, name = resolve_model(ckpt_dir, tokenizer_path)
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        device=device,
        dtype=parse_dtype(dtype),
        compile=compile,
        timeout_s=timeout_s,
        quantize=quantize,
    )
    if is_main_process():
        print(f"Using {name}")
    return generator
