"""The faithful model (layer 1: imports only ``llama.checks``, torch and fairscale).

- ``args``: ``ModelArgs`` and the sizes that follow from it;
- ``layers``: RMSNorm, RoPE and the parallel layers, each declaring how ranks split its weight;
- ``kv_cache``: the ``KVCache`` module, the one owner of the cached keys and values;
- ``transformer``: Attention, FeedForward, TransformerBlock, Transformer, side by side with Meta's ``model.py``.
"""

from llama.model.args import ModelArgs, ffn_hidden_dim
from llama.model.kv_cache import CacheRows, KVCache, kv_cache_bytes, kv_cache_shape
from llama.model.layers import (
    ColumnParallelLinear,
    LinearOperands,
    ParallelEmbedding,
    RMSNorm,
    RowParallelLinear,
    StackedLinear,
    VocabParallelEmbedding,
    apply_rotary_emb,
    apply_rotary_emb_real,
    precompute_freqs_cis,
    repeat_kv,
    reshape_for_broadcast,
    rope_cos_sin,
    scale_rope_frequencies,
    stack_linears,
    stack_rows,
)
from llama.model.transformer import (
    Attention,
    BlockOps,
    FeedForward,
    Llama3Transformer,
    Transformer,
    TransformerBlock,
    attention,
    causal_mask,
)

__all__ = [
    "Attention",
    "BlockOps",
    "CacheRows",
    "ColumnParallelLinear",
    "FeedForward",
    "KVCache",
    "Llama3Transformer",
    "LinearOperands",
    "ModelArgs",
    "ParallelEmbedding",
    "RMSNorm",
    "RowParallelLinear",
    "StackedLinear",
    "Transformer",
    "TransformerBlock",
    "VocabParallelEmbedding",
    "apply_rotary_emb",
    "apply_rotary_emb_real",
    "attention",
    "causal_mask",
    "ffn_hidden_dim",
    "kv_cache_bytes",
    "kv_cache_shape",
    "precompute_freqs_cis",
    "repeat_kv",
    "reshape_for_broadcast",
    "rope_cos_sin",
    "scale_rope_frequencies",
    "stack_linears",
    "stack_rows",
]
