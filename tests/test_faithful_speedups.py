"""The faithful path's speedups give the bits of the reference's formulation they replace."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llama.model.layers import repeat_heads, repeat_kv
from llama.model.transformer import _matmuls_take_contiguous_operands, attention, causal_mask


def reference_attention(xq, keys, values, mask):
    """Meta's attention as written: repeat_kv copies, then matmuls of the transposed views."""
    n_rep = xq.shape[2] // keys.shape[2]
    keys, values = repeat_kv(keys, n_rep), repeat_kv(values, n_rep)
    xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
    scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(xq.shape[-1])
    if mask is not None:
        scores = scores + mask
    scores = F.softmax(scores.float(), dim=-1).type_as(xq)
    return torch.matmul(scores, values).transpose(1, 2)


# Cache lengths around the matmul routes' size thresholds, and long ones: bf16 matmuls have summed in another
# order beyond ~1.5K positions when their shapes changed.
LENGTHS = [1, 2, 4, 5, 6, 7, 31, 64, 65, 100, 257, 1024, 1536, 1537, 2049]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize(
    "bsz, n_heads, n_kv_heads, head_dim, seqlen",
    [
        (1, 16, 4, 64, 1),  # the benchmarks' 0.85B shape, decoding one row
        (2, 16, 4, 64, 1),  # two rows
        (1, 16, 16, 64, 1),  # no GQA
        (1, 16, 4, 64, 5),  # a chunk of 5 queries, with the causal mask
        (2, 1, 1, 16, 3),  # one head per rank
        (1, 4, 2, 8, 1),  # tiny heads: small products take torch's other matmul routes
    ],
)
def test_attention_gives_the_reference_formulations_bits(dtype, bsz, n_heads, n_kv_heads, head_dim, seqlen):
    gen = torch.Generator().manual_seed(0)
    for length in [n for n in LENGTHS if n >= seqlen]:
        # views of a longer cache, as KVCache.update returns them
        cache_k = torch.randn(bsz + 1, length + 3, n_kv_heads, head_dim, generator=gen).to(dtype)
        cache_v = torch.randn(bsz + 1, length + 3, n_kv_heads, head_dim, generator=gen).to(dtype)
        keys, values = cache_k[:bsz, :length], cache_v[:bsz, :length]
        xq = torch.randn(bsz, seqlen, n_heads, head_dim, generator=gen).to(dtype)
        mask = causal_mask(seqlen, length - seqlen, xq.device, dtype) if seqlen > 1 else None
        ours, theirs = attention(xq, keys, values, mask), reference_attention(xq, keys, values, mask)
        assert torch.equal(ours, theirs), f"length {length}: max difference {(ours - theirs).abs().max()}"


def test_repeat_heads_is_repeat_kv_with_the_heads_first():
    x = torch.randn(2, 7, 3, 4)  # (bsz, seqlen, n_kv_heads, head_dim)
    for n_rep in (1, 4):
        out = repeat_heads(x.transpose(1, 2), n_rep)
        assert out.is_contiguous() and out.shape == (2, 3 * n_rep, 7, 4)
        assert torch.equal(out, repeat_kv(x, n_rep).transpose(1, 2))


def test_the_contiguous_route_is_taken_only_where_the_matmuls_would_copy():
    bf16, cpu = torch.bfloat16, torch.device("cpu")
    assert _matmuls_take_contiguous_operands(2, 16, 1, 64, 100, torch.float32, cpu)  # matmul's reshape copies
    assert not _matmuls_take_contiguous_operands(1, 16, 1, 64, 100, torch.float32, cpu)  # BLAS takes the views
    assert not _matmuls_take_contiguous_operands(1, 16, 1, 64, 4, bf16, cpu)  # too small for oneDNN
    assert not _matmuls_take_contiguous_operands(2, 16, 1, 64, 1, bf16, cpu)  # one position: the views are dense
    assert not _matmuls_take_contiguous_operands(2, 1, 1, 64, 100, bf16, cpu)  # one head: oneDNN's transposed form
    # the benchmarks' decode step: on a CPU whose bf16 matmuls run on oneDNN (AVX-512), the copies are saved
    onednn_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert _matmuls_take_contiguous_operands(1, 16, 1, 64, 100, bf16, cpu) == onednn_bf16
