"""Decoding (layer 4, over the model, the quantized layers and the kernels): where a row ends, the decode loop,
and the faster steps that stand in for the model's forward (the compiled step and the one-call C step)."""
