"""Re-cut a Meta checkpoint for another model-parallel size: ``python -m llama.reshard --help``.

    python -m llama.reshard --ckpt_dir weights/llama-2-13b --out_dir weights/llama-2-13b-mp1 --model_parallel_size 1

``Llama.build`` already loads any shard count on any world size the heads allow, so resharding is never required.
It pays off when a checkpoint is loaded often with one size: each rank then reads exactly one file.
A quantized checkpoint (``python -m llama.quantize``) is resharded as it is, without dequantizing: P.qweight and
P.scales are cut as the weight P.weight they replace, and each shard must hold whole groups.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from llama.checks import check_positive_int
from llama.families import family_of_folder
from llama.weights import checkpoint, quantized
from llama.weights.checkpoint import ProgressLine

# `python -m llama.reshard` executes this file as __main__: hand over to the one llama.reshard module before
# this copy defines anything, so nothing is defined twice (see commandline.run_module).
if __name__ == "__main__":
    from llama.commandline import run_module

    run_module("llama.reshard", "main")

logger = logging.getLogger(__name__)


def reshard(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    model_parallel_size: int,
    on_shard_saved: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Write a copy of the checkpoint in ckpt_dir split into model_parallel_size shards; return out_dir.

    Output shards are cut one at a time from the memory-mapped input shards and written before the next one is
    made, so memory holds about one output shard, plus the input pages it was cut from (clean page cache, which
    the kernel can reclaim). params.json is copied as is, and tokenizer.model too when the folder has one.
    A quantized checkpoint stays quantized, bit for bit: its groups of inputs must not straddle two shards.
    Everything is checked before anything is written, and an interrupted run leaves nothing behind (see
    ``checkpoint.save_checkpoint``).
    """
    out_dir = Path(out_dir)
    checkpoint.check_out_dir(out_dir, ckpt_dir)
    if out_dir.exists():  # fail before reading anything; save_checkpoint checks again
        raise FileExistsError(f"{str(out_dir)!r} already exists; choose a new output folder or remove it")
    model_parallel_size = check_positive_int("model_parallel_size", model_parallel_size)
    open_checkpoint = checkpoint.open_checkpoint
    if checkpoint.is_quantized(checkpoint.read_params(ckpt_dir)):  # written by python -m llama.quantize
        open_checkpoint = quantized.open_quantized_checkpoint
    # Each generation's own layout: Llama 3 splits the embedding by vocabulary rows, Llama 2 by columns.
    ckpt = open_checkpoint(ckpt_dir, family_of_folder(ckpt_dir).model_cls)
    ckpt.check_split(model_parallel_size)

    def shards() -> Iterator[dict[str, torch.Tensor]]:
        for rank in range(model_parallel_size):
            inputs = ckpt.remap()  # so the input pages read for one output shard leave memory with it
            yield {key: ckpt.slice_for_rank(inputs, key, rank, model_parallel_size) for key in ckpt.keys}

    tokenizer = ckpt.folder / "tokenizer.model"
    extra = [tokenizer] if tokenizer.is_file() else []
    return checkpoint.save_checkpoint(out_dir, shards(), ckpt.folder / "params.json", extra, on_shard_saved)


def main(ckpt_dir: str, out_dir: str, model_parallel_size: int) -> None:
    """Write a copy of a Meta checkpoint folder split for a different model-parallel size.

    Args:
        ckpt_dir: folder with params.json and consolidated.NN.pth (any number of shards; float or quantized).
        out_dir: new folder to write (must not exist); it gets params.json, consolidated.00.pth ... and
            tokenizer.model if ckpt_dir has one.
        model_parallel_size: number of shards to write; must divide the heads, the KV heads and every weight
            split across ranks (dim, the FFN hidden size, the vocabulary: the error lists the sizes that do); for a
            quantized checkpoint, each shard's inputs of every layer must also be whole groups.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    progress = ProgressLine("reshard", model_parallel_size) if isinstance(model_parallel_size, int) else None
    out = reshard(ckpt_dir, out_dir, model_parallel_size, on_shard_saved=progress)
    logger.info("wrote %s (%d shard(s))", out, model_parallel_size)

