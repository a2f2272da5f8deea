"""The C bf16 GEMV kernel of the fast path: exact where it can be, cached, optional, and really used."""

import ctypes
import logging
import platform
import shutil
import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import on_threads, random_model
from torch.testing import assert_close

from llama.engine.fast import FastDecoder, FastOps
from llama.kernels import cpu_gemv

needs_kernel = pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler could build the kernel here")


def bf16(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@needs_kernel
@pytest.mark.parametrize("rows,n,k", [(1, 1, 1), (1, 37, 29), (1, 300, 2048), (3, 65, 130), (2, 1, 4096)])
def test_equals_the_exact_product_rounded_to_bf16(rows, n, k):
    x, w = bf16(rows, k, seed=1), bf16(n, k, seed=2)
    exact = x.double() @ w.double().T  # bf16 products are exact in fp32; only the fp32 sums round
    y = cpu_gemv.linear_bf16(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    # within one bf16 rounding of the exact value (plus the fp32 sums' own error, far smaller)
    assert_close(y.double(), exact, rtol=2**-8, atol=1e-6 * k)
    assert_close(y, F.linear(x, w), rtol=2**-7, atol=1e-5 * k)  # and torch's kernel, which rounds once too


# Each inner loop of csrc/gemv_bf16.c, built with flags that pick it on this machine (x86-64 only: the flags are
# x86's; elsewhere the native build is the plain loop, which the other tests cover).
x86 = platform.machine().lower() in ("x86_64", "amd64")
LOOPS = {"native": [], "avx512": ["-mno-avx512bf16"], "avx2": ["-mno-avx512f"], "plain": ["-march=x86-64"]}


@pytest.fixture(scope="module", params=list(LOOPS))
def loop(request):
    """(kernel, loop name) of one build; each build takes its loop where the CPU has the instructions."""
    if request.param != "native" and not x86:
        pytest.skip("the flags that pick the other loops are x86's")
    variant = cpu_gemv.kernel_variant(LOOPS[request.param])
    if variant is None:
        pytest.skip("no C compiler could build the kernel here")
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2" or "DEFAULT" (no AVX2)
    avx2 = "avx2" if capability != "DEFAULT" else "plain"
    expected = {"avx512": "avx512" if capability == "AVX512" else avx2, "avx2": avx2, "plain": "plain"}
    expected = expected.get(request.param)
    assert expected is None or variant[1] == expected  # the build really compiled the loop under test
    return variant


def with_loop(loop, monkeypatch):
    """Make linear_bf16 call this build."""
    monkeypatch.setitem(cpu_gemv._state, "fn", loop[0])


@pytest.mark.parametrize("rows,n,k", [(2, 37, 29), (3, 9, 64), (4, 33, 130), (5, 16, 31), (8, 65, 2065), (16, 23, 100)])
def test_several_rows_equal_the_exact_products_rounded_to_bf16(loop, monkeypatch, rows, n, k):
    with_loop(loop, monkeypatch)
    x, w = bf16(rows, k, seed=rows), bf16(n, k, seed=n)
    y = cpu_gemv.linear_bf16(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    assert_close(y.double(), x.double() @ w.double().T, rtol=2**-8, atol=1e-6 * k)  # within one bf16 rounding


@pytest.mark.parametrize("n,k", [(45, 300), (8, 4096), (13, 33), (101, 40)])
def test_a_row_of_several_is_bitwise_that_row_alone(loop, monkeypatch, n, k):
    """Every (input row, weight row) pair is summed in the same order whatever the rows of the call, so a batched
    decode step gives each row the numbers it would get alone. (One row walks each thread's weight rows in
    stretches, several rows deep at n = 101, then the rows left over: the same sums.)"""
    with_loop(loop, monkeypatch)
    x, w = bf16(16, k, seed=k), bf16(n, k, seed=n)
    # Large terms that cancel (x = 1 against +-2^24 in the first, a middle and the last column): the fp32 sums then
    # keep only some bits of the rest, and which ones depends on the order of the sums; the bf16 results show it.
    x[:, [0, k // 2, k - 1]] = 1.0
    w[:, 0], w[:, k // 2], w[:, k - 1] = 2.0**24, -(2.0**24), 3.0
    y = cpu_gemv.linear_bf16(x, w)
    for r in range(16):
        assert torch.equal(cpu_gemv.linear_bf16(x[r : r + 1], w), y[r : r + 1])
    for lo, hi in ((3, 5), (5, 12), (0, 7)):  # tiles cut elsewhere
        assert torch.equal(cpu_gemv.linear_bf16(x[lo:hi], w), y[lo:hi])


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_the_threads_split_the_weight_rows_without_changing_a_bit(loop, monkeypatch, rows):
    """The threads take the weight rows in contiguous runs (one input row: each run cut into stretches walked side
    by side); two or three threads instead of one change the split, not a bit of the result."""
    with_loop(loop, monkeypatch)
    x, w = bf16(rows, 300, seed=3), bf16(101, 300, seed=4)
    alone = cpu_gemv.linear_bf16(x, w)
    for threads in (2, 3):
        assert torch.equal(on_threads(threads, cpu_gemv.linear_bf16, x, w), alone)


def test_empty_inputs_give_empty_or_zero_outputs(loop, monkeypatch):
    with_loop(loop, monkeypatch)
    assert cpu_gemv.linear_bf16(bf16(0, 16), bf16(5, 16)).shape == (0, 5)
    assert cpu_gemv.linear_bf16(bf16(3, 16), bf16(0, 16)).shape == (3, 0)
    assert torch.equal(cpu_gemv.linear_bf16(bf16(3, 0), bf16(5, 0)), torch.zeros(3, 5, dtype=torch.bfloat16))


def test_nan_and_inf_stay_in_their_rows_and_columns(loop, monkeypatch):
    with_loop(loop, monkeypatch)
    x, w = bf16(6, 70, seed=1), bf16(11, 70, seed=2)
    x[2, 69], x[4, 0] = float("nan"), float("inf")  # a NaN in the tail columns, an inf in the first ones
    w[7, 40] = float("inf")
    y = cpu_gemv.linear_bf16(x, w).float()
    assert torch.isnan(y[2]).all()
    assert torch.isinf(y[4, [j for j in range(11) if j != 7]]).all() or torch.isnan(y[4]).any()  # +-inf, or inf-inf
    assert torch.isinf(y[[0, 1, 3, 5], 7]).all()
    finite = torch.ones_like(y, dtype=torch.bool)
    finite[2], finite[4], finite[:, 7] = False, False, False
    assert torch.isfinite(y[finite]).all()


def test_subnormal_inputs_as_each_loop_documents(loop, monkeypatch):
    """AVX512_BF16's dot products read subnormal bf16 values (below 2^-126) as zero (see the C file); the other
    loops multiply them exactly."""
    with_loop(loop, monkeypatch)
    x = torch.tensor([[2.0**-130, 1.0]], dtype=torch.bfloat16)
    w = torch.tensor([[2.0**100, 0.0]], dtype=torch.bfloat16)
    expected = 0.0 if loop[1] == "avx512bf16" else 2.0**-30
    assert cpu_gemv.linear_bf16(x, w).item() == expected


@needs_kernel
def test_a_changed_source_or_header_is_built_anew(tmp_path, monkeypatch):
    """The cache key is the source and the headers next to it (with the compiler, flags and CPU): an edit to either
    builds a new library, so a test never runs a stale one."""
    monkeypatch.setenv("LLAMA_KERNEL_CACHE", str(tmp_path / "cache"))
    source, header = tmp_path / "gemv_bf16.c", tmp_path / "common.h"
    shutil.copy(cpu_gemv.SOURCE, source)
    shutil.copy(cpu_gemv.SOURCE.parent / "common.h", header)
    symbols = {cpu_gemv.SYMBOL: cpu_gemv.ARGTYPES}

    def builds():
        assert cpu_gemv.load_kernel(source, symbols, "", restype=ctypes.c_int) is not None
        return {p.name for p in (tmp_path / "cache").glob("*.so")}

    first = builds()
    assert builds() == first  # unchanged: taken from the cache
    source.write_text(source.read_text() + "\n/* edited */\n")
    second = builds()
    header.write_text(header.read_text() + "\n/* edited */\n")
    assert len(first) == 1 and len(second) == 2 and len(builds()) == 3


def test_applies_to_the_rows_its_loop_serves_of_bf16_cpu_weights(monkeypatch):
    w = bf16(4, 8)
    most = cpu_gemv.max_rows()
    loop = cpu_gemv.kernel_variant()
    assert most == (0 if loop is None else cpu_gemv.MAX_ROWS[loop[1]])
    assert [cpu_gemv.applies(r, w) for r in range(18)] == [1 <= r <= most for r in range(18)]
    assert not cpu_gemv.applies(1, w.float())
    monkeypatch.setattr(cpu_gemv, "_state", {"fn": None})  # as where no compiler could build it
    assert cpu_gemv.max_rows() == 0 and not cpu_gemv.applies(1, w)


@needs_kernel
def test_rounds_to_nearest_even_and_keeps_nan_and_inf():
    x = torch.tensor([[1.0, 1.0]], dtype=torch.bfloat16)
    # 1 + 2^-8 is halfway between two bf16 values: the even one (1.0) wins; 1 + 2^-7 + 2^-8 rounds up.
    w = torch.tensor([[1.0, 2**-8], [1.0 + 2**-7, 2**-8], [1.0, 2**-9], [float("inf"), 1.0], [float("nan"), 1.0]])
    y = cpu_gemv.linear_bf16(x, w.to(torch.bfloat16))[0]
    assert y[:3].tolist() == [1.0, 1.0 + 2**-6, 1.0]
    assert y[3].item() == float("inf") and torch.isnan(y[4])


@needs_kernel
def test_batched_leading_dims_and_noncontiguous_inputs():
    x, w = bf16(2, 1, 64, seed=3), bf16(48, 64, seed=4)
    assert_close(cpu_gemv.linear_bf16(x, w), F.linear(x, w), rtol=2**-7, atol=1e-3)
    wt = bf16(64, 48, seed=5).T  # a transposed (non-contiguous) weight
    assert_close(cpu_gemv.linear_bf16(x, wt), F.linear(x, wt), rtol=2**-7, atol=1e-3)
    xt = bf16(64, 3, seed=6).T  # a transposed input: .float() keeps its strides, the kernel needs rows
    assert not xt.is_contiguous()
    assert torch.equal(cpu_gemv.linear_bf16(xt, w), cpu_gemv.linear_bf16(xt.contiguous(), w))


def test_rejects_other_dtypes_and_devices():
    with pytest.raises(TypeError, match="bf16 CPU tensors"):
        cpu_gemv.linear_bf16(torch.randn(1, 8), torch.randn(4, 8))
    with pytest.raises(TypeError, match="weight torch.bfloat16 on meta"):  # never a device pointer to C
        cpu_gemv.linear_bf16(bf16(1, 8), torch.empty(4, 8, dtype=torch.bfloat16, device="meta"))


@needs_kernel
def test_compiled_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_gemv, "_state", {})
    assert cpu_gemv.available()
    (built,) = tmp_path.glob("gemv_bf16-*.so")
    stamp = built.stat().st_mtime_ns
    monkeypatch.setattr(cpu_gemv, "_state", {})
    monkeypatch.setattr(cpu_gemv, "_compile", lambda *a: pytest.fail("compiled again despite the cache"))
    assert cpu_gemv.available()
    assert built.stat().st_mtime_ns == stamp and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("compiler", ["no-such-compiler-xyz", "false"])
def test_without_a_working_compiler_falls_back_to_torch(tmp_path, monkeypatch, caplog, compiler):
    monkeypatch.setenv("LLAMA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", compiler)  # `false` exists but fails every compile
    monkeypatch.setattr(cpu_gemv, "_state", {})
    with caplog.at_level(logging.WARNING, logger="llama.kernels.cpu_gemv"):
        assert not cpu_gemv.available()
    assert "torch's" in caplog.text
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    x, w = bf16(1, 16), bf16(8, 16)
    assert torch.equal(cpu_gemv.linear_bf16(x, w), F.linear(x, w))


def bf16_pair(tiny_args, name="gqa"):
    model = random_model(tiny_args(name, vocab_size=512), seed=7).to(torch.bfloat16)
    # torch's attention in both, so that only the GEMV differs
    plain = FastDecoder(model, compile=False, use_cpu_gemv=False, use_cpu_attention=False)
    return model, plain, FastDecoder(model, compile=False, use_cpu_attention=False)


@needs_kernel
@pytest.mark.parametrize("name", ["gqa", "odd_multiple_of"])
def test_decode_steps_with_the_kernel_equal_torch_kernels(tiny_args, name):
    model, plain, kernel = bf16_pair(tiny_args, name)
    assert kernel.use_cpu_gemv and not plain.use_cpu_gemv
    tokens = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    model.forward(tokens[:, :4], 0)
    for p in range(4, 12):
        expected = plain(tokens[:, p : p + 1], p)  # both steps write the same K/V into the cache
        # bf16 activations: a last-bit difference in one layer can move later ones by a bf16 step
        assert_close(kernel(tokens[:, p : p + 1], p), expected, rtol=0.02, atol=0.02)


@needs_kernel
def test_compiled_step_calls_the_kernel_only_for_one_row(tiny_args, monkeypatch):
    model = random_model(tiny_args("gqa", vocab_size=512), seed=7).to(torch.bfloat16)
    fast = FastDecoder(model, compile=True, use_cpu_step=False)  # the compiled step's calls
    calls = []
    real = cpu_gemv.kernel()

    def counting(*args):
        calls.append(args[3:])  # (rows, n, k)
        real(*args)

    monkeypatch.setitem(cpu_gemv._state, "fn", counting)

    def kernel_calls(bsz):
        calls.clear()
        model.forward(torch.full((bsz, 3), 4), 0)
        fast(torch.full((bsz, 1), 5), 3)
        return len(calls)

    assert kernel_calls(1) == 4 * model.params.n_layers + 1  # qkv (stacked), o, w1w3 (stacked), w2; the output
    assert calls[-1] == (1, 512, model.params.dim)
    assert kernel_calls(2) == 0


@needs_kernel
def test_stacked_projections_hold_no_weight_twice_and_compute_the_same(tiny_args):
    model = random_model(tiny_args("gqa", vocab_size=512), seed=7).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(3, 500, (1, 6), generator=torch.Generator().manual_seed(3))
    model.forward(tokens[:, :5], 0)
    unstacked = FastDecoder(model, compile=False, use_cpu_step=False)  # the compiled step's products, in Python
    unstacked.one_row_ops = FastOps(torch.ops.llama.linear_bf16, torch.ops.llama.attend_one, False, None)  # one by one
    expected = unstacked(tokens[:, 5:], 5)
    fast = FastDecoder(model, compile=False, use_cpu_step=False)
    attn = model.layers[0].attention
    qkv = fast.fused[0][0].layer.weight
    assert qkv.shape == (attn.wq.weight.shape[0] + 2 * attn.wk.weight.shape[0], model.params.dim)
    assert all(m.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr() for m in (attn.wq, attn.wv))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # same values, now views
    assert_close(fast(tokens[:, 5:], 5), expected, rtol=0, atol=0)  # each output row is the same dot product
    again = FastDecoder(model, compile=False)  # a second decoder on the model stacks nothing anew
    assert again.fused[0][0].layer.weight.data_ptr() == qkv.data_ptr()
    assert model.forward(tokens[:, 5:], 5).shape == (1, 1, 512)  # the default path still runs


@pytest.mark.parametrize("chunk", [cpu_gemv.FP32_CHUNK, 5 * 64])  # one chunk; 5 rows at a time, the last short
def test_upcast_product_is_the_fp32_product_rounded_once(monkeypatch, chunk):
    monkeypatch.setattr(cpu_gemv, "FP32_CHUNK", chunk)
    monkeypatch.setattr(cpu_gemv, "_scratch", threading.local())  # no chunk buffer yet
    x, w = bf16(3, 7, 64, seed=3), bf16(23, 64, seed=4)
    expected = F.linear(x.float(), w.float()).bfloat16()
    with torch.inference_mode():  # the buffer made here (a prefill) is written again outside inference mode
        assert_close(cpu_gemv.linear_upcast(x, w), expected)
    y = cpu_gemv.linear_upcast(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 7, 23)
    assert_close(y, expected)  # within one bf16 rounding: only the fp32 sums may run in another order


def test_not_used_for_fp32_models(tiny_args):
    model = random_model(tiny_args("gqa"))
    assert not FastDecoder(model, compile=False).use_cpu_gemv


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="does not fit weight"):
        cpu_gemv.linear_bf16(bf16(1, 8), bf16(4, 6))
