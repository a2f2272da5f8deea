"""The fast path's decode step as one C call (llama.engine.cpu_decode): the reference's numbers in fp32, the compiled
step's in bf16, rows at their own positions and cache slots equal to each row alone, the models it serves and those
it leaves to the compiled step, and bad positions and slots refused before anything is written."""

import ctypes
from types import SimpleNamespace

import pytest
import torch
from helpers import on_threads, random_model
from torch.testing import assert_close

from llama.engine import cpu_decode
from llama.engine.fast import FastDecoder
from llama.generation import Llama
from llama.kernels import cpu_gemv
from llama.quant import kernels as quant_kernels
from llama.quant.linear import QuantizedLinear, quantize_model, set_module, use_int8_inputs
from llama.quant.scheme import Scheme

needs_kernels = pytest.mark.skipif(
    cpu_decode.kernel() is None or not quant_kernels.available(), reason="no C compiler could build the kernels here"
)
TOKENS = torch.randint(3, 90, (2, 14), generator=torch.Generator().manual_seed(0))


def model_of(tiny_args, mode, dtype=torch.float32, name="gqa", exact=True, **overrides):
    model = random_model(tiny_args(name, vocab_size=97, **overrides), seed=5).to(dtype)
    if mode is not None:
        model = quantize_model(model, Scheme(mode, 32))
        use_int8_inputs(model, not exact)
    return model


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("name", ["gqa", "mha", "mqa", "ffn_multiplier"])
def test_fp32_steps_equal_the_reference_forward(tiny_args, mode, name):
    model = model_of(tiny_args, mode, name=name)  # exact products: only the order of fp32 sums differs
    fast = FastDecoder(model, compile=False)
    assert fast.cpu_step is not None and fast.cpu_step.applies(2)
    expected = model.forward(TOKENS, 0)  # the reference's forward over the whole sequence
    model.forward(TOKENS[:, :5], 0)
    for p in range(5, TOKENS.shape[1]):
        assert_close(fast(TOKENS[:, p : p + 1], p), expected[:, p : p + 1])


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4", None])
def test_bf16_steps_equal_the_compiled_step(tiny_args, mode):
    model = model_of(tiny_args, mode, torch.bfloat16, exact=False)
    ours, compiled = FastDecoder(model, compile=False), FastDecoder(model, compile=False, use_cpu_step=False)
    assert ours.cpu_step is not None and compiled.cpu_step is None
    bsz = 2
    model.forward(TOKENS[:bsz, :5], 0)
    for p in range(5, TOKENS.shape[1]):
        step = TOKENS[:bsz, p : p + 1]
        got = ours(step, p)  # both write the same keys and values at p
        # the same kernels and the same roundings; the norms' fp32 sums run in another order, which can move
        # a bf16 rounding by one step
        assert_close(got, compiled(step, p), rtol=0.02, atol=0.02)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_hidden_size_past_one_swiglu_chunk(tiny_args, dtype):
    """The step's SwiGLU runs in chunks of 1024 elements on every thread (csrc/decode_step.c): a hidden size of
    1056 ends each row in a short chunk, and two rows share the chunks among the threads, whose number does not
    change a bit of the step (nor do the norms' and the attention's, shared by rows)."""
    model = model_of(tiny_args, "int8", dtype, exact=dtype == torch.float32, multiple_of=1056)
    assert model.layers[0].feed_forward.w2.in_features == 1056
    fast = FastDecoder(model, compile=False)
    assert fast.cpu_step is not None
    expected = model.forward(TOKENS, 0)
    compiled = FastDecoder(model, compile=False, use_cpu_step=False)
    model.forward(TOKENS[:, :5], 0)
    for p in range(5, 8):
        step = TOKENS[:, p : p + 1]
        got = fast(step, p)
        assert torch.equal(on_threads(3, fast, step, p), got)  # (writes the same keys and values again)
        if dtype == torch.float32:  # the reference's forward, to fp32 rounding
            assert_close(got, expected[:, p : p + 1])
        else:  # the compiled step's kernels and roundings
            assert_close(got, compiled(step, p), rtol=0.02, atol=0.02)


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_greedy_generation_equals_the_default_loop(tiny_args, mode):
    model = model_of(tiny_args, mode)
    tokenizer = SimpleNamespace(eos_id=-2, pad_id=-1, stop_ids=[-2])
    fast = FastDecoder(model, compile=True)
    assert fast.cpu_step is not None
    prompts = [[1, 40, 41, 42, 43], [1, 50, 51]]
    want = Llama(model, tokenizer).generate(prompts, max_gen_len=10, temperature=0)[0]
    assert Llama(model, tokenizer, fast=fast).generate(prompts, max_gen_len=10, temperature=0)[0] == want


@needs_kernels
def test_int8_input_switch_after_building_changes_the_products(tiny_args):
    model = model_of(tiny_args, "int4", exact=False)
    fast = FastDecoder(model, compile=False)
    model.forward(TOKENS[:1, :5], 0)
    rounded = fast(TOKENS[:1, 5:6], 5)
    use_int8_inputs(model, False)
    model.forward(TOKENS[:1, :5], 0)  # the cache again, from exact products
    exact = fast(TOKENS[:1, 5:6], 5)
    assert not torch.equal(rounded, exact)
    assert_close(exact, model.forward(TOKENS[:1, :6], 0)[:, 5:])


@needs_kernels
def test_models_and_batches_it_does_not_serve_run_the_compiled_step(tiny_args):
    assert FastDecoder(model_of(tiny_args, None), compile=False).cpu_step is None  # fp32 float layers: no kernel
    mixed = model_of(tiny_args, None)
    set_module(mixed, "layers.0.attention.wq", QuantizedLinear.from_linear(
        mixed.layers[0].attention.wq, Scheme("int8", 32)))  # fmt: skip
    assert FastDecoder(mixed, compile=False).cpu_step is None  # wq/wk/wv do not stack
    bf16 = model_of(tiny_args, None, torch.bfloat16)
    fast = FastDecoder(bf16, compile=False)  # bf16 float layers: as many rows as the GEMV kernel serves
    most = cpu_gemv.max_rows()
    assert fast.cpu_step is not None and fast.cpu_step.applies(most) and not fast.cpu_step.applies(most + 1)


def test_without_the_kernel_the_compiled_step_runs(tiny_args, monkeypatch):
    monkeypatch.setitem(cpu_decode._state, "fn", None)  # as where no compiler could build it
    model = model_of(tiny_args, "int8")
    fast = FastDecoder(model, compile=False)
    assert fast.cpu_step is None
    model.forward(TOKENS[:1, :5], 0)
    assert_close(fast(TOKENS[:1, 5:6], 5), model.forward(TOKENS[:1, :6], 0)[:, 5:])


@needs_kernels
def test_a_position_outside_the_cache_is_refused_and_nothing_is_written(tiny_args):
    model = model_of(tiny_args, "int8")
    fast = FastDecoder(model, compile=False)
    caches = [layer.attention.kv_cache.cache_k.clone() for layer in model.layers]
    for bad in (model.params.max_seq_len, -1):
        with pytest.raises(ValueError, match=f"position {bad} is outside the KV cache of 64 positions"):
            fast.cpu_step(TOKENS[:1, :1], torch.tensor([bad]))
    assert all(torch.equal(c, layer.attention.kv_cache.cache_k) for c, layer in zip(caches, model.layers))
    rows = model.params.max_batch_size + 1  # more rows than the KV cache has: refused, not written past it
    with pytest.raises(ValueError, match="must be \\(bsz, 1\\) with bsz at most 4"):
        fast.cpu_step(torch.ones(rows, 1, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match="must be"):
        fast.cpu_step(torch.ones(1, 2, dtype=torch.long), torch.tensor([0]))
    assert all(torch.equal(c, layer.attention.kv_cache.cache_k) for c, layer in zip(caches, model.layers))
    model.forward(TOKENS[:1, :5], 0)  # still usable
    assert_close(fast(TOKENS[:1, 5:6], 5), model.forward(TOKENS[:1, :6], 0)[:, 5:])


@needs_kernels
def test_caches_or_norms_the_c_step_cannot_index_leave_it_to_the_compiled_step(tiny_args):
    model = model_of(tiny_args, "int8")
    for layer in model.layers:  # a cache in another dtype than the model's: the C step would misread it
        layer.attention.kv_cache.to(torch.bfloat16)
    assert FastDecoder(model, compile=False).cpu_step is None
    other = model_of(tiny_args, "int8")
    other.layers[1].ffn_norm.weight = torch.nn.Parameter(torch.ones(2 * other.params.dim)[::2])  # strided
    assert FastDecoder(other, compile=False).cpu_step is None
    fast = FastDecoder(model_of(tiny_args, "int8"), compile=False)
    with pytest.raises(TypeError, match="pos must be a long tensor on cpu, got torch.int32"):
        fast.cpu_step(TOKENS[:1, :1], torch.tensor([3], dtype=torch.int32))


@needs_kernels
def test_a_kernel_failure_in_the_step_is_an_error(tiny_args):
    fast = FastDecoder(model_of(tiny_args, "int8"), compile=False)
    fast.cpu_step.fn = lambda *args: 1  # a kernel's out-of-memory return, passed up by the step
    with pytest.raises(MemoryError, match="ran out of memory"):
        fast(TOKENS[:1, :1], 0)


def live(model):
    """Every layer's KV cache tensors (keys, values), the model's own."""
    return [t for layer in model.layers for t in layer.attention.kv_cache.buffers()]


def caches(model):
    return [t.clone() for t in live(model)]


def restore(model, saved):
    for t, old in zip(live(model), saved):
        t.copy_(old)


def fill_caches(model, seed=0):
    """Random keys and values in every cell, as if earlier steps had written each slot (in the model's dtype)."""
    gen = torch.Generator().manual_seed(seed)
    for t in live(model):
        t.copy_(torch.randn(t.shape, generator=gen))


@needs_kernels
@pytest.mark.parametrize("mode,dtype", [(None, torch.bfloat16), ("int8", torch.bfloat16), ("int4", torch.float32)])
def test_rows_at_their_own_positions_and_slots_equal_each_row_alone(tiny_args, mode, dtype):
    if mode is None and cpu_gemv.max_rows() < 4:
        pytest.skip("this CPU's bf16 GEMV loop serves fewer than 4 rows (cpu_gemv.MAX_ROWS)")
    model = model_of(tiny_args, mode, dtype, exact=False, max_batch_size=6)
    decoder = FastDecoder(model, compile=False).cpu_step
    assert decoder is not None and decoder.applies(4)
    fill_caches(model)
    before = caches(model)
    tokens = TOKENS[:1, :4].reshape(4, 1)
    pos, slots = torch.tensor([5, 0, 63, 17]), torch.tensor([4, 0, 2, 5])  # any order; slots 1 and 3 unused
    together, written = decoder(tokens, pos, slots), caches(model)
    alone = []
    for b in range(4):  # each row alone, from the same cache, at its own slot and position
        restore(model, before)
        alone.append(decoder(tokens[b : b + 1], pos[b : b + 1], slots[b : b + 1]))
        # only the row's own cells changed
        for t, old in zip(live(model), before):
            changed = (t != old).flatten(2).any(-1)  # (max_batch, max_len): which cells differ
            assert changed.nonzero().tolist() in ([[slots[b].item(), pos[b].item()]], [])
    if mode is None:  # bf16 float layers: the GEMV gives each row bitwise its result alone
        assert torch.equal(together, torch.cat(alone))
    else:
        assert_close(together, torch.cat(alone))
    cells = torch.zeros(6, 64, dtype=torch.bool)
    cells[slots, pos] = True
    for t, old in zip(written, before):  # the batched step wrote the rows' cells and nothing else
        assert torch.equal(t[~cells], old[~cells])
        assert not torch.equal(t[cells], old[cells])


@needs_kernels
def test_one_position_with_slots_and_per_row_positions_without(tiny_args):
    if cpu_gemv.max_rows() < 3:
        pytest.skip("this CPU's bf16 GEMV loop serves fewer than 3 rows (cpu_gemv.MAX_ROWS)")
    model = model_of(tiny_args, None, torch.bfloat16, max_batch_size=6)
    decoder = FastDecoder(model, compile=False).cpu_step
    fill_caches(model, seed=1)
    before = caches(model)
    tokens = TOKENS[:1, :3].reshape(3, 1)

    def run(pos, slots):
        restore(model, before)
        return decoder(tokens, torch.tensor(pos), None if slots is None else torch.tensor(slots))

    assert torch.equal(run([9], [5, 1, 3]), run([9, 9, 9], [5, 1, 3]))  # one position: every row at it
    assert torch.equal(run([2, 30, 7], None), run([2, 30, 7], [0, 1, 2]))  # no slots: rows 0..bsz-1
    assert torch.equal(run([9], None), run([9, 9, 9], [0, 1, 2]))  # the static batch of before


@needs_kernels
def test_bad_positions_slots_or_duplicates_are_refused_and_nothing_is_written(tiny_args):
    model = model_of(tiny_args, "int8", max_batch_size=6)
    decoder = FastDecoder(model, compile=False).cpu_step
    fill_caches(model, seed=2)
    before = caches(model)
    tokens = TOKENS[:1, :3].reshape(3, 1)
    for pos, slots, error, message in [
        ([1, 64, 2], [0, 1, 2], ValueError, "position 64 \\(row 1\\) is outside the KV cache of 64 positions"),
        ([1, 2, -1], None, ValueError, "position -1 \\(row 2\\)"),
        ([1, 2, 3], [5, 0, 6], ValueError, "slot 6 \\(row 2\\) is outside the KV cache's 6 rows"),
        ([4], [-1, 0, 1], ValueError, "slot -1 \\(row 0\\)"),
        ([1, 2, 3], [4, 0, 4], ValueError, "slots \\[4, 0, 4\\] repeat a cache row"),
        ([1, 2], None, ValueError, "pos \\(2,\\) must have 1 or 3 element"),
        ([1], [0, 1], ValueError, "slots \\(2,\\) must have 3 element"),
    ]:
        with pytest.raises(error, match=message):
            decoder(tokens, torch.tensor(pos), None if slots is None else torch.tensor(slots))
        assert all(torch.equal(t, old) for t, old in zip(caches(model), before))
    with pytest.raises(TypeError, match="slots must be a long tensor on cpu, got torch.int32"):
        decoder(tokens, torch.tensor([1]), torch.tensor([0, 1, 2], dtype=torch.int32))
    # the C step checks the values itself too (a caller that skips the Python checks writes nothing either)
    pos, slots = torch.tensor([1, 2, 3]), torch.tensor([0, 9, 1])
    h = torch.zeros(3, model.params.dim)
    logits = torch.empty(3, model.params.vocab_size)
    code = decoder.fn(ctypes.byref(decoder.struct), h.data_ptr(), 3, pos.data_ptr(), 3, slots.data_ptr(),
                      logits.data_ptr())  # fmt: skip
    assert code == 3 and all(torch.equal(t, old) for t, old in zip(caches(model), before))
