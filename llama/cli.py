"""Argument handling shared by the example scripts."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from llama.distributed import is_main_process
from llama.generation import Llama

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """torch dtype for "float32" / "float16" / "bfloat16"; None keeps Llama.build's default."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


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
    )
    if is_main_process():
        print(f"Using {name}")
    return generator
