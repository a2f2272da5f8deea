"""Conversion between Meta's checkpoint layout and Hugging Face ``transformers``' Llama layout.

The whole difference is data: a table of parameter names, and one permutation of the q/k projection rows.
Meta's RoPE rotates adjacent pairs (x[2k], x[2k+1]); Hugging Face rotates the two halves of each head
(x[k], x[k + head_dim/2]). Reordering the rows of wq and wk, head by head, turns one into the other.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

# Meta name -> Hugging Face name; "{i}" is the layer index.
META_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
HF_TO_META = {hf: meta for meta, hf in META_TO_HF.items()}


def _translate(name: str, table: Mapping[str, str]) -> str:
    layer = re.search(r"layers\.(\d+)\.", name)
    pattern = name.replace(f"layers.{layer.group(1)}.", "layers.{i}.") if layer else name
    if pattern not in table:
        raise KeyError(f"no mapping for parameter {name!r}")
    return table[pattern].format(i=layer.group(1)) if layer else table[pattern]


def meta_to_hf_name(name: str) -> str:
    return _translate(name, META_TO_HF)


def hf_to_meta_name(name: str) -> str:
    return _translate(name, HF_TO_META)


def permute_qk(w: torch.Tensor, n_heads: int, inverse: bool = False) -> torch.Tensor:
    """Reorder the rows of a q or k projection (n_heads * head_dim, dim) between RoPE pair layouts.

    Forward (Meta -> HF): within each head, rows (0, 1), (2, 3), ... holding pairs become rows k and
    k + head_dim/2. ``inverse=True`` undoes it (HF -> Meta).
    """
    rows, cols = w.shape
    half = rows // n_heads // 2
    if inverse:
        return w.view(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)
    return w.view(n_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf_state_dict(state: Mapping[str, torch.Tensor], n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    """A full (one-shard) Meta state dict in Hugging Face names and q/k layout."""
    out = {}
    for name, tensor in state.items():
        if name == "rope.freqs":
            continue
        if name.endswith("attention.wq.weight"):
            tensor = permute_qk(tensor, n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = permute_qk(tensor, n_kv_heads)
        out[meta_to_hf_name(name)] = tensor
    return out


def hf_to_meta_state_dict(state: Mapping[str, torch.Tensor], n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    """A Hugging Face Llama state dict in Meta names and q/k layout (rotary buffers are dropped)."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        meta = hf_to_meta_name(name)
        if meta.endswith("attention.wq.weight"):
            tensor = permute_qk(tensor, n_heads, inverse=True)
        elif meta.endswith("attention.wk.weight"):
            tensor = permute_qk(tensor, n_kv_heads, inverse=True)
        out[meta] = tensor
    return out
