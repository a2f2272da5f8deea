"""Weight-only int8 and int4 quantization (layer 2: imports only ``llama.model``, ``llama.kernels``, torch and
fairscale).

- ``scheme``: ``Scheme`` (mode and group size), the formats, and what a quantized weight's scales are stored as;
- ``tensor``: quantizing, packing, unpacking and dequantizing a weight, in torch;
- ``kernels``: the C kernels of ``csrc/gemv_quant.c`` and the torch operators ``llama::linear_int8`` and
  ``llama::linear_int4`` over them, registered once by that module;
- ``linear``: ``QuantizedLinear``, and ``quantize_model``, which swaps a model's linear layers for it.

The quantized checkpoint format and loading are ``llama.weights.quantized``; ``python -m llama.quantize`` writes
such a checkpoint.
"""
