"""Weight-only int8/int4 quantization: exact formats, kernels equal to the dequantized product, models that
match their dequantized twins, quantize-on-load, quantized checkpoints, and perplexity on the demo model."""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import os
import platform

import pytest
import torch
import torch.nn.functional as F
from helpers import build_kernels_portably, on_threads, random_model
from torch.testing import assert_close

from llama import Llama, Tokenizer
from llama import quantize as quantize_cli
from llama.engine.fast import FastDecoder
from llama.quant import kernels, tensor
from llama.quant.linear import QuantizedLinear, linear_layers, quantize_model, use_int8_inputs
from llama.quant.scheme import Scheme
from llama.weights import checkpoint
from llama.weights.layout import Layout
from llama.weights.quantized import linear_names, quantize_checkpoint, quantized_layout

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="no C compiler could build the kernels here")
MODES = ["int8", "int4"]
# The generator size the loading tests build with (build_generator's default batch is 4).
SIZE = dict(max_batch_size=2)


def reference_quantize(w: torch.Tensor, mode: str, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The format written out plainly, one group at a time: (q as int values (n, k), scales (n, k / g) bf16)."""
    n, k = w.shape
    q = torch.zeros(n, k, dtype=torch.int64)
    s = torch.zeros(n, k // g, dtype=torch.bfloat16)
    for r in range(n):
        for b in range(k // g):
            group = w[r, b * g : (b + 1) * g].double()
            if mode == "int8":
                scale = float(torch.tensor(group.abs().max().item() / 127, dtype=torch.float32).bfloat16())
                lo, hi = -127, 127
            else:
                extreme = group[group.abs().argmax()].item()
                scale = float(torch.tensor(extreme / -8, dtype=torch.float32).bfloat16())
                lo, hi = -8, 7
            s[r, b] = scale
            for i in range(g):
                q[r, b * g + i] = 0 if scale == 0 else min(hi, max(lo, round(group[i].item() / scale)))
    return q, s


def reference_unpack(packed: torch.Tensor, g: int) -> torch.Tensor:
    n = packed.shape[0]
    out = torch.zeros(n, packed.shape[1] * 2, dtype=torch.int64)
    for r in range(n):
        for j in range(packed.shape[1]):
            b, i = divmod(j, g // 2)
            byte = int(packed[r, j])
            out[r, b * g + i] = (byte & 15) - 8
            out[r, b * g + g // 2 + i] = (byte >> 4) - 8
    return out


def weights(n, k, seed=0, dtype=torch.float32):
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n,k,g", [(3, 32, 32), (5, 96, 32), (2, 64, 16), (4, 48, 8), (3, 40, 40)])
def test_quantize_equals_the_plain_reference(mode, n, k, g):
    w = weights(n, k, seed=n * k + g)
    w[0, :g] = 0.0  # an all-zero group: scale 0, q 0
    qweight, scales = tensor.quantize(w, Scheme(mode, g))
    q_ref, s_ref = reference_quantize(w, mode, g)
    q = qweight.long() if mode == "int8" else reference_unpack(qweight, g)
    assert qweight.dtype == (torch.int8 if mode == "int8" else torch.uint8)
    assert qweight.shape == (n, k if mode == "int8" else k // 2) and scales.shape == (n, k // g)
    assert torch.equal(q, q_ref) and torch.equal(scales, s_ref)
    # dequantize is q * s exactly (an int of at most 8 bits times a bf16 is exact in fp32)
    exact = (q_ref.double().view(n, -1, g) * s_ref.double()[..., None]).view(n, k)
    assert torch.equal(tensor.dequantize(qweight, scales, Scheme(mode, g)).double(), exact)


@pytest.mark.parametrize("mode", MODES)
def test_round_trip_error_bound_and_idempotence(mode):
    scheme = Scheme(mode, 32)
    w = weights(64, 256, seed=1)
    qweight, scales = tensor.quantize(w, scheme)
    deq = tensor.dequantize(qweight, scales, scheme)
    step = scales.float().abs().repeat_interleave(32, dim=1)
    # Each weight is within half a step (the scale is rounded to bf16 before q is, so this still holds),
    # except, for int4, those beyond +7 steps on the side opposite the group's extreme (which is -8 steps):
    # they are clamped to 7, within one step.
    err = (deq - w).abs()
    clamped = (w / scales.float().repeat_interleave(32, dim=1)) > 7.5 if mode == "int4" else torch.zeros_like(w) > 0
    assert (err[~clamped] <= step[~clamped] / 2 * (1 + 2**-7) + 1e-12).all()
    assert (err[clamped] <= step[clamped] * (1 + 2**-7)).all()
    again = tensor.quantize(deq, scheme)  # the dequantized values are exactly representable
    assert torch.equal(again[0], qweight) and torch.equal(again[1], scales)
    assert torch.equal(tensor.unpack_int4(tensor.pack_int4(torch.arange(-8, 8).repeat(2, 2), 32), 32),
                       torch.arange(-8, 8).repeat(2, 2).to(torch.int8))  # fmt: skip


def test_bad_schemes_and_weights():
    with pytest.raises(ValueError, match="unknown quantization mode 'int3'"):
        Scheme("int3")
    with pytest.raises(ValueError, match="positive even integer"):
        Scheme("int4", 7)
    with pytest.raises(ValueError, match="positive integer"):
        Scheme("int8", 0)
    with pytest.raises(ValueError, match="group_size 32 does not divide the 48 inputs"):
        tensor.quantize(weights(2, 48), Scheme("int8", 32))
    bad = weights(2, 32)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        tensor.quantize(bad, Scheme("int8", 32))


def exact_product(x, qweight, scales, scheme):
    return x.double() @ tensor.dequantize(qweight, scales, scheme).double().T


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows,n,k,g", [(1, 1, 32, 32), (1, 37, 96, 32), (1, 300, 2048, 32), (3, 65, 128, 64),
                                        (1, 9, 96, 16), (2, 5, 40, 8), (1, 11, 4096, 128)])  # fmt: skip
def test_kernel_equals_the_exact_dequantized_product(mode, rows, n, k, g):
    scheme = Scheme(mode, g)
    qweight, scales = tensor.quantize(weights(n, k, seed=k + n), scheme)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(2))
    y = kernels._linear_kernel(mode, x, qweight, scales, g)
    exact = exact_product(x, qweight, scales, scheme)
    # fp32 sums of exact products: error of order k * 2^-24 of the summed magnitudes
    bound = 1e-6 * (x.abs().double() @ tensor.dequantize(qweight, scales, scheme).abs().double().T) + 1e-9
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    assert ((y.double() - exact).abs() <= bound).all()
    # bf16 activations: the result is the fp32 one rounded to bf16
    xb = x.bfloat16()
    yb = kernels._linear_kernel(mode, xb, qweight, scales, g)
    assert yb.dtype == torch.bfloat16
    assert_close(yb.double(), exact_product(xb, qweight, scales, scheme), rtol=2**-8, atol=1e-5)


def quantize_input_reference(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the int8-input kernels round it: blocks of 32, step max|x| / 127, ties to even."""
    blocks = x.float().reshape(-1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / 127)).reshape(x.shape)


@needs_kernel
@pytest.mark.parametrize("mode,g", [("int8", 32), ("int8", 64), ("int4", 32)])
@pytest.mark.parametrize("rows,n,k", [(1, 1, 64), (1, 37, 192), (2, 300, 2048)])
def test_int8_input_kernels_equal_the_product_with_the_rounded_input(mode, g, rows, n, k):
    check_int8_input_kernel(mode, g, rows, n, k)


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows,n,k", [(3, 7, 96), (1, 5, 2080)])
def test_int8_input_kernels_with_an_odd_number_of_blocks(mode, rows, n, k):
    # int4's AVX2 loop takes two blocks of 32 at a time; an odd last block goes on its own
    check_int8_input_kernel(mode, 32, rows, n, k)


def check_int8_input_kernel(mode, g, rows, n, k):
    scheme = Scheme(mode, g)
    qweight, scales = tensor.quantize(weights(n, k, seed=k + n + 1), scheme)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(3))
    x[0, :32] = 0.0  # an all-zero block
    y = kernels._linear_kernel(mode, x, qweight, scales, g, int8_x=True)
    expected = exact_product(quantize_input_reference(x), qweight, scales, scheme)
    # the integer block sums are exact; only the fp32 scaling and summing of blocks round
    assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    # and it is near the exact product: x's rounding costs about 0.5% here
    exact = exact_product(x, qweight, scales, scheme)
    assert ((y.double() - exact).norm() / exact.norm()).item() < 0.02
    # bf16 rows go in and come out as they are: the fp32 result of the same values, rounded to bf16
    xb = x.bfloat16()
    yb = kernels._linear_kernel(mode, xb, qweight, scales, g, int8_x=True)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, kernels._linear_kernel(mode, xb.float(), qweight, scales, g, int8_x=True).bfloat16())
    if mode == "int4":  # groups of 64 do not fit the int4 packing's blocks: the exact kernel serves them
        q64, s64 = tensor.quantize(weights(n, 128), Scheme("int4", 64))
        x64 = torch.randn(1, 128)
        assert torch.equal(kernels._linear_kernel("int4", x64, q64, s64, 64, int8_x=True),
                           kernels._linear_kernel("int4", x64, q64, s64, 64))  # fmt: skip


@needs_kernel
def test_layers_use_int8_inputs_by_default_and_exact_products_on_request(tiny_args):
    _, quantized, twin, _ = quantized_twins(tiny_args, "int8", exact=False)
    linears = [m for m in quantized.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 7 * quantized.params.n_layers + 1 and all(m.int8_x for m in linears)
    tokens = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(2))
    expected = twin.forward(tokens, 0)
    approx = torch.cat([quantized.forward(tokens[:, :5], 0), quantized.forward(tokens[:, 5:], 5)], dim=1)
    assert not torch.equal(approx, expected)
    assert ((approx - expected).norm() / expected.norm()).item() < 0.05
    use_int8_inputs(quantized, False)
    exact = torch.cat([quantized.forward(tokens[:, :5], 0), quantized.forward(tokens[:, 5:], 5)], dim=1)
    assert_close(exact, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(use_int8_inputs(quantized).forward(tokens, 0), quantized.forward(tokens, 0))


def panel_product_reference(x, qweight, scales, scheme):
    """The int8-input product as the panel kernel computes it, in float64: per block of 32, the exact integer dot
    product of the rounded inputs and the weights, times the weight's and the input block's scales."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    xq, xs = torch.round(blocks * inv.unsqueeze(-1)).double(), (amax / 127).double()
    w = tensor.dequantize(qweight, torch.ones_like(scales), scheme, torch.float64)  # the integers q
    d = torch.einsum("rbi,jbi->rjb", xq, w.reshape(w.shape[0], -1, 32))
    ws = scales.double().repeat_interleave(scheme.group_size // 32, dim=1)
    return (d * ws.unsqueeze(0) * xs.unsqueeze(1)).sum(-1)


def panel_kernels(extra_flags=()):
    """The panel products (int8, int4) of gemv_quant.c built with extra_flags, and the loop that build runs."""
    signature = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5
    symbols = {f"llama_gemm_{m}_q8x": signature for m in MODES} | {"llama_gemm_q8_loop": []}
    fns = kernels.cpu_gemv.load_kernel(kernels.SOURCE, symbols, "no such build", ctypes.c_int, list(extra_flags))
    assert fns is not None, f"gemv_quant.c does not build with {extra_flags}"
    fns["llama_gemm_q8_loop"].restype = ctypes.c_char_p
    return {m: fns[f"llama_gemm_{m}_q8x"] for m in MODES}, fns["llama_gemm_q8_loop"]().decode()


def panel_product(fn, x, qweight, scales, g):
    y = torch.empty(x.shape[0], qweight.shape[0])
    assert fn(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), y.data_ptr(), x.shape[0], qweight.shape[0],
              x.shape[1], g, 0) == 0  # fmt: skip
    return y


PANEL_CASES = [(mode, g, rows, n, k) for mode, g in [("int8", 32), ("int8", 64), ("int4", 32)]
               for rows, n, k in [(2, 1, 64), (3, 17, 96), (9, 40, 256), (13, 33, 2112), (20, 16, 64)]
               if k % g == 0]  # fmt: skip


@needs_kernel
@pytest.mark.parametrize("mode,g,rows,n,k", PANEL_CASES)
def test_panel_product_equals_its_float64_reference(mode, g, rows, n, k):
    """Many rows (prefill, batched decode) with int8 inputs: panels of 16 (AVX512-VNNI) or 8 weight rows, tiles of
    input rows, tails of both, odd block counts (int4 packs two blocks at a time)."""
    scheme = Scheme(mode, g)
    qweight, scales = tensor.quantize(weights(n, k, seed=k + n), scheme)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    x[0, :32] = 0.0  # an all-zero block
    fn = kernels.kernels()[f"gemm_{mode}"]
    y = panel_product(fn, x, qweight, scales, g)
    reference = panel_product_reference(x, qweight, scales, scheme)
    # exact integer sums; each block's scaled sum rounds in fp32, so errors stay near 2^-24 of the summed magnitudes
    bound = 1e-6 * (x.abs().double() @ tensor.dequantize(qweight, scales, scheme).abs().double().T) + 1e-9
    assert ((y.double() - reference).abs() <= bound).all()
    assert ((y.double() - exact_product(x, qweight, scales, scheme)).norm() / reference.norm()).item() < 0.02
    if rows >= 4:  # the layers' operator takes it from 4 rows on
        assert torch.equal(kernels._linear_kernel(mode, x, qweight, scales, g, int8_x=True), y)
    # each row is bitwise the same row alone, and the rows of a bf16 call are the fp32 ones rounded
    for r in (0, rows - 1):
        assert torch.equal(panel_product(fn, x[r : r + 1], qweight, scales, g)[0], y[r])
    xb = x.bfloat16()
    yb = torch.empty(rows, n, dtype=torch.bfloat16)
    assert (
        fn(
            xb.data_ptr(),
            qweight.data_ptr(),
            scales.data_ptr(),
            yb.data_ptr(),
            rows,
            n,
            k,
            g,
            kernels.IO_FLAGS[xb.dtype],
        )
        == 0
    )
    assert torch.equal(yb, panel_product(fn, xb.float(), qweight, scales, g).bfloat16())


def test_panel_layout_round_trips_and_reorders_words():
    q = torch.arange(32 * 8, dtype=torch.int16).to(torch.uint8).view(32, 8)
    panels = tensor.to_panels(q, tensor.QWEIGHT_WORD)
    assert panels.shape == q.shape and torch.equal(tensor.from_panels(panels, tensor.QWEIGHT_WORD), q)
    # word 1 of row 0 follows word 0 of rows 0..15
    assert torch.equal(panels.view(-1)[:4], q[0, :4]) and torch.equal(panels.view(-1)[64:68], q[0, 4:8])
    scales = torch.randn(48, 3).bfloat16()
    assert torch.equal(tensor.from_panels(tensor.to_panels(scales, 1), 1), scales)
    assert tensor.fits_panels(32, Scheme("int8", 32)) and not tensor.fits_panels(24, Scheme("int8", 32))
    assert tensor.fits_panels(32, Scheme("int8", 4)) and not tensor.fits_panels(32, Scheme("int4", 4))


def stored_product(mode, x, qweight, scales, g, int8_x, extra_flags=()):
    """The product on weights stored in panels (the *_panels kernels of a build), for weights given as rows."""
    name = f"llama_gemv_{mode}_panels{'_q8x' if int8_x else ''}"
    fns = kernels.cpu_gemv.load_kernel(kernels.SOURCE, {name: [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5},
                                       "no such build", ctypes.c_int, list(extra_flags))  # fmt: skip
    q, s = tensor.weights_to_panels(qweight, scales)
    return panel_product(fns[name], x, q, s, g)


@needs_kernel
@pytest.mark.parametrize("mode,g", [("int8", 32), ("int8", 64), ("int4", 32), ("int8", 96), ("int4", 64),
                                    ("int4", 16), ("int8", 4)])  # fmt: skip
def test_products_on_stored_panels_give_the_bits_of_the_products_on_rows(mode, g):
    """Weights kept in panels: the int8-input product (every build: native, AVX2, portable) gives bitwise what the
    kernels on rows give (the one-row loops below 4 rows, the panel product from 4), for 1 to 17 rows, odd block
    counts and two panels. The exact product (every build) sums in its own order: within fp32 rounding of the
    exact kernels on rows, and each row the same alone as in any call."""
    builds = [(), ("-mno-avx512f",), ("-march=x86-64",)] if platform.machine() in ("x86_64", "AMD64") else [()]
    k = 3 * g if g >= 64 else 160
    scheme = Scheme(mode, g)
    qweight, scales = tensor.quantize(weights(32, k, seed=g), scheme)
    for rows in (1, 2, 3, 4, 5, 8, 9, 17):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        exact = exact_product(x, qweight, scales, scheme)
        for flags in builds:
            y = stored_product(mode, x, qweight, scales, g, False, flags)
            assert_close(y.double(), exact, rtol=1e-5, atol=1e-5, msg=f"{rows} rows {flags}")
            assert torch.equal(stored_product(mode, x[-1:], qweight, scales, g, False, flags)[0], y[-1])
        if not kernels.int8_x_applies(mode, g):
            continue
        on_rows = panel_product(kernels.kernels()[f"{mode}_q8x"], x, qweight, scales, g)
        for flags in builds:
            assert torch.equal(stored_product(mode, x, qweight, scales, g, True, flags), on_rows), (rows, flags)


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
def test_the_threads_split_the_panels_without_changing_a_bit(mode):
    """The products' threads take the panels (or weight rows) in contiguous runs; two or three of them instead of
    one change the split, not a bit: int8 inputs and exact, on panels and on rows, one row (the one-row loops)
    and several (the panel product), 9 panels (shared unevenly)."""
    scheme = Scheme(mode, 32)
    qweight, scales = tensor.quantize(weights(9 * 16, 96, seed=9), scheme)
    for rows in (1, 3, 8):
        x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
        for int8_x in (True, False):
            on_rows = kernels.product_kernel(kernels.kernels(), mode, 32, int8_x)
            calls = [(stored_product, mode, x, qweight, scales, 32, int8_x), (panel_product, on_rows, x, qweight,
                     scales, 32)]  # fmt: skip
            for fn, *args in calls:
                alone = fn(*args)
                for threads in (2, 3):
                    assert torch.equal(on_threads(threads, fn, *args), alone), (rows, int8_x, threads)


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
def test_a_layer_holds_panels_and_shows_rows(mode):
    """A layer whose outputs fit panels holds them: its state_dict() and loading speak rows (the checkpoints'
    layout), and it computes bitwise what the same layer on rows computes, with int8 inputs or exact, decoding or
    prefilling, stacked or not."""
    scheme = Scheme(mode, 32)
    linear = torch.nn.Linear(96, 48, bias=False)
    linear.weight.data = weights(48, 96, seed=3)
    linear.split_dims = {"weight": 0}
    # by default where the kernels have vector loops for panels (x86 with AVX2), else rows
    assert QuantizedLinear.from_linear(linear, scheme).panels == kernels.vector_panel_loops()
    rows = QuantizedLinear(96, 48, scheme, panels=False)
    rows.qweight, rows.scales = tensor.quantize(linear.weight, scheme)
    layer = QuantizedLinear(96, 48, scheme, panels=True)
    layer.load_state_dict(rows.state_dict())
    assert layer.panels and not rows.panels and "panels=True" in repr(layer)
    assert not torch.equal(layer.qweight, rows.qweight)  # held otherwise...
    state = layer.state_dict()
    assert torch.equal(state["qweight"], rows.qweight) and torch.equal(state["scales"], rows.scales)  # ...shown so
    assert torch.equal(layer.dequantized_weight(), rows.dequantized_weight())
    for count in (1, 3, 6, 20):
        x = torch.randn(count, 96, generator=torch.Generator().manual_seed(count)).bfloat16()
        for int8_x in (True, False):
            layer.int8_x = rows.int8_x = int8_x
            assert torch.equal(layer(x), rows(x)), (count, int8_x)
    # loading rows (a checkpoint's) into a layer that holds panels
    fresh = QuantizedLinear(96, 48, scheme, panels=True)
    fresh.load_state_dict(rows.state_dict())
    assert torch.equal(fresh.qweight, layer.qweight) and torch.equal(fresh.scales, layer.scales)
    fresh.load_state_dict({k: v.clone() for k, v in rows.state_dict().items()}, assign=True)
    assert torch.equal(fresh.qweight, layer.qweight)
    # stacked: panels stack as rows do, and each part still shows its rows
    layer.int8_x = rows.int8_x = True
    other = QuantizedLinear(96, 16, scheme, panels=True)
    other.load_state_dict({"qweight": rows.qweight[:16].clone(), "scales": rows.scales[:16].clone()})
    stacked = QuantizedLinear.stack([layer, other])
    assert stacked is not None and stacked.layer.panels
    x = torch.randn(2, 96)
    assert torch.equal(stacked.layer(x), torch.cat([rows(x), rows(x)[:, :16]], dim=1))
    assert torch.equal(layer.state_dict()["qweight"], rows.qweight)
    assert QuantizedLinear.stack([layer, rows]) is None  # layouts differ
    # weights loaded onto another device (a GPU's; here meta) stay rows: panels serve the CPU kernels only
    elsewhere = QuantizedLinear(96, 48, scheme, panels=True)
    elsewhere.load_state_dict({k: v.to("meta") for k, v in rows.state_dict().items()}, assign=True)
    assert not elsewhere.panels and elsewhere.qweight.shape == rows.qweight.shape
    with pytest.raises(ValueError, match="panels"):
        QuantizedLinear(96, 24, scheme, panels=True)
    with pytest.raises(ValueError, match="cannot be in panels"):  # the operator checks the layout too
        kernels._linear_kernel(mode, x, rows.qweight[:24], rows.scales[:24], 32, panels=True)
    # weights of the wrong shape: the usual error, and the layer keeps its own
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict({"qweight": rows.qweight[:16], "scales": rows.scales[:16]})
    assert torch.equal(layer.state_dict()["qweight"], rows.qweight)


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
def test_exact_prefill_on_panels_dequantizes_chunks_that_cut_panels(mode, monkeypatch):
    """The exact mode's prefill (torch's fp32 GEMM over chunks of dequantized rows) on weights in panels, with
    chunks of 20 rows that begin and end inside panels: the product on rows, bitwise."""
    scheme = Scheme(mode, 32)
    rows = QuantizedLinear(64, 48, scheme, panels=False)
    rows.qweight, rows.scales = tensor.quantize(weights(48, 64, seed=2), scheme)
    layer = QuantizedLinear(64, 48, scheme, panels=True)
    layer.load_state_dict(rows.state_dict())
    layer.int8_x = rows.int8_x = False
    x = torch.randn(30, 64, generator=torch.Generator().manual_seed(5))  # past KERNEL_MAX_ROWS: the fp32 GEMM
    monkeypatch.setattr(kernels.cpu_gemv, "FP32_CHUNK", 20 * 64)  # both in the same chunks: the same GEMMs
    assert torch.equal(layer(x), rows(x))


@needs_kernel
def test_every_loop_of_the_panel_product_gives_the_same_bits():
    """The AVX512-VNNI, AVX2 and portable loops compute the same fp32 operations in the same order."""
    builds = [(), ("-mno-avx512f",), ("-march=x86-64",)]
    if platform.machine() not in ("x86_64", "AMD64"):
        builds = [()]
    results = {}
    for flags in builds:
        fns, loop = panel_kernels(flags)
        for mode, g in (("int8", 32), ("int8", 64), ("int4", 32)):
            scheme = Scheme(mode, g)
            qweight, scales = tensor.quantize(weights(21, 192, seed=g), scheme)
            x = torch.randn(7, 192, generator=torch.Generator().manual_seed(4))
            results.setdefault((mode, g), {})[loop] = panel_product(fns[mode], x, qweight, scales, g)
    if platform.machine() in ("x86_64", "AMD64"):  # the flags give the loops their names say (on any x86-64)
        assert {"avx2", "plain"} <= set(results["int8", 32])
    for by_loop in results.values():
        first = next(iter(by_loop.values()))
        assert all(torch.equal(first, y) for y in by_loop.values()), list(by_loop)


@needs_kernel
def test_one_row_loops_of_every_build_give_the_panel_products_bits():
    """The one-row int8-input loops of every build (native, AVX2 with ``-mno-avx512f``, portable): the product with
    the rounded input, and bitwise the panel product's row (exact block sums, scaled and summed in the same order),
    so that a row's result never depends on how many rows its call has."""
    builds = [(), ("-mno-avx512f",), ("-march=x86-64",)] if platform.machine() in ("x86_64", "AMD64") else [()]
    signature = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5
    for flags in builds:
        fns = kernels.cpu_gemv.load_kernel(kernels.SOURCE, {f"llama_gemv_{m}_q8x": signature for m in MODES},
                                           "no such build", ctypes.c_int, list(flags))  # fmt: skip
        assert fns is not None, flags
        for mode, g, k in (("int8", 32, 2080), ("int8", 64, 256), ("int4", 32, 2080), ("int4", 32, 96)):
            scheme = Scheme(mode, g)
            qweight, scales = tensor.quantize(weights(13, k, seed=k), scheme)
            x = torch.randn(1, k, generator=torch.Generator().manual_seed(6))
            y = torch.empty(1, 13)
            fn = fns[f"llama_gemv_{mode}_q8x"]
            assert fn(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), y.data_ptr(), 1, 13, k, g, 0) == 0
            expected = exact_product(quantize_input_reference(x), qweight, scales, scheme)
            assert_close(y.double(), expected, rtol=1e-5, atol=1e-5, msg=f"{flags} {mode} g{g} k{k}")
            # and bitwise the panel product's row (the native build's: every build computes the same bits)
            assert torch.equal(y, panel_product(kernels.kernels()[f"gemm_{mode}"], x, qweight, scales, g))


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
def test_prefill_takes_the_panel_product_and_the_exact_mode_the_fp32_gemm(mode, monkeypatch):
    scheme = Scheme(mode, 32)
    layer = QuantizedLinear(128, 24, scheme)
    layer.qweight, layer.scales = tensor.quantize(weights(24, 128, seed=6), scheme)
    assert torch.equal(kernels.dequantize_cpu(layer.qweight, layer.scales, scheme), layer.dequantized_weight())
    x = torch.randn(2, 40, 128, generator=torch.Generator().manual_seed(7))  # 80 rows: a prefill
    # int8 inputs (the default): every row rounded on its own to int8, as a decode step rounds it
    expected = panel_product_reference(x.reshape(80, 128), layer.qweight, layer.scales, scheme)
    y = layer(x)
    assert_close(y.reshape(80, 24).double(), expected, rtol=1e-5, atol=1e-5)
    # a row gives the same bits in a call of any number of rows: 1-3 rows take the one-row loops, 4 or more the
    # panel product, which compute the same fp32 operations in the same order
    assert torch.equal(torch.cat([layer(x[:, t : t + 4]) for t in range(0, 40, 4)], dim=1), y)
    assert torch.equal(torch.cat([layer(x[:, t : t + 1]) for t in range(40)], dim=1), y)  # 2 rows a call
    assert torch.equal(torch.cat([layer(x[1:, t : t + 1]) for t in range(3)], dim=1), y[1:, :3])  # 1 row
    if kernels.gemm_loop() == "plain":  # the portable build prefills through the fp32 GEMM instead (below)
        monkeypatch.setattr(kernels, "gemm_loop", lambda: "avx2")
    # the exact mode: torch's fp32 GEMM on the dequantized weight past KERNEL_MAX_ROWS, without a product kernel
    use_int8_inputs(layer, False)
    longer = torch.randn(1, kernels.KERNEL_MAX_ROWS + 1, 128, generator=torch.Generator().manual_seed(8))
    real = kernels.kernels()
    monkeypatch.setitem(kernels._state, "fns", {name: fn for name, fn in real.items() if name.startswith("dequant")})
    w = layer.dequantized_weight()
    assert torch.equal(layer(longer), F.linear(longer, w))
    assert torch.equal(layer(longer.bfloat16()), F.linear(longer.bfloat16().float(), w).bfloat16())
    monkeypatch.setattr(kernels.cpu_gemv, "FP32_CHUNK", 5 * 128)  # 5 weight rows at a time, the last chunk short
    assert_close(layer(longer), F.linear(longer, w), rtol=1e-6, atol=1e-6)


@needs_kernel
def test_kernel_failures_are_errors_not_silent_garbage(monkeypatch):
    scheme = Scheme("int8", 32)
    qweight, scales = tensor.quantize(weights(8, 64), scheme)
    with pytest.raises(ValueError, match="does not fit scales"):
        kernels.dequantize_cpu(qweight, scales[:, :1].contiguous(), scheme)
    with pytest.raises(ValueError, match="contiguous fp32 tensor of at least 512"):
        kernels.dequantize_cpu(qweight, scales, scheme, out=torch.empty(100))
    # a kernel that reports it could not allocate its scratch (returns 1) raises, for products of either kind
    monkeypatch.setitem(kernels._state, "fns", {name: (lambda *args: 1) for name in kernels.kernels()})
    for int8_x in (True, False):
        with pytest.raises(MemoryError, match="out of memory"):
            kernels._linear_kernel("int8", torch.randn(1, 64), qweight, scales, 32, int8_x)
    monkeypatch.setitem(kernels.cpu_gemv._state, "fn", lambda *args: 1)
    with pytest.raises(MemoryError, match="out of memory"):
        kernels.cpu_gemv.linear_bf16(torch.randn(1, 64).bfloat16(), torch.randn(8, 64).bfloat16())


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("int8_x", [True, False])
def test_nan_and_inf_inputs_give_nan_not_garbage(mode, int8_x):
    scheme = Scheme(mode, 32)
    qweight, scales = tensor.quantize(weights(20, 96, seed=8), scheme)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(9))
    x[0, 40] = float("nan")
    x[1, 70] = float("inf")
    y = kernels._linear_kernel(mode, x, qweight, scales, 32, int8_x)
    assert y[0].isnan().all() and not y[1].isfinite().any()
    assert y[2].isfinite().all()  # a clean row next to them is untouched
    assert_close(y[2].double(), exact_product(quantize_input_reference(x[2:]) if int8_x else x[2:], qweight,
                                              scales, scheme)[0], rtol=1e-5, atol=1e-5)  # fmt: skip


@needs_kernel
def test_portable_c_loops_without_avx2_give_the_same_products(tmp_path, monkeypatch):
    build_kernels_portably(monkeypatch, tmp_path, kernels)
    assert kernels.available()
    for mode, g, int8_x in [("int8", 32, False), ("int8", 16, False), ("int4", 32, False), ("int4", 64, False),
                            ("int8", 64, True), ("int4", 32, True)]:  # fmt: skip
        scheme = Scheme(mode, g)
        qweight, scales = tensor.quantize(weights(19, 256, seed=g), scheme)
        x = torch.randn(2, 256, generator=torch.Generator().manual_seed(5))
        y = kernels._linear_kernel(mode, x, qweight, scales, g, int8_x)
        expected = exact_product(quantize_input_reference(x) if int8_x else x, qweight, scales, scheme)
        assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiler", ["no-such-compiler-xyz", "false"])
def test_without_a_working_compiler_falls_back_to_dequantize(tmp_path, monkeypatch, caplog, compiler):
    monkeypatch.setenv("LLAMA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setattr(kernels, "_state", {})
    with caplog.at_level(logging.WARNING, logger="llama.kernels.cpu_gemv"):
        assert not kernels.available()
    assert "dequantize" in caplog.text and list(tmp_path.iterdir()) == []
    for mode in MODES:
        scheme = Scheme(mode, 32)
        qweight, scales = tensor.quantize(weights(8, 64), scheme)
        x = torch.randn(1, 64)
        layer = QuantizedLinear(64, 8, scheme)
        layer.qweight, layer.scales = qweight, scales
        assert torch.equal(layer(x), F.linear(x, tensor.dequantize(qweight, scales, scheme)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_for_any_batch_and_sequence(mode, dtype):
    scheme = Scheme(mode, 32)
    layer = QuantizedLinear(96, 40, scheme)
    layer.qweight, layer.scales = tensor.quantize(weights(40, 96, seed=3), scheme)
    w = layer.dequantized_weight()
    assert "qweight" in layer.state_dict() and "scales" in layer.state_dict()
    for shape in [(1, 1, 96), (2, 5, 96), (1, 96), (3, 1, 96)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(4)).to(dtype)
        y = layer(x)  # int8 inputs where the kernels are built: within x's rounding of the exact product
        assert y.dtype == dtype and y.shape == (*shape[:-1], 40)
        expected = F.linear(x.float(), w)
        assert ((y.float() - expected).norm() / expected.norm()).item() < 0.02
        use_int8_inputs(layer, False)
        tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)  # bf16: W rounded to bf16 too
        assert_close(layer(x).float(), expected, **tol)
        use_int8_inputs(layer, True)


# ------------------------------------------------------------------------------------- models


def quantized_twins(tiny_args, mode, name="gqa", group_size=32, vocab_size=97, exact=True):
    """A random fp32 model, its quantized copy (exact products unless `exact` is False), and a float model
    holding the dequantized weights."""
    model = random_model(tiny_args(name, vocab_size=vocab_size), seed=5)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize_model(random_model(tiny_args(name, vocab_size=vocab_size), seed=5),
                                     Scheme(mode, group_size))  # fmt: skip
    use_int8_inputs(quantized, not exact)
    twin = random_model(tiny_args(name, vocab_size=vocab_size), seed=5)
    with torch.no_grad():
        for layer_name, layer in linear_layers(twin).items():
            layer.weight.copy_(quantized.get_submodule(layer_name).dequantized_weight())
    return model, quantized, twin, original


@pytest.mark.parametrize("mode", MODES)
def test_every_linear_layer_is_swapped_and_the_model_file_is_untouched(tiny_args, mode):
    _, quantized, _, _ = quantized_twins(tiny_args, mode)
    names = [n for n, m in quantized.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(names) == 7 * quantized.params.n_layers + 1 and "output" in names
    assert not linear_layers(quantized)
    assert not any(k.endswith(("wq.weight", "w2.weight", "output.weight")) for k in quantized.state_dict())


@pytest.mark.parametrize("mode", MODES)
def test_quantized_layers_declare_the_split_of_the_layers_they_replace(tiny_args, mode):
    model = random_model(tiny_args("gqa"), seed=5)
    float_layout, linears = Layout.from_model(model), list(linear_layers(model))
    assert linears == list(linear_names(type(model), model.params.n_layers))  # what a checkpoint's loader expects
    quantized = quantize_model(model, Scheme(mode, 16))
    # the quantized model's own layout (qweight and scales split as their QuantizedLinear says) is the one a
    # quantized checkpoint of it is read with
    layout = Layout.from_model(quantized)
    assert layout == quantized_layout(float_layout, linears, Scheme(mode, 16))
    assert layout.split_dim("layers.0.attention.wo.scales") == 1 and layout.split_dim("output.qweight") == 0
    assert "layers.1.attention.wv.qweight" in layout.kv_keys


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["gqa", "mqa", "ffn_multiplier"])
def test_logits_equal_the_dequantized_model_and_near_the_original(tiny_args, mode, name):
    model, quantized, twin, _ = quantized_twins(tiny_args, mode, name, group_size=16)
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    q_logits = quantized.forward(tokens, 0)
    assert_close(q_logits, twin.forward(tokens, 0))  # the same math on the same (dequantized) weights
    # Against the unquantized model, loosely: with Gaussian weights a group of 16 has max|w| of about 2.1
    # sigma, so the rms rounding error (step / sqrt(12)) is 0.5% of a weight for int8 (step max / 127) and 16x
    # that for int4 (step max / 8). Through these two layers it gave 1.0% (int8) and 15.5-17.5% (int4) of
    # the logits' norm; real weights lose far less (see the perplexity test). The bounds leave 2x margin.
    orig = model.forward(tokens, 0)
    rel = ((q_logits - orig).norm() / orig.norm()).item()
    assert rel < (0.02 if mode == "int8" else 0.35)


@pytest.mark.parametrize("mode", MODES)
def test_decode_steps_on_the_fast_path_equal_the_dequantized_model(tiny_args, tokenizer_path, mode):
    tokenizer = Tokenizer(tokenizer_path)
    _, quantized, twin, _ = quantized_twins(tiny_args, mode, vocab_size=tokenizer.n_words)
    tokens = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    expected = twin.forward(tokens, 0)
    fast = FastDecoder(quantized, compile=False)
    assert not fast.use_cpu_gemv
    quantized.forward(tokens[:, :4], 0)
    steps = [fast(tokens[:, p : p + 1], p) for p in range(4, 12)]  # one row: the C kernels, where built
    assert_close(torch.cat(steps, dim=1), expected[:, 4:], rtol=1e-5, atol=1e-5)

    prompts = [tokenizer.encode(p, bos=True, eos=False) for p in ["The quick brown fox", "Llamas live in"]]
    default = Llama(quantized, tokenizer).generate(prompts, max_gen_len=16, temperature=0)[0]
    assert Llama(twin, tokenizer).generate(prompts, max_gen_len=16, temperature=0)[0] == default
    assert Llama(quantized, tokenizer, fast=fast).generate(prompts, max_gen_len=16, temperature=0)[0] == default
    one = Llama(quantized, tokenizer, fast=fast).generate(prompts[:1], max_gen_len=16, temperature=0)[0]
    assert one == Llama(twin, tokenizer).generate(prompts[:1], max_gen_len=16, temperature=0)[0]


@needs_kernel
def test_compiled_fast_path_calls_the_int8_kernel(tiny_args, tokenizer_path, monkeypatch):
    tokenizer = Tokenizer(tokenizer_path)
    _, quantized, twin, _ = quantized_twins(tiny_args, "int8", vocab_size=tokenizer.n_words)
    calls = []
    real = kernels.kernels()

    def counting(name):
        def call(*args):
            calls.append(args[4:])
            return real[name](*args)

        return call

    # the exact kernels, on weights as rows and in panels (the tiny model's layers have both)
    counted = {name: counting(name) for name in ("int8", "int8_panels")}
    monkeypatch.setitem(kernels._state, "fns", {**real, **counted})
    prompts = [tokenizer.encode("Llamas live in", bos=True, eos=False)]
    fast = Llama(quantized, tokenizer, fast=FastDecoder(quantized, compile=True, use_cpu_step=False))
    out = fast.generate(prompts, max_gen_len=8, temperature=0)[0]
    assert out == Llama(twin, tokenizer).generate(prompts, max_gen_len=8, temperature=0)[0]
    assert len(calls) >= 7 * quantized.params.n_layers + 1  # every layer of every compiled step


@needs_kernel
def test_fast_path_stacks_projections_without_holding_weights_twice(tiny_args, tokenizer_path):
    _, quantized, twin, _ = quantized_twins(tiny_args, "int4", exact=False)
    before = {k: v.clone() for k, v in quantized.state_dict().items()}
    fast = FastDecoder(quantized, compile=False)
    assert fast.fused is not None and len(fast.fused) == quantized.params.n_layers
    attn, ff = quantized.layers[0].attention, quantized.layers[0].feed_forward
    qkv, w13 = fast.fused[0][0].layer.qweight, fast.fused[0][1].layer.qweight
    assert qkv.shape[0] == attn.wq.out_features + attn.wk.out_features + attn.wv.out_features
    for module, stacked in [(attn.wq, qkv), (attn.wk, qkv), (attn.wv, qkv), (ff.w1, w13), (ff.w3, w13)]:
        assert module.qweight.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
    assert all(torch.equal(v, quantized.state_dict()[k]) for k, v in before.items())  # same values, now views
    tokens = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(3))
    quantized.forward(tokens[:, :5], 0)
    expected = quantized.forward(tokens[:, 5:], 5)  # the default path: one kernel call per layer
    assert_close(fast(tokens[:, 5:], 5), expected, rtol=1e-5, atol=1e-5)
    use_int8_inputs(quantized, False)  # still switches the stacked products
    quantized.forward(tokens[:, :5], 0)  # the cache again, from exact products
    assert_close(fast(tokens[:, 5:], 5), twin.forward(tokens, 0)[:, 5:], rtol=1e-5, atol=1e-5)


@needs_kernel
def test_compiled_quantized_step_is_one_graph_in_a_fresh_process(tiny_args, monkeypatch):
    # Kernels not loaded yet, as in a fresh process: checking for them inside the step used to trace their
    # one-time build (a lock), which broke the graph and left the whole step running eagerly.
    _, quantized, _, _ = quantized_twins(tiny_args, "int4", exact=False)
    monkeypatch.setattr(kernels, "_state", {})
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    fast = FastDecoder(quantized, compile=True, use_cpu_step=False)  # the compiled step
    fast(torch.tensor([[3]]), 0)
    fast(torch.tensor([[4]]), 1)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1


# ------------------------------------------------------------------------------------- loading and files


def tensor_bytes(model):
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
               if not t.is_complex())  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_build_quantizes_while_loading(make_checkpoint, tokenizer_path, mode, build_generator):
    ckpt = make_checkpoint("gqa")
    q = build_generator(ckpt, tokenizer_path, quantize=mode, dtype=torch.bfloat16, **SIZE)
    f = build_generator(ckpt, tokenizer_path, quantize=None, dtype=torch.bfloat16, **SIZE)
    kv_cache = sum(b.numel() * b.element_size() for n, b in f.model.named_buffers() if "cache" in n)
    linear = sum(m.weight.numel() for m in linear_layers(f.model).values())
    # the linear weights now take 1 or 1/2 byte plus 2 bytes of scale per 32, instead of 2 bytes
    per_weight = (1 if mode == "int8" else 0.5) + 2 / 32
    assert tensor_bytes(q.model) - kv_cache == tensor_bytes(f.model) - kv_cache - linear * (2 - per_weight)
    # nothing of the quantized model is a view into the float file: its pages can leave memory
    shard = checkpoint.load_shard(checkpoint.find_shards(ckpt)[0])
    file_ptrs = {t.untyped_storage().data_ptr() for t in shard.values()}
    assert not any(t.untyped_storage().data_ptr() in file_ptrs for t in q.model.state_dict().values())
    twin = quantize_model(build_generator(ckpt, tokenizer_path, quantize=None, **SIZE).model, Scheme(mode))
    tokens = torch.tensor([[1, 40, 41, 42, 43]])
    quantized = build_generator(ckpt, tokenizer_path, quantize=mode, **SIZE).model
    assert_close(quantized.forward(tokens, 0), twin.forward(tokens, 0))


@pytest.mark.parametrize("mode", MODES)
def test_saved_quantized_checkpoint_loads_with_identical_logits(
    make_checkpoint, tokenizer_path, tmp_path, mode, build_generator
):
    ckpt = make_checkpoint("gqa", n_shards=2)
    out = quantize_checkpoint(ckpt, tmp_path / "q", mode, 32)
    params = json.loads((out / "params.json").read_text())
    assert params["quantization"] == {"mode": mode, "group_size": 32}
    assert sorted(p.name for p in out.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    shard = torch.load(out / "consolidated.01.pth", weights_only=True)
    assert shard["layers.0.attention.wq.qweight"].dtype == (torch.int8 if mode == "int8" else torch.uint8)
    assert "layers.0.attention.wq.weight" not in shard
    tokens = torch.tensor([[1, 40, 41, 42, 43], [1, 7, 8, 9, 10]])
    # groups never cross the shards' boundary, so per-shard quantization equals quantizing the whole
    on_load = build_generator(ckpt, tokenizer_path, quantize=mode, **SIZE).model.forward(tokens, 0)
    assert torch.equal(build_generator(out, tokenizer_path, **SIZE).model.forward(tokens, 0), on_load)
    assert torch.equal(build_generator(out, tokenizer_path, quantize=mode, **SIZE).model.forward(tokens, 0), on_load)


def test_bad_quantized_checkpoints_and_arguments(make_checkpoint, tokenizer_path, tmp_path, build_generator):
    ckpt = make_checkpoint("gqa")
    with pytest.raises(ValueError, match="unknown quantization mode 'int2'"):
        build_generator(ckpt, tokenizer_path, quantize="int2", **SIZE)
    with pytest.raises(ValueError, match="group_size 32 does not divide the 48 inputs of layers.0.attention.wq"):
        build_generator(make_checkpoint("odd_multiple_of"), tokenizer_path, quantize="int8", **SIZE)
    per_rank = r"group_size 64 does not divide the 32 inputs per rank \(2 model-parallel ranks\) of layers.0.attention"
    with pytest.raises(ValueError, match=per_rank):
        quantize_checkpoint(make_checkpoint("gqa", n_shards=2), tmp_path / "bad", "int8", 64)
    with pytest.raises(ValueError, match="unknown quantization mode"):
        quantize_checkpoint(ckpt, tmp_path / "bad", "fp8")
    assert not (tmp_path / "bad").exists()

    out = quantize_checkpoint(ckpt, tmp_path / "q4", "int4")
    other_mode = (
        r"'.*q4' is already quantized as int4 \(group 32\); load it with quantize=None \(no --quantize in the example "
        r"scripts\) or 'int4', or quantize the float checkpoint it was made from as 'int8'"
    )
    with pytest.raises(ValueError, match=other_mode):
        build_generator(out, tokenizer_path, quantize="int8", **SIZE)
    again = r"'.*q4' is a quantized checkpoint \(int4, group 32\); quantize the float checkpoint it was made from"
    with pytest.raises(ValueError, match=again):
        quantize_checkpoint(out, tmp_path / "again", "int8")
    assert not (tmp_path / "again").exists()

    broken = tmp_path / "broken"
    shard = torch.load(out / "consolidated.00.pth", weights_only=True)
    del shard["layers.1.feed_forward.w2.scales"]
    checkpoint.save_checkpoint(broken, [shard], json.loads((out / "params.json").read_text()))
    with pytest.raises(ValueError, match="missing keys: layers.1.feed_forward.w2.scales"):
        build_generator(broken, tokenizer_path, **SIZE)

    wrong = tmp_path / "wrong"
    params = json.loads((out / "params.json").read_text())
    checkpoint.save_checkpoint(wrong, [torch.load(out / "consolidated.00.pth", weights_only=True)],
                               {**params, "quantization": {"mode": "int8", "group_size": 32}})  # fmt: skip
    with pytest.raises(ValueError, match="does not fit the model|holds torch.int8"):
        build_generator(wrong, tokenizer_path, **SIZE)
    odd = tmp_path / "odd"
    checkpoint.save_checkpoint(odd, [shard], {**params, "quantization": {"mode": "int4"}})
    with pytest.raises(ValueError, match="'mode' and 'group_size'"):
        build_generator(odd, tokenizer_path, **SIZE)
    # quantized shards whose params.json lost its "quantization" (edited by hand) are read as float ones
    unsaid = tmp_path / "unsaid"
    checkpoint.save_checkpoint(unsaid, [shard], {k: v for k, v in params.items() if k != "quantization"})
    unsaid_message = (r"'layers.0.attention.wq.qweight' holds torch.uint8 values; weights must be floating point .*, "
                      r"or params.json must say how they were quantized \('quantization', written by python -m "
                      r"llama.quantize\)")  # fmt: skip
    with pytest.raises(ValueError, match=unsaid_message):
        build_generator(unsaid, tokenizer_path, **SIZE)


# ------------------------------------------------------------------------------------- the demo model


def test_perplexity_on_the_demo_model_stays_near_bf16(monkeypatch, build_generator):
    from llama.demo import DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH
    from tools import demo_eval

    texts = demo_eval.read_texts(demo_eval.Path(__file__).resolve().parent / "data" / "demo_heldout.txt")
    ppl = {}
    for mode, kernel_rows in [(None, None), ("int8", None), ("int4", None), ("int8", 10**9), ("int4", 10**9)]:
        # fp32 compute on the bf16 checkpoint's weights: "bf16" is the checkpoint, exactly. With the row limit
        # lifted, every product runs as decoding runs it: the kernels with int8 inputs, prefill included.
        if kernel_rows is not None:
            monkeypatch.setattr(kernels, "KERNEL_MAX_ROWS", kernel_rows)
        generator = build_generator(DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH, max_seq_len=128, max_batch_size=8,
                                    quantize=mode)  # fmt: skip
        docs = demo_eval.target_documents(generator.tokenizer, texts, 600)
        ppl[mode, kernel_rows] = demo_eval.perplexity(*demo_eval.model_nll(generator, docs))
    # Measured on these 600 tokens: int8 +0.01% (int8 inputs: -0.02%), int4 +0.38% (+0.37%); on the
    # 3,000-token sample: int8 +0.01% (+0.00%), int4 +0.45% (+0.46%).
    assert math.isfinite(ppl[None, None])
    for rows in (None, 10**9):
        assert abs(ppl["int8", rows] / ppl[None, None] - 1) < 0.005
        assert abs(ppl["int4", rows] / ppl[None, None] - 1) < 0.02


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_quantized_model_matches_cpu(make_checkpoint, tokenizer_path, mode, build_generator):
    ckpt = make_checkpoint("gqa")
    cpu = build_generator(ckpt, tokenizer_path, quantize=mode, **SIZE)
    gpu = build_generator(ckpt, tokenizer_path, device="cuda", quantize=mode, **SIZE)
    assert gpu.model.layers[0].attention.wq.qweight.device.type == "cuda"
    use_int8_inputs(cpu.model, False)  # CUDA computes the exact dequantized product
    tokens = torch.tensor([[1, 40, 41, 42, 43]])
    assert_close(gpu.model.forward(tokens.cuda(), 0).cpu(), cpu.model.forward(tokens, 0), rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_compiled_quantized_decoding_equals_the_default_loop(
    make_checkpoint, tokenizer_path, mode, build_generator
):
    ckpt = make_checkpoint("gqa")
    default = build_generator(ckpt, tokenizer_path, device="cuda", quantize=mode, **SIZE)
    fast = build_generator(ckpt, tokenizer_path, device="cuda", quantize=mode, compile=True, **SIZE)
    prompts = [[1, 40, 41, 42, 43], [1, 50, 51]]
    want = default.generate(prompts, max_gen_len=12, temperature=0)[0]
    assert fast.generate(prompts, max_gen_len=12, temperature=0)[0] == want


MP_WORKER = """
import json, sys
import torch
from llama import Llama
from llama.distributed import is_main_process
from llama.quantize import use_int8_inputs

ckpt, tokenizer, quantize = sys.argv[1], sys.argv[2], (sys.argv[3] if sys.argv[3] != "none" else None)
g = Llama.build(ckpt, tokenizer, max_seq_len=64, max_batch_size=2, device="cpu", dtype=torch.float32,
                quantize=quantize)
use_int8_inputs(g.model, False)  # exact products: see the test
logits = g.model.forward(torch.tensor([[1, 40, 41, 42, 43]]), 0)
tokens = g.generate([[1, 40, 41, 42, 43]], max_gen_len=8, temperature=0)[0]
if is_main_process():
    print("RESULT " + json.dumps({"logits": logits.tolist(), "tokens": tokens}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode,prequantized,nproc", [("int8", False, 2), ("int4", True, 2), ("int4", True, 4)])
def test_model_parallel_ranks_match_one(
    make_checkpoint, tokenizer_path, tmp_path, mode, prequantized, nproc, build_generator
):
    """2 ranks, and 4: more ranks than the 2 KV heads, each repeated on two ranks (groups of 16 fit 64 / 4)."""
    import os
    import subprocess
    import sys

    from helpers import REPO

    ckpt = make_checkpoint("gqa", n_shards=2)
    if prequantized:
        ckpt = quantize_checkpoint(ckpt, tmp_path / "q", mode, 32 if nproc == 2 else 16)
    script = tmp_path / "worker.py"
    script.write_text(MP_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           str(ckpt), str(tokenizer_path), "none" if prequantized else mode]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line[len("RESULT ") :])
    # each rank quantized its own slice; the slices' groups are the whole model's, so only the order of the
    # cross-rank sums differs from one process. With exact products, that is: with int8 inputs, a last-bit
    # difference in a layer's input can move one rounding to int8 and the logits by ~1e-2.
    one = build_generator(ckpt, tokenizer_path, quantize=None if prequantized else mode, **SIZE)
    use_int8_inputs(one.model, False)
    tokens = torch.tensor([[1, 40, 41, 42, 43]])
    assert_close(torch.tensor(result["logits"]), one.model.forward(tokens, 0), rtol=1e-5, atol=1e-5)
    assert result["tokens"] == one.generate(tokens.tolist(), max_gen_len=8, temperature=0)[0]


@needs_kernel
def test_where_panels_do_not_pay_layers_hold_rows_unless_asked(monkeypatch):
    """Without vector loops for panels (the portable build), layers hold rows; asked for panels, one still computes
    what rows do."""
    import llama.quant.linear as quant_linear

    monkeypatch.setattr(quant_linear, "vector_panel_loops", lambda: False)
    scheme = Scheme("int8", 32)
    assert not QuantizedLinear(64, 32, scheme).panels
    rows = QuantizedLinear(64, 32, scheme)
    rows.qweight, rows.scales = tensor.quantize(weights(32, 64, seed=1), scheme)
    asked = QuantizedLinear(64, 32, scheme, panels=True)
    asked.load_state_dict(rows.state_dict())
    x = torch.randn(3, 64)
    assert asked.panels and torch.equal(asked(x), rows(x))


@needs_kernel
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_a_quantized_checkpoint_loaded_into_panels_leaves_no_mapping(make_checkpoint, tokenizer_path, tmp_path,
                                                                     build_generator):  # fmt: skip
    """Layers that hold panels copy their weights out of the file; every other tensor is copied too, so the file's
    mapping (and the pages the copies were read from) goes once loaded; the model computes what rows would."""
    quantize_cli.main(str(make_checkpoint("gqa")), str(tmp_path / "q8"), "int8", 32)
    model = build_generator(tmp_path / "q8", tokenizer_path, **SIZE).model
    held = [m.panels for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert any(held) == kernels.vector_panel_loops()
    gc.collect()
    mapped = [line for line in open("/proc/self/maps") if str(tmp_path / "q8") in line]
    assert mapped == [] or not any(held), mapped
    tokens = torch.tensor([[1, 40, 41]])
    rows = build_generator(tmp_path / "q8", tokenizer_path, **SIZE).model
    for module in rows.modules():
        if isinstance(module, QuantizedLinear) and module.panels:
            module.qweight, module.scales = module.weights_as_rows()
            module.panels = False
    assert torch.equal(model.forward(tokens, 0), rows.forward(tokens, 0))


def test_command_line_writes_a_checkpoint_that_build_loads(
    make_checkpoint, tokenizer_path, tmp_path, capsys, build_generator
):
    ckpt = make_checkpoint("mqa")
    quantize_cli.main(str(ckpt), str(tmp_path / "q8"), "int8", 16)
    assert "quantize [" in capsys.readouterr().err  # the progress line
    params = json.loads((tmp_path / "q8" / "params.json").read_text())
    assert params["quantization"] == {"mode": "int8", "group_size": 16}
    tokens = torch.tensor([[1, 40, 41]])
    model = build_generator(ckpt, tokenizer_path, **SIZE).model
    expected = quantize_model(model, Scheme("int8", 16)).forward(tokens, 0)
    assert torch.equal(build_generator(tmp_path / "q8", tokenizer_path, **SIZE).model.forward(tokens, 0), expected)
    with pytest.raises(FileExistsError, match="already exists"):
        quantize_cli.main(str(ckpt), str(tmp_path / "q8"), "int8")
