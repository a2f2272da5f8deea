import math

import pytest
import torch
from helpers import TINY_CONFIGS, random_model
from torch.testing import assert_close

from llama.model import (
    Attention,
    FeedForward,
    KVCache,
    ModelArgs,
    RMSNorm,
    Transformer,
    TransformerBlock,
    apply_rotary_emb,
    causal_mask,
    ffn_hidden_dim,
    precompute_freqs_cis,
    repeat_kv,
)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_module_shapes(tiny_args, name):
    args = tiny_args(name)
    bsz, seqlen = 3, 5
    x = torch.randn(bsz, seqlen, args.dim)
    freqs = precompute_freqs_cis(args.head_dim, 2 * args.max_seq_len, args.rope_theta)[:seqlen]
    mask = causal_mask(seqlen, 0, x.device, x.dtype)
    assert RMSNorm(args.dim)(x).shape == x.shape
    hidden = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
    assert hidden % args.multiple_of == 0
    assert FeedForward(args.dim, hidden)(x).shape == x.shape
    with torch.no_grad():
        assert Attention(args)(x, 0, freqs, mask).shape == x.shape
        assert TransformerBlock(0, args)(x, 0, freqs, mask).shape == x.shape
    model = random_model(args)
    logits = model(torch.randint(0, args.vocab_size, (bsz, seqlen)), 0)
    assert logits.shape == (bsz, seqlen, args.vocab_size)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize(
    "dim, multiple_of, multiplier, expected",
    [(4096, 256, None, 11008), (5120, 256, None, 13824), (8192, 4096, 1.3, 28672)],
    ids=["7B", "13B", "70B"],
)
def test_ffn_hidden_size_matches_llama2(dim, multiple_of, multiplier, expected):
    assert ffn_hidden_dim(dim, multiple_of, multiplier) == expected


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(2, 3, 16)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert_close(norm(x), expected)


def test_rmsnorm_computes_in_fp32_for_half_inputs():
    norm = RMSNorm(8).to(torch.bfloat16)
    x = (torch.randn(4, 8) * 1e3).to(torch.bfloat16)
    expected = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(norm(x), expected)


def real_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate adjacent pairs (x[2k], x[2k+1]) by angle pos * theta^(-2k/d) with cos and sin."""
    d = x.shape[-1]
    k = torch.arange(d // 2, dtype=torch.float64)
    angle = positions.double()[:, None] * theta ** (-2 * k / d)  # (seqlen, d/2)
    cos, sin = torch.cos(angle)[None, :, None, :], torch.sin(angle)[None, :, None, :]
    even, odd = x.double()[..., 0::2], x.double()[..., 1::2]
    out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return out.flatten(-2).float()


@pytest.mark.parametrize("start", [0, 37])
def test_complex_rope_matches_real_rotation(start):
    torch.manual_seed(0)
    head_dim, seqlen, theta = 16, 7, 10000.0
    xq, xk = torch.randn(2, seqlen, 4, head_dim), torch.randn(2, seqlen, 2, head_dim)
    freqs = precompute_freqs_cis(head_dim, 128, theta)[start : start + seqlen]
    q, k = apply_rotary_emb(xq, xk, freqs)
    positions = torch.arange(start, start + seqlen)
    assert_close(q, real_rope(xq, positions, theta))
    assert_close(k, real_rope(xk, positions, theta))


def test_freqs_cis_covers_twice_max_seq_len(tiny_args):
    args = tiny_args("gqa", max_seq_len=32)
    model = Transformer(args)
    assert model.freqs_cis.shape == (64, args.head_dim // 2)
    assert model.freqs_cis.dtype == torch.complex64


def test_repeat_kv_repeats_each_head_in_place():
    x = torch.randn(2, 3, 2, 4)
    out = repeat_kv(x, 3)
    assert out.shape == (2, 3, 6, 4)
    for h in range(6):
        assert torch.equal(out[:, :, h], x[:, :, h // 3])


def test_causal_mask_with_cached_prefix():
    mask = causal_mask(3, 2, torch.device("cpu"), torch.float32)
    inf = float("-inf")
    expected = torch.tensor([[0, 0, 0, inf, inf], [0, 0, 0, 0, inf], [0, 0, 0, 0, 0]])
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("name", ["mha", "gqa", "mqa"])
def test_kv_cache_matches_full_forward(tiny_args, name):
    args = tiny_args(name)
    model = random_model(args)
    tokens = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    full = model(tokens, 0)

    one_at_a_time = [model(tokens[:, :4], 0)] + [model(tokens[:, p : p + 1], p) for p in range(4, 12)]
    assert_close(torch.cat(one_at_a_time, dim=1), full, rtol=1e-5, atol=1e-5)

    chunks = [model(tokens[:, :3], 0), model(tokens[:, 3:8], 3), model(tokens[:, 8:], 8)]
    assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_tokens_same_with_and_without_cache(tiny_args):
    args = tiny_args("gqa")
    model = random_model(args, seed=3)
    prompt = torch.randint(0, args.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))

    cached, tokens = [], prompt
    logits = model(prompt, 0)
    for pos in range(5, 20):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        cached.append(nxt.item())
        tokens = torch.cat([tokens, nxt], dim=1)
        logits = model(nxt, pos)

    uncached, tokens = [], prompt
    for _ in range(15):
        nxt = model(tokens, 0)[:, -1].argmax(-1, keepdim=True)
        uncached.append(nxt.item())
        tokens = torch.cat([tokens, nxt], dim=1)
    assert cached == uncached


def test_kv_cache_is_buffer_outside_state_dict_and_follows_dtype(tiny_args):
    args = tiny_args("gqa")
    model = Transformer(args)
    assert not any("cache" in k for k in model.state_dict())
    cache = model.layers[0].attention.kv_cache
    assert cache.shape == (args.max_batch_size, args.max_seq_len, args.kv_heads, args.head_dim)
    model.to(torch.bfloat16)
    assert cache.dtype == torch.bfloat16 and cache.cache_k.dtype == cache.cache_v.dtype == torch.bfloat16
    assert model.freqs_cis.dtype == torch.complex64  # not cast with the weights


def kv_case(bsz, seqlen, seed=0):
    """A KVCache of 3 rows x 8 positions x 2 heads x 4, filled with -1, and new keys and values."""
    cache = KVCache(3, 8, 2, 4)
    cache.cache_k.fill_(-1.0), cache.cache_v.fill_(-1.0)
    gen = torch.Generator().manual_seed(seed)
    return cache, torch.randn(bsz, seqlen, 2, 4, generator=gen), torch.randn(bsz, seqlen, 2, 4, generator=gen)


def test_kv_cache_update_writes_only_the_given_rows_and_positions_and_returns_the_visible_prefix():
    cache, k, v = kv_case(bsz=2, seqlen=3)
    keys, values = cache.update(4, k, v)
    assert keys.shape == values.shape == (2, 7, 2, 4)  # rows 0..1, positions 0..6
    assert torch.equal(keys[:, 4:], k) and torch.equal(values[:, 4:], v)
    assert keys.data_ptr() == cache.cache_k.data_ptr()  # views of the cache, no copy
    written = torch.zeros(3, 8, dtype=torch.bool)
    written[:2, 4:7] = True
    for stored, new in ((cache.cache_k, k), (cache.cache_v, v)):
        assert torch.equal(stored[written].view(2, 3, 2, 4), new)
        assert (stored[~written] == -1).all()  # other rows and positions untouched


def test_kv_cache_update_at_a_position_tensor_writes_one_token_per_row_and_returns_the_whole_cache():
    cache, k, v = kv_case(bsz=2, seqlen=1)
    keys, values = cache.update(torch.tensor([5]), k, v)  # every row at position 5
    assert keys.shape == values.shape == (2, 8, 2, 4)
    assert torch.equal(keys[:, 5:6], k) and torch.equal(values[:, 5:6], v)
    assert (cache.cache_k[2] == -1).all() and (cache.cache_k[:, :5] == -1).all() and (cache.cache_k[:, 6:] == -1).all()

    cache, k, v = kv_case(bsz=3, seqlen=1, seed=1)
    cache.update(torch.tensor([0, 7, 2]), k, v)  # row i at its own position
    for row, pos in enumerate((0, 7, 2)):
        assert torch.equal(cache.cache_k[row, pos], k[row, 0]) and torch.equal(cache.cache_v[row, pos], v[row, 0])
    assert (cache.cache_k != -1).all(-1).all(-1).sum() == 3  # nothing else written
    with pytest.raises(ValueError, match="one token per row, got 2"):
        cache.update(torch.tensor([1]), *kv_case(bsz=1, seqlen=2)[1:])


@pytest.mark.parametrize("start,seqlen,bsz", [(6, 3, 1), (8, 1, 1), (-1, 1, 1), (0, 1, 4)])
def test_kv_cache_update_refuses_what_it_cannot_hold(start, seqlen, bsz):
    cache, k, v = kv_case(bsz, seqlen)
    what = "rows do not fit its 3 rows" if bsz > 3 else "do not fit its 8 positions"
    with pytest.raises(ValueError, match=what):
        cache.update(start, k, v)
    assert (cache.cache_k == -1).all() and (cache.cache_v == -1).all()  # nothing written


def test_kv_cache_tells_kernels_its_layout():
    cache = KVCache(2, 16, 2, 8, dtype=torch.bfloat16)
    assert (cache.shape, cache.dtype, cache.device.type) == ((2, 16, 2, 8), torch.bfloat16, "cpu")
    assert cache.is_contiguous() and cache.pointers() == (cache.cache_k.data_ptr(), cache.cache_v.data_ptr())
    assert not dict(cache.state_dict()) and len(list(cache.buffers())) == 2


@pytest.mark.parametrize("name", ["gqa", "mha"])
def test_a_model_without_kv_cache_computes_the_forward_of_whole_sequences(tiny_args, name):
    """tools/train_demo.py trains such a model: each call attends over its own tokens only."""
    args = tiny_args(name)
    cached = random_model(args, seed=3)
    uncached = Transformer(args, kv_cache=False)
    uncached.load_state_dict(cached.state_dict())
    assert not list(uncached.buffers())  # no cache held
    tokens = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = causal_mask(9, 0, tokens.device, torch.float32)
    with torch.no_grad():
        logits = uncached.logits(uncached.tok_embeddings(tokens), 0, uncached.freqs_cis[:9], mask)
    assert torch.equal(logits, cached.forward(tokens, 0))


def test_meta_parameter_names(tiny_args):
    keys = set(Transformer(tiny_args("gqa", n_layers=1)).state_dict())
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"} | {
        f"layers.0.{k}.weight"
        for k in (
            "attention.wq", "attention.wk", "attention.wv", "attention.wo",
            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
            "attention_norm", "ffn_norm",
        )
    }  # fmt: skip
    assert keys == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=30, n_heads=4), "divisible by n_heads"),
        (dict(dim=64, n_heads=4, n_kv_heads=3), "must divide n_heads"),
        (dict(dim=24, n_heads=8), "must be even"),
        (dict(n_layers=0), "n_layers"),
        (dict(max_seq_len=-1), "max_seq_len"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(ffn_dim_multiplier=-1.0), "ffn_dim_multiplier"),
        (dict(norm_eps=float("nan")), "norm_eps must be a finite positive number, got nan"),
        (dict(rope_theta=float("inf")), "rope_theta must be a finite positive number, got inf"),
        (dict(ffn_dim_multiplier=float("nan")), "ffn_dim_multiplier must be a finite positive number or None"),
        (dict(ffn_dim_multiplier="1.3"), "ffn_dim_multiplier must be a finite positive number or None, got '1.3'"),
        (dict(norm_eps="1e-5"), "norm_eps must be a finite positive number, got '1e-5'"),
        (dict(rope_theta=True), "rope_theta must be a finite positive number, got True"),
        (dict(n_kv_heads=True), "n_kv_heads must be a positive integer, got True"),
        (dict(vocab_size="32000"), "vocab_size must be an integer, got '32000'"),
        (dict(vocab_size=32000.0), "vocab_size must be an integer, got 32000.0"),
    ],
)
def test_model_args_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs(**kwargs)


def test_transformer_needs_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, max_seq_len=8, max_batch_size=1))


def test_from_params_refuses_unknown_keys():
    params = {"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": -1, "moe_num_experts": 8}
    with pytest.raises(ValueError, match=r"does not know: moe_num_experts; it supports dim, n_layers"):
        ModelArgs.from_params(params, max_seq_len=16)


# params.json of every Llama 2 model Meta released (and Code Llama's rope_theta).
META_LLAMA2_PARAMS = [
    {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1},
    {"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05, "vocab_size": -1},
    {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8, "n_layers": 80,
     "norm_eps": 1e-05, "vocab_size": -1},
    {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5,
     "rope_theta": 1000000, "vocab_size": -1},
]  # fmt: skip


@pytest.mark.parametrize("params", META_LLAMA2_PARAMS)
def test_meta_params_files_load(params):
    args = ModelArgs.from_params(params, max_seq_len=16)
    assert args.dim == params["dim"] and args.max_seq_len == 16


@pytest.mark.parametrize("missing", ["dim", "n_layers", "n_heads"])
def test_from_params_names_a_missing_key(missing):
    full = {"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": -1}
    params = {k: v for k, v in full.items() if k != missing}
    with pytest.raises(ValueError, match=f"params.json lacks '{missing}'"):
        ModelArgs.from_params(params, max_seq_len=16)
    assert ModelArgs.from_params(params, **{missing: full[missing]}) == ModelArgs(**full)  # an override supplies it


def test_default_args_match_reference():
    args = ModelArgs()
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size) == (4096, 32, 32, None, -1)
    assert (args.multiple_of, args.ffn_dim_multiplier, args.norm_eps) == (256, None, 1e-5)
    assert (args.max_batch_size, args.max_seq_len, args.rope_theta) == (32, 2048, 10000.0)
    assert math.isclose(args.head_dim, 128)


def test_one_rank_layers_skip_fairscale_wrappers_with_the_same_result():
    """With one model-parallel rank the layers run only their local math, which is fairscale's result exactly."""
    from fairscale.nn.model_parallel import layers as fs_layers

    from llama.model import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear

    x, ids = torch.randn(2, 3, 8), torch.tensor([[0, 5, 9]])
    cases = [
        (ColumnParallelLinear(8, 6, bias=True), fs_layers.ColumnParallelLinear, x),
        (RowParallelLinear(8, 6, bias=True), fs_layers.RowParallelLinear, x),
        (ParallelEmbedding(10, 8), fs_layers.ParallelEmbedding, ids),
    ]
    for layer, fairscale_class, inp in cases:
        assert layer.one_rank and isinstance(layer, fairscale_class)
        with torch.no_grad():
            if getattr(layer, "bias", None) is not None:
                layer.bias.normal_()
            assert torch.equal(layer(inp), fairscale_class.forward(layer, inp))
