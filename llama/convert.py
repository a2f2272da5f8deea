"""Conversion between Meta's checkpoint folders and Hugging Face ``transformers``' Llama folders, as a command
line: ``python -m llama.convert to_hf|from_hf --help``.

    python -m llama.convert to_hf --ckpt_dir weights/llama-2-7b --tokenizer_path weights/tokenizer.model --out_dir hf
    python -m llama.convert from_hf --hf_dir hf --out_dir meta --model_parallel_size 1

The work is done in ``llama.hf`` (config, tokenizers, weights, and the two drivers in ``llama.hf.convert``).
"""

from __future__ import annotations

from llama.hf.convert import from_hf, to_hf

# `python -m llama.convert` executes this file as __main__: hand over to the one llama.convert module before
# this copy defines anything, so nothing is defined twice (see commandline.run_module).
if __name__ == "__main__":
    from llama.commandline import run_module

    run_module("llama.convert", "to_hf", "from_hf")

__all__ = ["from_hf", "to_hf"]
