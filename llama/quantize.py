"""Write a weight-only int8 or int4 quantized copy of a checkpoint folder: ``python -m llama.quantize --help``.

    python -m llama.quantize --ckpt_dir llama-2-7b --out_dir llama-2-7b-int4 --mode int4 [--group_size 32]

``Llama.build`` loads the result directly; ``Llama.build(..., quantize="int8" | "int4")`` quantizes a float
checkpoint while loading it instead. The quantization itself lives below this command line: ``llama.quant``
(``scheme``: the formats; ``tensor``: the math; ``kernels``: the C kernels; ``linear``: ``QuantizedLinear`` and
``quantize_model``) and ``llama.weights.quantized`` (the quantized checkpoint format and loading). The names the
README documents from here (``llama.quantize.use_int8_inputs`` ...) are theirs, re-exported.
"""

from __future__ import annotations

import logging

from llama.quant.linear import QuantizedLinear, quantize_model, use_int8_inputs
from llama.quant.scheme import DEFAULT_GROUP_SIZE, MODES, Scheme
from llama.weights import checkpoint
from llama.weights.quantized import quantize_checkpoint

# `python -m llama.quantize` executes this file as __main__: hand over to the one llama.quantize module before
# this copy defines anything, so nothing is defined twice (see commandline.run_module).
if __name__ == "__main__":
    from llama.commandline import run_module

    run_module("llama.quantize", "main")

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "MODES",
    "QuantizedLinear",
    "Scheme",
    "main",
    "quantize_checkpoint",
    "quantize_model",
    "use_int8_inputs",
]

logger = logging.getLogger(__name__)


def main(ckpt_dir: str, out_dir: str, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Write a weight-only quantized copy of a Meta checkpoint folder, which ``Llama.build`` loads directly.

    Args:
        ckpt_dir: folder with params.json and consolidated.NN.pth (float weights, any number of shards).
        out_dir: new folder to write (must not exist): the same shards, with P.qweight and P.scales for every
            linear layer P, params.json with a "quantization" entry, and tokenizer.model if ckpt_dir has one.
        mode: "int8" or "int4" (see ``llama.quant.scheme``).
        group_size: inputs that share one scale; must divide every shard's inputs of each layer.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    progress = checkpoint.ProgressLine("quantize", len(checkpoint.find_shards(ckpt_dir)))
    out = quantize_checkpoint(ckpt_dir, out_dir, mode, group_size, on_shard_saved=progress)
    logger.info("wrote %s (%s, group size %d)", out, mode, group_size)
