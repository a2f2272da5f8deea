"""The faithful model (layer 1: imports only ``llama.checks``, torch and fairscale).

- ``args``: ``ModelArgs`` and the sizes that follow from it;
- ``layers``: RMSNorm, RoPE and the parallel layers, each declaring how ranks split its weight;
- ``kv_cache``: the ``KVCache`` module, the one owner of the cached keys and values;
- ``transformer``: Attention, FeedForward, TransformerBlock, Transformer, side by side with Meta's ``model.py``.
"""

from llama.model.args import ModelArgs, ffn_hidden_dim
from llama.model.kv_cache import kv_cache_bytes, kv_cache_shape
from llama.model.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    apply_rotary_emb,
    precompute_freqs_cis,
    repeat_kv,
    reshape_for_broadcast,
    scale_rope_frequencies,
)
from llama.model.transformer import (
    Attention,
    FeedForward,
    Llama3Transformer,
    Transformer,
    TransformerBlock,
    causal_mask,
    check_model_parallel_fit,
)

__all__ = [
    "Attention",
    "ColumnParallelLinear",
    "FeedForward",
    "Llama3Transformer",
    "ModelArgs",
    "ParallelEmbedding",
    "RMSNorm",
    "RowParallelLinear",
    "Transformer",
    "TransformerBlock",
    "VocabParallelEmbedding",
    "apply_rotary_emb",
    "causal_mask",
    "check_model_parallel_fit",
    "ffn_hidden_dim",
    "kv_cache_bytes",
    "kv_cache_shape",
    "precompute_freqs_cis",
    "repeat_kv",
    "reshape_for_broadcast",
    "scale_rope_frequencies",
]
