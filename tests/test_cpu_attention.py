"""The fast path's C attention for one query per row: the reference's math, only the visible positions, bad
input refused, a clean fallback, and really used by the compiled step."""

import math

import pytest
import torch
from helpers import build_kernels_portably, on_threads, random_model
from torch.testing import assert_close

from llama.engine.fast import FastDecoder
from llama.kernels import cpu_attention

needs_kernel = pytest.mark.skipif(cpu_attention.kernel() is None, reason="no C compiler could build the kernel")


def case(bsz, n_kv, n_rep, head_dim, max_len, dtype=torch.float32, seed=0):
    """q (bsz, 1, n_heads, head_dim) and a cache pair (bsz, max_len, n_kv, head_dim), cut from a bigger batch
    as the model's cache is (its first rows)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, 1, n_kv * n_rep, head_dim, generator=gen).to(dtype)
    k = torch.randn(bsz + 1, max_len, n_kv, head_dim, generator=gen).to(dtype)[:bsz]
    v = torch.randn(bsz + 1, max_len, n_kv, head_dim, generator=gen).to(dtype)[:bsz]
    return q, k, v


def reference(q, k, v, pos):
    """The reference's attention for one query at pos, in float64: repeat_kv, then softmax(q k^T / sqrt(d)) v
    over positions 0..pos."""
    n_rep = q.shape[2] // k.shape[2]
    keys = k[:, : pos + 1].double().repeat_interleave(n_rep, dim=2).transpose(1, 2)
    values = v[:, : pos + 1].double().repeat_interleave(n_rep, dim=2).transpose(1, 2)
    scores = q.double().transpose(1, 2) @ keys.transpose(2, 3) / math.sqrt(q.shape[-1])
    return (torch.softmax(scores, dim=-1) @ values).transpose(1, 2)


SHAPES = [(1, 4, 4, 128, 64), (2, 2, 1, 16, 40), (3, 1, 8, 64, 17), (1, 2, 3, 12, 30)]  # head_dim 12: no vectors


@needs_kernel
@pytest.mark.parametrize("bsz,n_kv,n_rep,head_dim,max_len", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_the_reference_attention(bsz, n_kv, n_rep, head_dim, max_len, dtype):
    q, k, v = case(bsz, n_kv, n_rep, head_dim, max_len, dtype)
    for pos in sorted({0, 1, 7, 8, 9, max_len // 2, max_len - 1}):  # around a block of 8 positions, and the ends
        out = cpu_attention.attend_one(q, k, v, torch.tensor([pos]))
        assert out.dtype == dtype and out.shape == q.shape
        if dtype == torch.float32:  # fp32 sums in another order: within fp32 rounding
            assert_close(out.double(), reference(q, k, v, pos), rtol=1e-5, atol=1e-6)
        else:  # rounded once to bf16 from fp32 sums: as close as torch's SDPA, which does the same
            expected = reference(q, k, v, pos)
            assert_close(out.double(), expected, rtol=2**-7, atol=1e-3)
            sdpa_error = (cpu_attention.sdpa(q, k, v, torch.tensor([pos])).double() - expected).abs().max()
            assert (out.double() - expected).abs().max() <= sdpa_error + 2**-8


def rows_reference(q, k, v, pos, slots):
    """reference() row by row: row b at position pos[b] in cache row slots[b]."""
    rows = [reference(q[b : b + 1], k[s : s + 1], v[s : s + 1], p) for b, (p, s) in enumerate(zip(pos, slots))]
    return torch.cat(rows)


# (bsz, n_kv, n_rep, head_dim, max_len, max_batch); head_dim 12: no vectors
ROW_SHAPES = [(3, 2, 2, 16, 20, 5), (4, 1, 8, 64, 33, 7), (2, 2, 3, 12, 17, 2)]


@needs_kernel
@pytest.mark.parametrize("bsz,n_kv,n_rep,head_dim,max_len,max_batch", ROW_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_at_their_own_positions_and_slots(bsz, n_kv, n_rep, head_dim, max_len, max_batch, dtype):
    gen = torch.Generator().manual_seed(bsz)
    q = torch.randn(bsz, 1, n_kv * n_rep, head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(max_batch, max_len, n_kv, head_dim, generator=gen).to(dtype) for _ in range(2))
    slots = torch.randperm(max_batch, generator=gen)[:bsz]  # any order, some cache rows unused
    pos = torch.tensor([max_len - 1, 0, 8, 9][:bsz])  # the ends, and around a block of 8 positions
    out = cpu_attention.attend_one(q, k, v, pos, slots)
    expected = rows_reference(q, k, v, pos.tolist(), slots.tolist())
    tolerances = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-3)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out.double(), expected, **tolerances)
    for b in range(bsz):  # each row alone: bitwise the same (a row's result depends on its own inputs only)
        alone = cpu_attention.attend_one(q[b : b + 1], k, v, pos[b : b + 1], slots[b : b + 1])
        assert torch.equal(alone, out[b : b + 1])
    # the fallback agrees (in bf16 torch's SDPA rounds its intermediate products to bf16: less close)
    sdpa_tolerances = tolerances if dtype == torch.float32 else dict(rtol=0.02, atol=0.01)
    assert_close(cpu_attention.sdpa(q, k, v, pos, slots).double(), expected, **sdpa_tolerances)
    one = torch.tensor([5])  # one position for every row, with slots
    assert_close(cpu_attention.attend_one(q, k, v, one, slots).double(),
                 rows_reference(q, k, v, [5] * bsz, slots.tolist()), **tolerances)  # fmt: skip
    # per-row positions without slots: rows 0..bsz-1 of the whole cache, as a cut cache gives
    assert torch.equal(cpu_attention.attend_one(q, k, v, pos), cpu_attention.attend_one(q, k[:bsz], v[:bsz], pos))
    assert_close(cpu_attention.attend_one(q, k, v, pos).double(),
                 rows_reference(q, k, v, pos.tolist(), range(bsz)), **tolerances)  # fmt: skip


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_threads_share_the_pairs_without_changing_a_bit(dtype):
    """Threads take the (row, KV head) pairs as they come free: two or three instead of one, not a bit changes."""
    q, k, v = case(5, 2, 4, 64, 40, dtype, seed=3)
    pos, slots = torch.tensor([39, 3, 17, 0, 25]), torch.tensor([4, 0, 2, 1, 3])
    alone = cpu_attention.attend_one(q, k, v, pos, slots)
    for threads in (2, 3):
        assert torch.equal(on_threads(threads, cpu_attention.attend_one, q, k, v, pos, slots), alone)


@needs_kernel
def test_a_row_reads_only_its_own_slot_and_positions():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, 4, 16, generator=gen)
    k, v = torch.randn(4, 12, 2, 16, generator=gen), torch.randn(4, 12, 2, 16, generator=gen)
    slots, pos = torch.tensor([3, 1]), torch.tensor([4, 9])
    expected = cpu_attention.attend_one(q, k, v, pos, slots)
    k[0], v[2] = float("nan"), float("inf")  # slots no row reads
    k[3, 5:], v[1, 10:] = float("nan"), float("inf")  # positions after each row's own
    assert torch.equal(cpu_attention.attend_one(q, k, v, pos, slots), expected)
    k[1, 9, 0, 3] = float("nan")  # a visible key of row 1, KV head 0: query heads 0 and 1 of row 1 only
    out = cpu_attention.attend_one(q, k, v, pos, slots)
    assert torch.isnan(out[1, 0, :2]).all() and torch.isfinite(out[1, 0, 2:]).all()
    assert torch.equal(out[0], expected[0])


@needs_kernel
def test_bad_positions_and_slots_are_refused_naming_them():
    q, k, v = case(3, 2, 2, 16, 8)
    k, v = torch.cat([k, k]), torch.cat([v, v])  # max_batch 6
    for pos, slots, message in [
        (torch.tensor([1, 8, 2]), None, "position 8 \\(row 1\\) is outside the KV cache of 8 positions"),
        (torch.tensor([-1, 0, 0]), torch.tensor([0, 1, 2]), "position -1 \\(row 0\\)"),
        (torch.tensor([1, 2, 3]), torch.tensor([0, 6, 1]), "slot 6 \\(row 1\\) is outside the KV cache's 6 rows"),
        (torch.tensor([3]), torch.tensor([0, 1, -2]), "slot -2 \\(row 2\\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            cpu_attention.attend_one(q, k, v, pos, slots)
        fp16 = [t.half() for t in (q, k, v)]  # the SDPA fallback checks them the same way
        with pytest.raises(ValueError, match=message):
            cpu_attention.attend_one(*fp16, pos, slots)
    for pos, slots, error, message in [
        (torch.tensor([1, 2]), None, ValueError, "pos \\(2,\\) must have 1 or 3 element"),
        (torch.tensor([[1, 2, 3]]), None, ValueError, "pos \\(1, 3\\)"),
        (torch.tensor([1], dtype=torch.int32), None, TypeError, "pos must be a long tensor on cpu, got torch.int32"),
        (torch.tensor([1]), torch.tensor([0, 1]), ValueError, "slots \\(2,\\) must have 3 element"),
        (torch.tensor([1]), torch.tensor([0.0, 1, 2]), TypeError, "slots must be a long tensor"),
        (torch.tensor([1]), [0, 1, 2], TypeError, "slots must be a long tensor on cpu, got list"),
    ]:
        with pytest.raises(error, match=message):
            cpu_attention.attend_one(q, k, v, pos, slots)
    with pytest.raises(ValueError, match="4 rows without slots read cache rows 0..3, but the cache holds 3"):
        cpu_attention.attend_one(torch.cat([q, q[:1]]), k[:3], v[:3], torch.tensor([1]))


@needs_kernel
def test_positions_and_slots_are_data_in_a_compiled_graph():
    from torch._dynamo.testing import CompileCounter

    q, k, v = case(2, 2, 2, 16, 12)
    k, v = torch.cat([k, k.flip(0)]), torch.cat([v, v.flip(0)])
    counter = CompileCounter()
    step = torch.compile(lambda *args: torch.ops.llama.attend_one(*args), backend=counter, fullgraph=True)
    for pos, slots in [([3, 11], [2, 0]), ([7, 0], [1, 3])]:
        pos, slots = torch.tensor(pos), torch.tensor(slots)
        assert torch.equal(step(q, k, v, pos, slots), cpu_attention.attend_one(q, k, v, pos, slots))
    assert torch.equal(step(q, k, v, torch.tensor([4]), None), cpu_attention.attend_one(q, k, v, torch.tensor([4])))
    assert counter.frame_count == 2  # one graph for per-row positions with slots, one for no slots: values are data


@needs_kernel
def test_reads_only_the_visible_positions():
    q, k, v = case(2, 2, 2, 32, 24)
    expected = cpu_attention.attend_one(q, k, v, torch.tensor([10]))
    k[:, 11:], v[:, 11:] = float("nan"), float("inf")  # stale entries after pos
    assert torch.equal(cpu_attention.attend_one(q, k, v, torch.tensor([10])), expected)


@needs_kernel
def test_nan_in_a_visible_key_gives_nan_for_the_heads_that_read_it():
    q, k, v = case(1, 2, 2, 16, 12)
    k[0, 3, 1, 5] = float("nan")  # KV head 1 is read by query heads 2 and 3
    out = cpu_attention.attend_one(q, k, v, torch.tensor([5]))
    assert torch.isnan(out[0, 0, 2:]).all() and torch.isfinite(out[0, 0, :2]).all()
    huge = case(1, 1, 1, 16, 12)[0] * 1e38  # scores overflow to +-inf: NaN, as torch's softmax gives
    assert torch.isnan(cpu_attention.attend_one(huge, k[:, :, :1], v[:, :, :1], torch.tensor([5]))).all()


@needs_kernel
def test_any_cache_layout():
    q, k, v = case(2, 2, 2, 16, 20)
    k_t = k.transpose(2, 3).contiguous().transpose(2, 3)  # rows not contiguous: copied for the kernel
    out = cpu_attention.attend_one(q, k_t, v, torch.tensor([13]))
    assert torch.equal(out, cpu_attention.attend_one(q, k, v, torch.tensor([13])))
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)
    assert_close(cpu_attention.attend_one(q_t, k, v, torch.tensor([4])).double(), reference(q, k, v, 4))


@needs_kernel
def test_bad_input_is_refused_with_the_reason():
    q, k, v = case(1, 2, 2, 16, 8)
    with pytest.raises(ValueError, match="position 8 is outside the KV cache of 8 positions"):
        cpu_attention.attend_one(q, k, v, torch.tensor([8]))
    with pytest.raises(ValueError, match="outside"):
        cpu_attention.attend_one(q, k, v, torch.tensor([-1]))
    with pytest.raises(TypeError, match="pos must be a long tensor on cpu, got torch.float32"):
        cpu_attention.attend_one(q, k, v, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="does not fit the cache"):
        cpu_attention.attend_one(q, k[:, :, :, :8], v[:, :, :, :8], torch.tensor([1]))
    with pytest.raises(ValueError, match="do not group"):
        cpu_attention.attend_one(torch.zeros(1, 1, 3, 16), k, v, torch.tensor([1]))
    assert torch.isfinite(cpu_attention.attend_one(q, k, v, torch.tensor([7]))).all()  # still usable


def test_falls_back_to_sdpa_where_the_kernel_does_not_serve(monkeypatch):
    pos = torch.tensor([3])
    q, k, v = case(1, 2, 2, 16, 8, dtype=torch.float16)  # no fp16 kernel
    assert not cpu_attention.applies(k.device, k.dtype)
    assert torch.equal(cpu_attention.attend_one(q, k, v, pos), cpu_attention.sdpa(q, k, v, pos))
    monkeypatch.setitem(cpu_attention._state, "fn", None)  # as where no compiler could build it
    q, k, v = case(1, 2, 2, 16, 8)
    assert not cpu_attention.applies(k.device, k.dtype)
    assert torch.equal(cpu_attention.attend_one(q, k, v, pos), cpu_attention.sdpa(q, k, v, pos))


@needs_kernel
@pytest.mark.parametrize("name", ["gqa", "mha"])
def test_compiled_steps_with_the_kernel_equal_sdpa_steps(tiny_args, name):
    model = random_model(tiny_args(name, vocab_size=128))
    ours, sdpa = FastDecoder(model, compile=True), FastDecoder(model, compile=True, use_cpu_attention=False)
    assert ours.attention_on_cpu and not sdpa.attention_on_cpu
    tokens = torch.randint(3, 120, (2, 20), generator=torch.Generator().manual_seed(1))
    model.forward(tokens[:, :5], 0)
    for p in range(5, 20):  # both write the same keys and values into the cache
        assert_close(ours(tokens[:, p : p + 1], p), sdpa(tokens[:, p : p + 1], p))


@needs_kernel
def test_the_compiled_step_calls_the_kernel_once_a_layer(tiny_args, monkeypatch):
    model = random_model(tiny_args("gqa", vocab_size=128)).to(torch.bfloat16)
    fast = FastDecoder(model, compile=True, use_cpu_step=False)  # the compiled step's calls
    real, positions = cpu_attention.kernel(), []

    def counting(*args):
        positions.append(args[12])  # max_len
        return real(*args)

    monkeypatch.setitem(cpu_attention._state, "fn", counting)
    model.forward(torch.full((1, 3), 4), 0)
    fast(torch.full((1, 1), 5), 3)
    assert positions == [model.params.max_seq_len] * model.params.n_layers


@needs_kernel
def test_portable_c_loops_without_avx2_give_the_same_attention(tmp_path, monkeypatch):
    build_kernels_portably(monkeypatch, tmp_path, cpu_attention)
    assert cpu_attention.kernel() is not None
    for shape in SHAPES:
        q, k, v = case(*shape)
        for pos in (0, 9, shape[-1] - 1):
            out = cpu_attention.attend_one(q, k, v, torch.tensor([pos]))
            assert_close(out.double(), reference(q, k, v, pos), rtol=1e-5, atol=1e-6)
        bsz, max_len = q.shape[0], shape[-1]
        pos, slots = torch.arange(bsz) * 7 % max_len, torch.arange(bsz).flip(0)  # rows at their own positions
        out = cpu_attention.attend_one(q, k, v, pos, slots)
        assert_close(out.double(), rows_reference(q, k, v, pos.tolist(), slots.tolist()), rtol=1e-5, atol=1e-6)


@needs_kernel
def test_a_kernel_out_of_memory_is_a_memory_error(monkeypatch):
    q, k, v = case(1, 2, 2, 16, 8)
    monkeypatch.setitem(cpu_attention._state, "fn", lambda *args: 1)  # the kernel's out-of-memory return
    with pytest.raises(MemoryError, match="out of memory for the scores of 4 positions"):
        cpu_attention.attend_one(q, k, v, torch.tensor([3]))
