"""The opt-in fast path gives the faithful path's logits (fp32 tolerance) and exactly its greedy tokens."""

import re
from pathlib import Path

import pytest
import torch
from helpers import random_model
from torch.testing import assert_close

import llama
from llama import Llama, Tokenizer
from llama.engine import loop
from llama.engine.fast import FastDecoder
from llama.model import apply_rotary_emb, apply_rotary_emb_real, precompute_freqs_cis, rope_cos_sin

PROMPTS = ["The quick brown fox", "Llamas live in", "A journey of a thousand miles begins with a single step"]


def pair(tiny_args, tokenizer_path, name="gqa", seed=3, compile=False):
    tokenizer = Tokenizer(tokenizer_path)
    model = random_model(tiny_args(name, vocab_size=tokenizer.n_words), seed=seed)
    with torch.no_grad():
        model.output.weight[3:259] = 0.0  # keep greedy text away from raw byte pieces, as in test_stream
    return Llama(model, tokenizer), Llama(model, tokenizer, fast=FastDecoder(model, compile=compile))


def test_real_rope_equals_complex_rope():
    torch.manual_seed(0)
    xq, xk = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
    freqs = precompute_freqs_cis(16, 64, 500.0)
    cos, sin = rope_cos_sin(freqs)
    q, k = apply_rotary_emb(xq, xk, freqs[20:25])
    assert_close(apply_rotary_emb_real(xq, cos[20:25], sin[20:25]), q)
    assert_close(apply_rotary_emb_real(xk, cos[20:25], sin[20:25]), k)


def test_fast_path_takes_its_rotations_from_the_model(tiny_args):
    model = random_model(tiny_args("gqa", vocab_size=97))
    # Any frequencies the model holds (scaled ones, say) are the ones the fast path rotates with.
    model.freqs_cis = model.freqs_cis * torch.polar(torch.ones(()), torch.tensor(0.25))
    fast = FastDecoder(model, compile=False)
    assert torch.equal(fast.cos, model.freqs_cis.real) and torch.equal(fast.sin, model.freqs_cis.imag)


@pytest.mark.parametrize("name", ["mha", "gqa", "mqa", "odd_multiple_of"])
def test_decode_step_logits_equal_faithful(tiny_args, tokenizer_path, name):
    faithful, fast = pair(tiny_args, tokenizer_path, name)
    tokens = torch.randint(3, 300, (3, 14), generator=torch.Generator().manual_seed(0))
    expected = faithful.model.forward(tokens, 0)
    fast.model.forward(tokens[:, :6], 0)  # prefill on the faithful path, as the loop does
    steps = [fast.fast(tokens[:, p : p + 1], p) for p in range(6, 14)]
    assert_close(torch.cat(steps, dim=1), expected[:, 6:], rtol=1e-5, atol=1e-5)


def test_greedy_tokens_and_logprobs_equal_faithful(tiny_args, tokenizer_path):
    faithful, fast = pair(tiny_args, tokenizer_path)
    prompts = [faithful.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    a, lp_a = faithful.generate(prompts, max_gen_len=30, temperature=0, logprobs=True, echo=True)
    b, lp_b = fast.generate(prompts, max_gen_len=30, temperature=0, logprobs=True, echo=True)
    assert a == b
    for x, y in zip(lp_a, lp_b):
        assert_close(torch.tensor(y), torch.tensor(x), rtol=1e-4, atol=1e-4)


def test_sampled_tokens_equal_faithful_with_the_same_seed(tiny_args, tokenizer_path):
    faithful, fast = pair(tiny_args, tokenizer_path)
    torch.manual_seed(5)
    a = faithful.text_completion(PROMPTS, temperature=0.7, top_p=0.9, max_gen_len=20)
    torch.manual_seed(5)
    b = fast.text_completion(PROMPTS, temperature=0.7, top_p=0.9, max_gen_len=20)
    assert a == b


def test_eos_in_some_rows(tiny_args, tokenizer_path, monkeypatch):
    faithful, fast = pair(tiny_args, tokenizer_path)
    eos = faithful.tokenizer.eos_id
    greedy = loop.select_next_token

    def eos_after(limit):
        steps = []

        def select(last_logits, temperature, top_p):
            nxt = greedy(last_logits, temperature, top_p)
            nxt[nxt == eos] = 3
            steps.append(1)
            if len(steps) >= 3:
                nxt[0] = eos  # row 0 ends at step 3, row 2 at step `limit`, row 1 never
            if len(steps) >= limit:
                nxt[2] = eos
            return nxt

        return select

    prompts = [faithful.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    monkeypatch.setattr(loop, "select_next_token", eos_after(14))
    a, _ = faithful.generate(prompts, max_gen_len=25, temperature=0)
    monkeypatch.setattr(loop, "select_next_token", eos_after(14))
    b, _ = fast.generate(prompts, max_gen_len=25, temperature=0)
    assert a == b
    assert len(a[1]) == 25 and len(a[0]) < 25 and len(a[2]) < 25  # only row 1 runs to max_gen_len


def test_fast_path_stops_soon_after_every_row_ends(tiny_args, tokenizer_path, monkeypatch):
    _, fast = pair(tiny_args, tokenizer_path)
    eos = fast.tokenizer.eos_id
    calls = []
    monkeypatch.setattr(loop, "select_next_token", lambda *a: calls.append(1) or torch.full((1,), eos))
    tokens, _ = fast.generate([[1, 5, 6]], max_gen_len=50, temperature=0)
    assert tokens == [[]]
    assert len(calls) == FastDecoder.eos_check_every  # checked every 16 steps, not run to max_gen_len


@pytest.mark.slow
def test_compiled_path_equals_faithful_and_is_reused(tiny_args, tokenizer_path):
    faithful, fast = pair(tiny_args, tokenizer_path, compile=True)
    prompts = [faithful.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    expected, _ = faithful.generate(prompts, max_gen_len=12, temperature=0)
    assert fast.generate(prompts, max_gen_len=12, temperature=0)[0] == expected

    from torch._dynamo.utils import counters

    compiled_before = counters["stats"]["unique_graphs"]
    _, again = pair(tiny_args, tokenizer_path, seed=4, compile=True)  # a second model of the same shape
    again.generate(prompts, max_gen_len=12, temperature=0)
    assert counters["stats"]["unique_graphs"] == compiled_before  # nothing was compiled again


@pytest.mark.slow
def test_build_with_compile(make_checkpoint, tokenizer_path, build_generator):
    faithful = build_generator(make_checkpoint("gqa"), tokenizer_path)
    fast = build_generator(make_checkpoint("gqa"), tokenizer_path, compile=True)
    assert faithful.fast is None and isinstance(fast.fast, FastDecoder)
    expected = faithful.text_completion(PROMPTS, temperature=0, max_gen_len=10)
    assert fast.text_completion(PROMPTS, temperature=0, max_gen_len=10) == expected


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_bf16_decode_steps_stay_within_bf16_rounding_of_faithful(tiny_args, name):
    """In bf16 the fast step sums attention in fp32 where the reference rounds to bf16 between matmuls, so the
    two differ by bf16 roundings: a few hundredths of logits of size ~5 here; a wrong mask or head grouping
    would move them by whole units."""
    model = random_model(tiny_args(name, vocab_size=512), seed=2).to(torch.bfloat16)
    tokens = torch.randint(3, 500, (2, 14), generator=torch.Generator().manual_seed(1))
    expected = model.forward(tokens, 0)
    assert expected.abs().max() > 3
    fast = FastDecoder(model, compile=False, use_cpu_gemv=False)
    model.forward(tokens[:, :6], 0)
    steps = torch.cat([fast(tokens[:, p : p + 1], p) for p in range(6, 14)], dim=1)
    assert_close(steps, expected[:, 6:], rtol=0.0, atol=0.15)


@pytest.mark.parametrize("name", ["gqa", "mha", "odd_multiple_of"])
def test_prefill_equals_the_forward_in_fp32_and_fills_the_cache_alike(tiny_args, name):
    model = random_model(tiny_args(name, vocab_size=128))
    fast = FastDecoder(model, compile=False)
    tokens = torch.randint(3, 120, (2, 21), generator=torch.Generator().manual_seed(4))
    expected = model.forward(tokens, 0)
    for layer in model.layers:  # start from an empty cache
        layer.attention.kv_cache.cache_k.zero_(), layer.attention.kv_cache.cache_v.zero_()
    got = torch.cat([fast.prefill(tokens[:, :13], 0), fast.prefill(tokens[:, 13:], 13)], dim=1)  # two chunks
    cache = [
        (layer.attention.kv_cache.cache_k.clone(), layer.attention.kv_cache.cache_v.clone()) for layer in model.layers
    ]
    assert_close(got, expected)
    model.forward(tokens, 0)  # the reference's keys and values, against the prefill's
    for (k, v), layer in zip(cache, model.layers):
        assert_close(k, layer.attention.kv_cache.cache_k)
        assert_close(v, layer.attention.kv_cache.cache_v)


def test_prefill_of_the_last_position_alone_gives_its_logits_and_the_same_cache(tiny_args):
    """last_only (what sampling the next token needs) skips the output layer for the other positions: the last
    position's logits are the full prefill's (the same blocks; only the output product's row count differs), and
    the cache is written alike."""
    model = random_model(tiny_args("gqa", vocab_size=128))
    fast = FastDecoder(model, compile=False)
    tokens = torch.randint(3, 120, (2, 21), generator=torch.Generator().manual_seed(4))
    every = fast.prefill(tokens, 0)
    cache = [(layer.attention.kv_cache.cache_k.clone(), layer.attention.kv_cache.cache_v.clone())
             for layer in model.layers]  # fmt: skip
    last = fast.prefill(tokens, 0, last_only=True)
    assert last.shape == (2, 1, 128)
    assert_close(last, every[:, -1:], rtol=1e-6, atol=1e-6)
    for (k, v), layer in zip(cache, model.layers):
        assert torch.equal(k, layer.attention.kv_cache.cache_k) and torch.equal(v, layer.attention.kv_cache.cache_v)
    # one row into an engine's cache slot, in two chunks
    first = fast.prefill(tokens[:1, :9], 0, slot=1, last_only=True)
    assert_close(first, every[:1, 8:9], rtol=1e-5, atol=1e-5)
    assert_close(fast.prefill(tokens[:1, 9:], 9, slot=1, last_only=True), every[:1, -1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native_bf16", [False, True], ids=["fp32-gemm-on-upcast-copies", "bf16-gemm"])
def test_bf16_prefill_is_at_least_as_close_to_fp32_as_the_faithful_forward(tiny_args, monkeypatch, native_bf16):
    """Both products the prefill picks from (by whether the CPU multiplies bf16 natively)."""
    from llama.engine import fast as fast_module

    monkeypatch.setattr(fast_module, "NATIVE_BF16", native_bf16)
    exact = random_model(tiny_args("gqa", vocab_size=128), seed=2)
    model = random_model(tiny_args("gqa", vocab_size=128), seed=2).to(torch.bfloat16)
    tokens = torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(5))
    reference = exact.forward(tokens, 0)
    faithful_error = (model.forward(tokens, 0) - reference).abs().mean()
    fast_error = (FastDecoder(model, compile=False).prefill(tokens, 0) - reference).abs().mean()
    assert fast_error <= faithful_error * 1.05  # fp32 attention and GEMMs round less than bf16 matmuls


def test_prefill_refuses_what_the_cache_cannot_hold(tiny_args):
    model = random_model(tiny_args("gqa", vocab_size=128, max_seq_len=16, max_batch_size=2))
    fast = FastDecoder(model, compile=False)
    with pytest.raises(ValueError, match="past the KV cache of 16"):
        fast.prefill(torch.ones(1, 10, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="the KV cache holds 2"):
        fast.prefill(torch.ones(3, 4, dtype=torch.long), 0)
    assert fast.prefill(torch.ones(1, 16, dtype=torch.long), 0).shape == (1, 16, 128)


def source_lines(paths):
    """(path relative to the repository, line number, line) of every line of the given Python files."""
    root = Path(llama.__file__).parent.parent
    for path in paths:
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            yield f"{Path(path).relative_to(root)}:{number}", line


def test_nothing_outside_the_model_touches_the_kv_cache_tensors():
    """KVCache (llama/model/kv_cache.py) is the one owner of the cached keys and values: the rest of the library
    goes through its update(), shape, dtype and pointers(), never its tensors."""
    package = Path(llama.__file__).parent
    outside = [p for p in sorted(package.rglob("*.py")) if p.relative_to(package).parts[0] != "model"]
    assert len(outside) > 20 and package / "engine" / "cpu_decode.py" in outside
    reads = re.compile(r"\.cache_[kv]\b|getattr\(.*cache_[kv]|update_cache")
    assert [where for where, line in source_lines(outside) if reads.search(line)] == []


def test_the_fast_path_and_the_c_step_read_no_layer_internals():
    """The fast path and the C step ask the modules for what they read (kernel_operands(), heads(), the KVCache,
    the model's dtype and device) rather than reading weights, norms' eps, head counts or quantized tensors."""
    internals = re.compile(
        r"(?<!operands)\.(weight|qweight|scales|scheme|eps|n_local_heads|n_local_kv_heads|"
        r"head_dim|n_rep|cache_k|cache_v)\b"
    )
    package = Path(llama.__file__).parent
    files = [package / "engine" / "fast.py", package / "engine" / "cpu_decode.py", *package.glob("kernels/*.py")]
    assert [where for where, line in source_lines(files) if internals.search(line)] == []
