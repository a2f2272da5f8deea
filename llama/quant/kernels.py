"""The C kernels of ``csrc/gemv_quant.c`` for quantized weights, and the torch operators over them.

``QuantizedLinear(x)`` stands for ``x @ dequantize(W).T``. On a CPU it runs the kernels (torch operators
``llama::linear_int8`` and ``llama::linear_int4``, defined and registered here, once per process), which read the
packed weights once per call. By default they work as llama.cpp does: each input row is rounded to int8 in blocks of
32, and each block's products are summed exactly as integers (byte multiply-adds: AVX512-VNNI's vpdpbusd, AVX2's
vpmaddubsw), which is what lets them stream the weights at the memory's speed for one row and run prefill as integer
arithmetic. The weights of layers whose outputs are a multiple of 16 (every real model's) are held in panels
(``llama.quant.tensor.to_panels``: 16 rows' 4-byte words side by side), which the panel product reads as they are
for any number of rows. Weights held as rows take matrix-vector loops up to 3 rows, and from 4 (a batch of decoding
rows, a prompt) the panel product over panels packed once per call. All compute the same fp32 operations in the same
order (exact integer block sums, each scaled and added in turn), so a row's result is bitwise the same in a call of
any number of rows: the continuous-batching engine's quantized requests do not depend on their batch. That rounding
moves a result by about 0.5% of its norm on random data; on the demo model it moves perplexity by 0.03% or less
(tests hold the bounds). ``use_int8_inputs(model, False)`` (``llama.quant.linear``) switches a model to the exact
mode instead: products with the dequantized weights, exact in fp32 and summed in fp32, slower (for up to
``KERNEL_MAX_ROWS`` rows the exact kernels, beyond that a C loop dequantizes the weight to fp32 for torch's fp32
GEMM). Group sizes the int8-input kernels do not serve (int8: not a multiple of 32; int4: other than 32) always take
the exact mode, and so does prefill where the panel product has no vector loop (``vector_panel_loops``). On CUDA,
or without a C compiler, a layer dequantizes its weight to the model's dtype and calls ``F.linear`` (under
``torch.compile`` inductor fuses the dequantization into the product).
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from llama.kernels import cpu_gemv
from llama.quant.scheme import MODES, SCALE_DTYPE, Scheme
from llama.quant.tensor import PANEL_ROWS, dequantize, dequantize_rows, fits_panels, weights_from_panels

SOURCE = Path(__file__).parent.parent / "csrc" / "gemv_quant.c"

# Above this many input rows (prefill), the exact mode dequantizes the weight to fp32 (in C) for torch's GEMM,
# which then beats the exact kernels.
KERNEL_MAX_ROWS = 16

_lock = threading.Lock()
_state: dict[str, object] = {}  # "fns": {"int8": fn, "int4": fn}, or None once building them has failed


def kernels() -> Optional[dict[str, ctypes._CFuncPtr]]:
    """The compiled kernels by mode, built on first call (like cpu_gemv's); None where they cannot be built."""
    if "fns" not in _state:
        with _lock:
            if "fns" not in _state:
                # name -> (C symbol, argument types): the products, then the dequantizations to fp32
                spec = {f"{m}{x}": (f"llama_gemv_{m}{x}", [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5)
                        for m in MODES for x in ("", "_q8x")}  # fmt: skip
                spec.update({f"gemm_{m}": (f"llama_gemm_{m}_q8x", spec[f"{m}_q8x"][1]) for m in MODES})
                # the same products on weights stored in panels (``llama.quant.tensor.to_panels``)
                spec.update({f"{m}_panels{x}": (f"llama_gemv_{m}_panels{x}", spec[f"{m}_q8x"][1])
                             for m in MODES for x in ("", "_q8x")})  # fmt: skip
                spec.update({f"dequant_{m}": (f"llama_dequant_{m}", [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3)
                             for m in MODES})  # fmt: skip
                spec["gemm_loop"] = ("llama_gemm_q8_loop", [])
                fns = cpu_gemv.load_kernel(
                    SOURCE, dict(spec.values()), "quantized layers dequantize their weights and use torch's matmul",
                    restype=ctypes.c_int,
                )  # fmt: skip
                if fns is not None:
                    fns["llama_gemm_q8_loop"].restype = ctypes.c_char_p
                    _state["gemm_loop"] = fns["llama_gemm_q8_loop"]().decode()
                _state["fns"] = None if fns is None else {name: fns[symbol] for name, (symbol, _) in spec.items()}
    return _state["fns"]  # type: ignore[return-value]


def gemm_loop() -> Optional[str]:
    """Which loop the built panel product (many input rows with int8 inputs) runs: "avx512vnni", "avx2" or
    "plain" (see gemv_quant.c); None where the kernels are not built."""
    return _state.get("gemm_loop") if kernels() is not None else None  # type: ignore[return-value]


def vector_panel_loops() -> bool:
    """Whether the built panel product runs vector loops (AVX2, AVX512-VNNI). Where it does, many input rows
    (prefill) take it with int8 inputs, and quantized layers hold their weights in panels (``QuantizedLinear``).
    The portable build's loop is scalar: slower than dequantizing for torch's fp32 GEMM, and reading panels
    several times slower than rows (one row on a Zen 4: 403 against 78 ms over the 0.85B shape's int8 products)."""
    return gemm_loop() in ("avx512vnni", "avx2")


def available() -> bool:
    """Whether the quantized GEMV kernels are built (or can be built now) and loaded."""
    return kernels() is not None


_library = torch.library.Library("llama", "FRAGMENT")
for _mode in MODES:
    _library.define(
        f"linear_{_mode}(Tensor x, Tensor qweight, Tensor scales, int group_size, bool int8_x=False, "
        "bool panels=False) -> Tensor"
    )


def int8_x_applies(mode: str, group_size: int) -> bool:
    """Whether the kernels with int8 inputs serve this format: blocks of 32 inputs must not straddle a group,
    and the int4 packing keeps a block's weights in one run of bytes only for groups of 32."""
    return group_size % 32 == 0 if mode == "int8" else group_size == 32


def _linear_kernel(
    mode: str, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, int8_x: bool = False,
    panels: bool = False,
) -> torch.Tensor:  # fmt: skip
    """F.linear(x, dequantize(qweight, scales)) through the C kernel; x (..., k) float on the CPU.

    int8_x: quantize x to int8 in blocks of 32 and sum integer products (llama.cpp's way; see gemv_quant.c),
    where the format allows (``int8_x_applies``): faster, but it rounds x as well. panels: qweight and scales are
    in the panel layout (``to_panels``).
    """
    n = qweight.shape[0]
    k = qweight.shape[1] * (1 if mode == "int8" else 2)
    if x.device.type != "cpu" or qweight.device.type != "cpu" or scales.dtype != SCALE_DTYPE:
        raise TypeError(f"linear_{mode} takes CPU tensors and bf16 scales, got x on {x.device}, qweight on "
                        f"{qweight.device}, scales {scales.dtype}")  # fmt: skip
    if x.shape[-1] != k or scales.shape != (n, k // group_size) or k % group_size:
        raise ValueError(f"linear_{mode}: x {tuple(x.shape)} does not fit qweight {tuple(qweight.shape)} and "
                         f"scales {tuple(scales.shape)} with group size {group_size}")  # fmt: skip
    if panels and not fits_panels(n, Scheme(mode, group_size)):
        raise ValueError(f"linear_{mode}: qweight {tuple(qweight.shape)} with group size {group_size} cannot be in "
                         f"panels (rows must be a multiple of {PANEL_ROWS}; see fits_panels)")  # fmt: skip
    fns = kernels()
    if fns is None:
        return F.linear(x, dequantize_rows(qweight, scales, Scheme(mode, group_size), panels, x.dtype))
    # fp32 and bf16 inputs and outputs pass as they are (io flags); any other float dtype as fp32. Each aten
    # call costs microseconds, and a decode step makes over a hundred of these calls: only the needed ones.
    dtype = x.dtype if x.dtype in IO_FLAGS else torch.float32
    x2 = x if x.dtype == dtype and x.is_contiguous() else x.to(dtype).contiguous()
    q = qweight if qweight.is_contiguous() else qweight.contiguous()
    s = scales if scales.is_contiguous() else scales.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=dtype)
    fn = product_kernel(fns, mode, group_size, int8_x, panels)
    if fn(x2.data_ptr(), q.data_ptr(), s.data_ptr(), y.data_ptr(), x2.numel() // k, n, k, group_size, IO_FLAGS[dtype]):
        raise MemoryError(f"linear_{mode}: out of memory for the kernel's scratch ({x2.numel() // k} rows of {k})")
    return y if y.dtype == x.dtype else y.to(x.dtype)


IO_FLAGS = {torch.float32: 0, torch.bfloat16: 1 | 2}  # gemv_quant.c's IO_X_BF16 | IO_Y_BF16, by activation dtype


def product_kernel(
    fns: dict[str, ctypes._CFuncPtr], mode: str, group_size: int, int8_x: bool, panels: bool = False
) -> ctypes._CFuncPtr:
    """The C product for a format, of the built `fns` (``kernels()``): with int8 inputs where asked and the
    format allows, else exact; on weights in the panel layout where `panels` says so."""
    layout = "_panels" if panels else ""
    return fns[f"{mode}{layout}_q8x"] if int8_x and int8_x_applies(mode, group_size) else fns[f"{mode}{layout}"]


def dequantize_cpu(
    qweight: torch.Tensor, scales: torch.Tensor, scheme: Scheme, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``dequantize(qweight, scales, scheme)`` in fp32 by the C kernels (many times faster than torch's ops),
    for CPU tensors, into `out` (fp32, contiguous, at least n * k elements) if given; torch's ops where the
    kernels are not built."""
    fns = kernels()
    if fns is None:
        return dequantize(qweight, scales, scheme)
    q, s = qweight.contiguous(), scales.contiguous()
    n, k = q.shape[0], scheme.in_features(q.shape[1])
    if s.shape != (n, k // scheme.group_size) or s.dtype != SCALE_DTYPE or q.device.type != "cpu":
        raise ValueError(f"dequantize_cpu: qweight {tuple(q.shape)} on {q.device} does not fit scales "
                         f"{tuple(s.shape)} {s.dtype} with group size {scheme.group_size}")  # fmt: skip
    if out is None:
        out = torch.empty(n, k, dtype=torch.float32)
    elif out.dtype != torch.float32 or not out.is_contiguous() or out.numel() < n * k:
        raise ValueError(f"dequantize_cpu: out must be a contiguous fp32 tensor of at least {n * k} elements")
    out = out.view(-1)[: n * k].view(n, k)
    fns[f"dequant_{scheme.mode}"](q.data_ptr(), s.data_ptr(), out.data_ptr(), n, k, scheme.group_size)
    return out


def linear_dequantized(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, scheme: Scheme, panels: bool = False
) -> torch.Tensor:
    """``F.linear(x, dequantize(qweight, scales))`` on the CPU for many input rows: torch's fp32 GEMM over the
    weight's rows dequantized a chunk at a time (``cpu_gemv.linear_in_fp32_chunks``), the result in x's dtype.
    panels: the weights are in the panel layout (each chunk's panels are put back in rows first)."""

    def rows(lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        if not panels:
            return dequantize_cpu(qweight[lo:hi], scales[lo:hi], scheme, out=out)
        first, last = lo - lo % PANEL_ROWS, -(-hi // PANEL_ROWS) * PANEL_ROWS  # the panels rows lo..hi lie in
        q, s = weights_from_panels(qweight[first:last], scales[first:last])
        return dequantize_cpu(q[lo - first : hi - first], s[lo - first : hi - first], scheme, out=out)

    return cpu_gemv.linear_in_fp32_chunks(x, qweight.shape[0], rows)


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                int8_x: bool = False, panels: bool = False) -> torch.Tensor:  # fmt: skip
    """``F.linear(x, dequantize(...))`` for int8 weights through the C kernel (``torch.ops.llama.linear_int8``)."""
    return _linear_kernel("int8", x, qweight, scales, group_size, int8_x, panels)


def linear_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                int8_x: bool = False, panels: bool = False) -> torch.Tensor:  # fmt: skip
    """``F.linear(x, dequantize(...))`` for packed int4 weights through the C kernel (``llama::linear_int4``)."""
    return _linear_kernel("int4", x, qweight, scales, group_size, int8_x, panels)


def _fake(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
          int8_x: bool = False, panels: bool = False) -> torch.Tensor:  # fmt: skip
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


for _mode, _fn in (("int8", linear_int8), ("int4", linear_int4)):
    _library.impl(f"linear_{_mode}", _fn, "CompositeExplicitAutograd")
    torch.library.register_fake(f"llama::linear_{_mode}", _fake)


def cpu_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, scheme: Scheme, int8_x: bool = True,
    panels: bool = False,
) -> torch.Tensor:  # fmt: skip
    """``F.linear(x, dequantize(qweight, scales))`` on a CPU whose kernels are built, for weights held as rows or
    in panels (`panels`). With int8 inputs (where asked and the format allows) the kernels take any number of rows
    (on rows, from 4 rows on the panel product; past KERNEL_MAX_ROWS only where it is vectorized:
    ``vector_panel_loops``). Otherwise the exact kernels up to KERNEL_MAX_ROWS rows, and the exact fp32 GEMM
    on dequantized weights beyond."""
    int8_x = int8_x and int8_x_applies(scheme.mode, scheme.group_size)
    if x.numel() > KERNEL_MAX_ROWS * x.shape[-1] and not (int8_x and vector_panel_loops()):
        return linear_dequantized(x, qweight, scales, scheme, panels)  # exact prefill: torch's fp32 GEMM
    op = torch.ops.llama.linear_int8 if scheme.mode == "int8" else torch.ops.llama.linear_int4
    return op(x, qweight, scales, scheme.group_size, int8_x, panels)
