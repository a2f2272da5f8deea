"""Weights on disk (layer 3, over ``llama.model`` and ``llama.quant``): the layout read from the model's own layer
declarations, float checkpoint folders, and quantized ones."""
