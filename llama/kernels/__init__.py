"""C kernels for CPUs (layer 0: imports nothing of ours but each other): how they are built and loaded, the bf16
matrix-vector product and one-query attention. Sources are in ``llama/csrc/``."""
