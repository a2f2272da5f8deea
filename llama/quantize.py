"""Weight-only int8 and int4 quantization of the linear layers (``Llama.build(..., quantize="int8" | "int4")``).

Every linear layer (``wq wk wv wo w1 w2 w3`` and ``output``) is swapped for a ``QuantizedLinear`` by walking
the model's modules, as gpt-fast does; ``model.py`` knows nothing of it. Activations, the embedding, the norms
and the KV cache stay in the model's dtype.

Formats. Weights are quantized in groups of ``group_size`` (default 32) consecutive inputs of one output row,
each group with its own scale, stored in bfloat16 (fp32's range, so no group underflows or overflows as fp16
scales can; the values are quantized against the rounded scale, so the round trip is exact):

- ``int8``: symmetric, q = round(w / s) in [-127, 127] with s = max|w| / 127; ``qweight`` int8 (n, k).
  8.5 bits a weight with the scales.
- ``int4``: symmetric with all 16 levels, as llama.cpp's Q4_0: s = m / -8 for m the group's weight of largest
  magnitude (so m itself is exactly -8 s), q = round(w / s) clamped to [-8, 7]; 15 levels over +-max|w|
  would waste one and give a 14% coarser step. Stored as q + 8 in nibbles, two per byte, ``qweight`` uint8
  (n, k / 2): in each group, byte j holds weight j (low nibble) and weight j + group_size / 2 (high nibble),
  so the C kernel unpacks a run of bytes into two runs of consecutive weights. 4.5 bits a weight.

Why groups of 32: with one scale per output row, a row's largest weight would set the step for all its
others; groups bound that to 32 weights for 0.5 bit of scales a weight (llama.cpp's Q8_0 and Q4_0 make the
same choice). On the demo model's 3,000-token held-out sample (fp32 compute; bf16 checkpoint 91.60), int4
perplexity was +0.53% with groups of 16, +0.46% with 32 and +0.68% with 96; int8 was within 0.02% at 32 and
96 (a model this small says little about larger groups on large models, whose rows hold larger outliers).

Products. ``QuantizedLinear(x)`` stands for ``x @ dequantize(W).T``. On a CPU, for up to ``KERNEL_MAX_ROWS``
input rows (decoding), it runs the C kernels of ``csrc/gemv_quant.c`` (torch operators ``llama::linear_int8``
and ``llama::linear_int4``), which read the packed weights once per call. By default they work as llama.cpp
does: each input row is rounded to int8 in blocks of 32 as well, and each block's products are summed as
integers (AVX2's byte multiply-adds), which is what lets them stream the weights at the memory's speed. That
rounding moves a result by about 0.5% of its norm on random data; on the demo model it moves perplexity by 0.03%
or less (tests hold the bounds). ``use_int8_inputs(model, False)`` switches a model to the exact kernels
instead: products with the dequantized weights, exact in fp32 and summed in fp32, slower (about bf16's speed per
weight). Group sizes the int8-input kernels do not serve (int8: not a multiple of 32; int4: other than 32)
always take the exact kernels. With more than ``KERNEL_MAX_ROWS`` input rows (prefill), a C loop dequantizes the
weight to fp32 and torch's fp32 GEMM computes the exact product, which is faster there. On CUDA, or without a C
compiler, a layer dequantizes its weight to the model's dtype and calls ``F.linear`` (under ``torch.compile``
inductor fuses the dequantization into the product).

Loading. ``load_weights`` reads a float checkpoint one tensor at a time from the memory-mapped shards and
quantizes each linear weight as it goes, so the full-precision model is never resident: the shards are mapped
afresh for every layer, so the pages read for one layer leave the process with it. Under model parallelism each
rank quantizes its own slice; a group never straddles two ranks, so group_size must divide every rank's
slice of the inputs. A quantized checkpoint (``python -m llama.quantize``) holds ``P.qweight`` and
``P.scales`` instead of ``P.weight`` for every linear layer P, and its params.json says how it was made under
the key ``"quantization": {"mode": "int4", "group_size": 32}``; ``Llama.build`` loads it directly, and
``python -m llama.reshard`` re-cuts it as it is (each shard must hold whole groups). Tools that need float weights
(``python -m llama.convert to_hf``, quantizing again) refuse it, naming the scheme. Loading one refuses, naming the
file and the key, what ``quantize`` never writes: a missing or float P.weight, a qweight or scales that are not 2-D
or do not fit each other, other dtypes, and scales that are inf, NaN, negative (int8; int4's take either sign) or
so large that their weights overflow fp32.

    python -m llama.quantize --ckpt_dir llama-2-7b --out_dir llama-2-7b-int4 --mode int4 [--group_size 32]
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import logging
import math
import pickle
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel import mappings
from torch import nn

from llama.families import family_of_folder
from llama.kernels import cpu_gemv
from llama.model import ModelArgs, Transformer
from llama.weights import checkpoint
from llama.weights.layout import Layout, _built_as_one_rank

# `python -m llama.quantize` executes this file as __main__: hand over to the one llama.quantize module before
# this copy defines anything, so nothing is defined twice (see commandline.run_module).
if __name__ == "__main__":
    from llama.commandline import run_module

    run_module("llama.quantize", "main")

logger = logging.getLogger(__name__)

MODES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 32
PARAMS_KEY = checkpoint.QUANTIZATION_KEY  # in params.json of a quantized checkpoint
SCALE_DTYPE = torch.bfloat16
_ROWS_PER_CHUNK = 1024  # rows quantized at once: bounds the fp32 scratch to 1024 x in_features
# Above this many input rows (prefill), the CPU path dequantizes the weight to fp32 (in C) for torch's GEMM,
# which then beats the kernels.
KERNEL_MAX_ROWS = 16

SOURCE = Path(__file__).parent / "csrc" / "gemv_quant.c"


@dataclass(frozen=True)
class Scheme:
    """How weights are quantized: mode "int8" or "int4", and the number of inputs that share a scale."""

    mode: str
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown quantization mode {self.mode!r}; use one of {', '.join(map(repr, MODES))}")
        g = self.group_size
        if not isinstance(g, int) or isinstance(g, bool) or g < 1 or (self.mode == "int4" and g % 2):
            what = "a positive even integer" if self.mode == "int4" else "a positive integer"
            raise ValueError(f"group_size must be {what} for {self.mode}, got {g!r}")

    def to_params(self) -> dict[str, Any]:
        return {"mode": self.mode, "group_size": self.group_size}

    def check_fits(self, name: str, in_features: int, world_size: int = 1) -> None:
        """Raise a ValueError unless groups tile `in_features` (one rank's inputs of layer `name`)."""
        if in_features % self.group_size:
            per_rank = f" per rank ({world_size} model-parallel ranks)" if world_size > 1 else ""
            raise ValueError(
                f"group_size {self.group_size} does not divide the {in_features} inputs{per_rank} of {name}: a "
                "group may not straddle a row's end or a rank's slice; choose a group size that divides it"
            )


def split_params(
    params: Mapping[str, Any], quantize: Optional[str], source: str = "the checkpoint"
) -> tuple[dict[str, Any], Optional[Scheme]]:
    """params.json without its quantization key, and the scheme to load with: the checkpoint's own if it is
    quantized (`quantize` must then be None or the same mode), else `quantize` (None: no quantization).
    source: the checkpoint, as errors name it."""
    params = dict(params)
    recorded = params.pop(PARAMS_KEY, None)
    if recorded is None:
        return params, None if quantize is None else Scheme(quantize)
    if not isinstance(recorded, Mapping) or set(recorded) != {"mode", "group_size"}:
        raise ValueError(
            f"params.json's {PARAMS_KEY!r} must be an object with 'mode' and 'group_size', got {recorded!r}"
        )
    scheme = Scheme(recorded["mode"], recorded["group_size"])
    if quantize is not None and quantize != scheme.mode:
        raise ValueError(
            f"{source} is already quantized as {scheme.mode} (group {scheme.group_size}); load it with "
            f"quantize=None (no --quantize in the example scripts) or {scheme.mode!r}, or quantize the float "
            f"checkpoint it was made from as {quantize!r}"
        )
    return params, scheme


# ------------------------------------------------------------------------------------- quantize, dequantize


def quantize(w: torch.Tensor, scheme: Scheme, name: str = "a weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, scales) of a float weight w (n, k): int8 (n, k) or packed uint8 (n, k / 2), and bf16 scales
    (n, k / group_size). Computed in fp32, `_ROWS_PER_CHUNK` rows at a time. name: w, as errors name it (the
    key and the file it comes from)."""
    if w.ndim != 2 or not w.is_floating_point():
        raise ValueError(f"quantize takes a 2-D float weight, got {w.dtype} of shape {tuple(w.shape)}")
    n, k = w.shape
    scheme.check_fits("this weight", k)
    g = scheme.group_size
    cols = k if scheme.mode == "int8" else k // 2
    qweight = torch.empty(n, cols, dtype=torch.int8 if scheme.mode == "int8" else torch.uint8, device=w.device)
    scales = torch.empty(n, k // g, dtype=SCALE_DTYPE, device=w.device)
    for lo in range(0, n, _ROWS_PER_CHUNK):
        groups = w[lo : lo + _ROWS_PER_CHUNK].to(torch.float32, copy=True).reshape(-1, k // g, g)  # changed below
        magnitude = groups.abs().amax(-1)  # (rows, k / g); NaN and inf carry through
        if not torch.isfinite(magnitude).all():
            raise ValueError(f"cannot quantize {name}: it holds inf or NaN values (a damaged file? re-download it)")
        if scheme.mode == "int8":
            scale = (magnitude / 127).to(SCALE_DTYPE)
            lowest, highest = -127, 127
        else:
            # The signed weight of largest magnitude in each group maps to -8 exactly.
            extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
            scale = (extreme / -8).to(SCALE_DTYPE)
            lowest, highest = -8, 7
        divisor = scale.float().masked_fill(scale == 0, 1.0)[..., None]  # an all-zero group: q = 0
        q = groups.div_(divisor).round_().clamp_(lowest, highest).to(torch.int8).reshape(-1, k)
        scales[lo : lo + _ROWS_PER_CHUNK] = scale
        qweight[lo : lo + _ROWS_PER_CHUNK] = q if scheme.mode == "int8" else pack_int4(q, g)
    return qweight, scales


def pack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """int values in [-8, 7] (n, k) -> uint8 (n, k / 2): each group's first half in the low nibbles."""
    n, k = q.shape
    u = (q.to(torch.int16) + 8).to(torch.uint8).reshape(n, k // group_size, 2, group_size // 2)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """uint8 (n, k / 2) -> int8 (n, k) in [-8, 7]; the inverse of pack_int4."""
    n = packed.shape[0]
    p = packed.reshape(n, -1, group_size // 2)
    u = torch.stack([p & 15, p >> 4], dim=2)  # (n, k / g, 2, g / 2)
    return (u.to(torch.int8) - 8).reshape(n, -1)


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, scheme: Scheme, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The float weight (n, k) that (qweight, scales) stand for: q * s, computed in fp32 (exactly), cast to dtype."""
    q = qweight if scheme.mode == "int8" else unpack_int4(qweight, scheme.group_size)
    n, k = q.shape
    w = q.float().reshape(n, k // scheme.group_size, scheme.group_size) * scales.float()[..., None]
    return w.reshape(n, k).to(dtype)


# ------------------------------------------------------------------------------------- the C kernels

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
                spec.update({f"dequant_{m}": (f"llama_dequant_{m}", [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3)
                             for m in MODES})  # fmt: skip
                fns = cpu_gemv.load_kernel(
                    SOURCE, dict(spec.values()), "quantized layers dequantize their weights and use torch's matmul",
                    restype=ctypes.c_int,
                )  # fmt: skip
                _state["fns"] = None if fns is None else {name: fns[symbol] for name, (symbol, _) in spec.items()}
    return _state["fns"]  # type: ignore[return-value]


def available() -> bool:
    """Whether the quantized GEMV kernels are built (or can be built now) and loaded."""
    return kernels() is not None


_library = torch.library.Library("llama", "FRAGMENT")
for _mode in MODES:
    _library.define(
        f"linear_{_mode}(Tensor x, Tensor qweight, Tensor scales, int group_size, bool int8_x=False) -> Tensor"
    )


def int8_x_applies(mode: str, group_size: int) -> bool:
    """Whether the kernels with int8 inputs serve this format: blocks of 32 inputs must not straddle a group,
    and the int4 packing keeps a block's weights in one run of bytes only for groups of 32."""
    return group_size % 32 == 0 if mode == "int8" else group_size == 32


def _linear_kernel(
    mode: str, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, int8_x: bool = False
) -> torch.Tensor:
    """F.linear(x, dequantize(qweight, scales)) through the C kernel; x (..., k) float on the CPU.

    int8_x: quantize x to int8 in blocks of 32 and sum integer products (llama.cpp's way; see gemv_quant.c),
    where the format allows (``int8_x_applies``): faster, but it rounds x as well.
    """
    n = qweight.shape[0]
    k = qweight.shape[1] * (1 if mode == "int8" else 2)
    if x.device.type != "cpu" or qweight.device.type != "cpu" or scales.dtype != SCALE_DTYPE:
        raise TypeError(f"linear_{mode} takes CPU tensors and bf16 scales, got x on {x.device}, qweight on "
                        f"{qweight.device}, scales {scales.dtype}")  # fmt: skip
    if x.shape[-1] != k or scales.shape != (n, k // group_size) or k % group_size:
        raise ValueError(f"linear_{mode}: x {tuple(x.shape)} does not fit qweight {tuple(qweight.shape)} and "
                         f"scales {tuple(scales.shape)} with group size {group_size}")  # fmt: skip
    fns = kernels()
    if fns is None:
        return F.linear(x, dequantize(qweight, scales, Scheme(mode, group_size), x.dtype))
    # fp32 and bf16 inputs and outputs pass as they are (io flags); any other float dtype as fp32. Each aten
    # call costs microseconds, and a decode step makes over a hundred of these calls: only the needed ones.
    dtype = x.dtype if x.dtype in IO_FLAGS else torch.float32
    x2 = x if x.dtype == dtype and x.is_contiguous() else x.to(dtype).contiguous()
    q = qweight if qweight.is_contiguous() else qweight.contiguous()
    s = scales if scales.is_contiguous() else scales.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=dtype)
    fn = product_kernel(fns, mode, group_size, int8_x)
    if fn(x2.data_ptr(), q.data_ptr(), s.data_ptr(), y.data_ptr(), x2.numel() // k, n, k, group_size, IO_FLAGS[dtype]):
        raise MemoryError(f"linear_{mode}: out of memory for the kernel's scratch ({x2.numel() // k} rows of {k})")
    return y if y.dtype == x.dtype else y.to(x.dtype)


IO_FLAGS = {torch.float32: 0, torch.bfloat16: 1 | 2}  # gemv_quant.c's IO_X_BF16 | IO_Y_BF16, by activation dtype


def product_kernel(fns: dict[str, ctypes._CFuncPtr], mode: str, group_size: int, int8_x: bool) -> ctypes._CFuncPtr:
    """The C product for a format, of the built `fns` (``kernels()``): with int8 inputs where asked and the
    format allows, else exact."""
    return fns[f"{mode}_q8x"] if int8_x and int8_x_applies(mode, group_size) else fns[mode]


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
    n, k = q.shape[0], q.shape[1] * (1 if scheme.mode == "int8" else 2)
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


def linear_dequantized(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """``F.linear(x, dequantize(qweight, scales))`` on the CPU for many input rows: torch's fp32 GEMM over the
    weight's rows dequantized a chunk at a time (``cpu_gemv.linear_in_fp32_chunks``), the result in x's dtype."""

    def rows(lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        return dequantize_cpu(qweight[lo:hi], scales[lo:hi], scheme, out=out)

    return cpu_gemv.linear_in_fp32_chunks(x, qweight.shape[0], rows)


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                int8_x: bool = False) -> torch.Tensor:  # fmt: skip
    """``F.linear(x, dequantize(...))`` for int8 weights through the C kernel (``torch.ops.llama.linear_int8``)."""
    return _linear_kernel("int8", x, qweight, scales, group_size, int8_x)


def linear_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                int8_x: bool = False) -> torch.Tensor:  # fmt: skip
    """``F.linear(x, dequantize(...))`` for packed int4 weights through the C kernel (``llama::linear_int4``)."""
    return _linear_kernel("int4", x, qweight, scales, group_size, int8_x)


def _fake(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
          int8_x: bool = False) -> torch.Tensor:  # fmt: skip
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


for _mode, _fn in (("int8", linear_int8), ("int4", linear_int4)):
    _library.impl(f"linear_{_mode}", _fn, "CompositeExplicitAutograd")
    torch.library.register_fake(f"llama::linear_{_mode}", _fake)


def cpu_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, scheme: Scheme, int8_x: bool = True
) -> torch.Tensor:
    """``F.linear(x, dequantize(qweight, scales))`` on a CPU whose kernels are built: the kernels (with int8
    inputs where asked and the format allows) for up to KERNEL_MAX_ROWS rows, else the exact fp32 GEMM."""
    if x.numel() > KERNEL_MAX_ROWS * x.shape[-1]:  # prefill: torch's fp32 GEMM, exact
        return linear_dequantized(x, qweight, scales, scheme)
    int8_x = int8_x and int8_x_applies(scheme.mode, scheme.group_size)
    op = torch.ops.llama.linear_int8 if scheme.mode == "int8" else torch.ops.llama.linear_int4
    return op(x, qweight, scales, scheme.group_size, int8_x)


# ------------------------------------------------------------------------------------- the module

PARALLEL_LINEARS = (fs_layers.ColumnParallelLinear, fs_layers.RowParallelLinear)


class QuantizedLinear(nn.Module):
    """A parallel linear layer (column- or row-parallel, no bias) with quantized weights held as buffers.

    qweight and scales are this rank's slice; under model parallelism the layer talks to the other ranks as
    fairscale's layer it replaces does (copy/gather for column-parallel, reduce for row-parallel).
    """

    def __init__(
        self, in_features: int, out_features: int, scheme: Scheme, parallel: str = "column",
        gather_output: bool = False, device: Optional[torch.device | str] = None,
    ):  # fmt: skip
        super().__init__()
        scheme.check_fits("QuantizedLinear", in_features)
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.parallel, self.gather_output = parallel, gather_output
        self.int8_x = True  # CPU products with int8 inputs (llama.cpp's way); False: exact (use_int8_inputs)
        self.one_rank = fs_init.get_model_parallel_world_size() == 1
        cols = in_features if scheme.mode == "int8" else in_features // 2
        qdtype = torch.int8 if scheme.mode == "int8" else torch.uint8
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=qdtype, device=device))
        groups = in_features // scheme.group_size
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=SCALE_DTYPE, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Module, scheme: Scheme, name: str = "a linear layer") -> QuantizedLinear:
        """The quantized version of a fairscale Column/RowParallelLinear (its weight is this rank's slice)."""
        if getattr(linear, "bias", None) is not None:
            raise ValueError(f"{name} has a bias; QuantizedLinear quantizes bias-free layers only")
        out_features, in_features = linear.weight.shape
        scheme.check_fits(name, in_features, fs_init.get_model_parallel_world_size())
        parallel = "row" if isinstance(linear, fs_layers.RowParallelLinear) else "column"
        layer = cls(in_features, out_features, scheme, parallel, getattr(linear, "gather_output", False), "meta")
        layer.qweight, layer.scales = quantize(linear.weight.detach(), scheme, name)
        return layer

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.scheme.mode}, group_size={self.scheme.group_size}"

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.scheme, dtype)

    def cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's product on a CPU whose kernels are built (``available()``, which the caller checks: the
        fast path checks it once, outside its compiled step)."""
        return cpu_linear(x, self.qweight, self.scales, self.scheme, self.int8_x)

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and available():
            return self.cpu_forward(x)
        return F.linear(x, self.dequantized_weight(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_rank:
            return self.local_forward(x)
        if self.parallel == "row":  # the input is already this rank's slice (input_is_parallel)
            return mappings.reduce_from_model_parallel_region(self.local_forward(x))
        out = self.local_forward(mappings.copy_to_model_parallel_region(x))
        return mappings.gather_from_model_parallel_region(out) if self.gather_output else out


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> module, for every parallel linear layer of the model (the ones quantization swaps)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PARALLEL_LINEARS)}


def use_int8_inputs(model: nn.Module, on: bool = True) -> nn.Module:
    """Whether the model's quantized layers round their inputs to int8 in the CPU kernels (on by default:
    llama.cpp's way, fast) or compute the exact products with the dequantized weights (off: slower). Returns
    the model."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.int8_x = on
    return model


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, scheme: Scheme) -> nn.Module:
    """Swap every parallel linear layer of a loaded model for a QuantizedLinear, in place; returns the model.

    Each float weight is dropped once its layer is quantized. (Llama.build quantizes while loading instead.)
    """
    world_size = fs_init.get_model_parallel_world_size()
    layers = linear_layers(model)
    for name, linear in layers.items():
        scheme.check_fits(name, linear.weight.shape[1], world_size)
    for name, linear in layers.items():
        _set_module(model, name, QuantizedLinear.from_linear(linear, scheme, name))
    return model


def _swap_for_empty(model: nn.Module, scheme: Scheme, world_size: int) -> list[str]:
    """Replace the parallel linear layers by data-less QuantizedLinears (meta buffers); their names."""
    layers = linear_layers(model)
    for name, linear in layers.items():
        out_features, in_features = linear.weight.shape
        scheme.check_fits(name, in_features, world_size)
        parallel = "row" if isinstance(linear, fs_layers.RowParallelLinear) else "column"
        gather = getattr(linear, "gather_output", False)
        _set_module(model, name, QuantizedLinear(in_features, out_features, scheme, parallel, gather, "meta"))
    return list(layers)


# ------------------------------------------------------------------------------------- loading

_LAYER = re.compile(r"^layers\.(\d+)\.")


def _load_quantized_shard(path: Path) -> dict[str, torch.Tensor]:
    """Open one shard of a quantized checkpoint memory-mapped and safely (weights_only: tensors only)."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"refusing to load {str(path)!r}: it holds objects other than tensors ({e})") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ValueError(f"cannot read checkpoint shard {str(path)!r} (corrupt or truncated?): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} must hold a dict of tensors")
    return state


def quantized_layout(layout: Layout, linears: Sequence[str], scheme: Scheme) -> Layout:
    """The layout of a quantized checkpoint of a model of `layout`: P.qweight and P.scales in place of P.weight
    for every linear layer P, split (and repeated over ranks) as the weight they replace. Full shapes where
    `layout` has them; a linear layer that `layout` lacks (shards missing it) is left out."""
    shapes, dims, repeats = dict(layout.shapes), dict(layout.split_dims), dict(layout.repeats)
    for name in linears:
        weight, qweight, scales = f"{name}.weight", f"{name}.qweight", f"{name}.scales"
        if weight not in dims:
            continue
        dims[qweight] = dims[scales] = dims.pop(weight)
        if weight in repeats:
            repeats[qweight] = repeats[scales] = repeats.pop(weight)
        if weight in shapes:
            n, k = shapes.pop(weight)
            shapes[qweight] = (n, k if scheme.mode == "int8" else k // 2)
            shapes[scales] = (n, k // scheme.group_size)
    return Layout(shapes, dims, repeats)


@functools.lru_cache(maxsize=8)
def _linear_patterns(model_cls: type) -> frozenset[str]:
    """The linear layers of any model_cls model by name pattern ("layers.{i}.attention.wq", "output"), from a
    one-layer model."""
    tiny = ModelArgs(dim=4, n_layers=1, n_heads=1, multiple_of=1, vocab_size=1, max_batch_size=1, max_seq_len=1)
    return frozenset(_LAYER.sub("layers.{i}.", name) for name in _linear_names(tiny, model_cls))


def _is_linear(name: str, patterns: frozenset[str]) -> bool:
    """Whether module `name` ("layers.3.attention.wq") is a linear layer of the `patterns`."""
    return _LAYER.sub("layers.{i}.", name) in patterns


def _check_quantized_shard(
    path: Path, shard: Mapping[str, torch.Tensor], scheme: Scheme, patterns: frozenset[str]
) -> None:
    """Raise a ValueError naming the file and the key where a shard of a quantized checkpoint is not as
    ``quantize_checkpoint`` writes it: each linear layer P (of `patterns`) holds P.qweight and P.scales, never a
    float P.weight; both are 2-D and fit each other (int8 (n, k) or int4's packed uint8 (n, k / 2), and bf16 scales
    (n, k / group_size)); every other weight is a float one (``checkpoint.check_weight_dtype``)."""
    where = f"{str(path)!r} (a quantized checkpoint's shard: {scheme.mode}, group {scheme.group_size})"
    dtypes = {"qweight": torch.int8 if scheme.mode == "int8" else torch.uint8, "scales": SCALE_DTYPE}
    for key, t in shard.items():
        name, _, kind = key.rpartition(".")
        if kind in dtypes and _is_linear(name, patterns):
            if t.ndim != 2:
                raise ValueError(
                    f"{where}: {key!r} has shape {tuple(t.shape)}, but a linear layer's {kind} is 2-D (its rows "
                    "are the layer's outputs): the file is damaged; re-download it or quantize the float checkpoint "
                    "again"
                )
            if t.dtype != dtypes[kind]:
                raise ValueError(
                    f"{where}: {key!r} is {t.dtype}, but the {kind} of an {scheme.mode} checkpoint holds "
                    f"{dtypes[kind]} (does params.json's 'quantization' belong to these shards?)"
                )
            other = f"{name}.{'scales' if kind == 'qweight' else 'qweight'}"
            if other not in shard:
                raise ValueError(
                    f"{where} does not fit the model: missing keys: {other} (next to {key}: a quantized "
                    f"checkpoint holds P.qweight and P.scales for every linear layer P)"
                )
        elif kind == "weight" and _is_linear(name, patterns):
            raise ValueError(
                f"{where}: {key!r} is a float weight, but params.json says the checkpoint is quantized, where each "
                f"linear layer holds {name}.qweight and {name}.scales instead (was a float shard copied in?)"
            )
        elif key not in checkpoint.IGNORED_KEYS and kind not in dtypes:
            checkpoint.check_weight_dtype(path, key, t)
    for name in _linears_in(shard, patterns):
        q, s = shard[f"{name}.qweight"], shard[f"{name}.scales"]
        inputs = q.shape[1] * (2 if scheme.mode == "int4" else 1)
        if s.shape != (q.shape[0], inputs // scheme.group_size) or inputs % scheme.group_size:
            packed = " (two int4 weights a byte)" if scheme.mode == "int4" else ""
            raise ValueError(
                f"{where}: {name}.qweight {tuple(q.shape)} and {name}.scales {tuple(s.shape)} do not fit together: "
                f"{q.shape[0]} rows of {inputs} inputs{packed} in groups of {scheme.group_size} have scales of "
                f"shape ({q.shape[0]}, {inputs / scheme.group_size:g})"
            )


def _linears_in(shard: Mapping[str, torch.Tensor], patterns: frozenset[str]) -> list[str]:
    """The linear layers P (of `patterns`) whose P.qweight `shard` holds, in file order."""
    names = (key[: -len(".qweight")] for key in shard if key.endswith(".qweight"))
    return [name for name in names if _is_linear(name, patterns)]


def _float_shaped(
    shard: Mapping[str, torch.Tensor], scheme: Scheme, patterns: frozenset[str]
) -> checkpoint.StandInShard:
    """One quantized shard (checked by ``_check_quantized_shard``) as meta tensors of the float weights it stands
    for: P.qweight and P.scales become P.weight for every linear layer P (of `patterns`)."""
    linears = set(_linears_in(shard, patterns))
    shaped = {}
    for key, t in shard.items():
        name, _, kind = key.rpartition(".")
        if name in linears and kind == "qweight":
            cols = t.shape[1] * (2 if scheme.mode == "int4" else 1)
            shaped[f"{name}.weight"] = torch.empty(t.shape[0], cols, device="meta")
        elif not (name in linears and kind == "scales"):
            shaped[key] = torch.empty(t.shape, dtype=t.dtype, device="meta")

    def stored_as(key: str) -> str:
        name, _, kind = key.rpartition(".")
        return f"{name}.qweight and {name}.scales" if kind == "weight" and _is_linear(name, patterns) else key

    return checkpoint.StandInShard(shaped, stored_as)


def _open_checked(
    paths: Sequence[Path], scheme: Scheme, model_cls: type
) -> tuple[list[dict[str, torch.Tensor]], list[checkpoint.StandInShard], Layout]:
    """The shards of a quantized checkpoint (memory-mapped), their float stand-ins, and the layout they were cut
    in, once each file is checked (``_check_quantized_shard``), and the shards against each other in the names
    they hold (the same keys, shapes that fit, no shard a copy of another)."""
    patterns = _linear_patterns(model_cls)
    shards = [_load_quantized_shard(p) for p in paths]
    for path, shard in zip(paths, shards):
        _check_quantized_shard(path, shard, scheme, patterns)
    stand_ins = [_float_shaped(shard, scheme, patterns) for shard in shards]
    written = quantized_layout(Layout.for_shards(stand_ins, model_cls), _linears_in(shards[0], patterns), scheme)
    written.check_shards_agree(paths, shards)
    return shards, stand_ins, written


def float_shaped_shards(
    paths: Sequence[Path], scheme: Scheme, model_cls: type = Transformer
) -> list[checkpoint.StandInShard]:
    """The shards of a quantized checkpoint as meta tensors of the float weights they stand for (P.qweight and
    P.scales become P.weight), so that ``checkpoint.fit_params_to_shards`` checks them as any checkpoint, with
    errors that name the keys the files hold. Each file is checked first (``_open_checked``)."""
    return _open_checked(paths, scheme, model_cls)[1]


def _open_quantized_shards(
    paths: Sequence[Path], scheme: Scheme, expected: Layout, model_cls: type
) -> tuple[Layout, list[dict[str, torch.Tensor]]]:
    """The layout a quantized checkpoint's shards were cut in, and the shards (memory-mapped), once checked
    (``_open_checked``) and checked against `expected` (a ``quantized_layout`` with full shapes): every key and
    shape."""
    shards, _, written = _open_checked(paths, scheme, model_cls)
    checkpoint.check_state_dict(written.merged_shapes(shards), expected.shapes, repr(str(paths[0].parent)))
    return written, shards


def load_weights(
    model: nn.Module,
    shard_paths: Sequence[Path],
    rank: int,
    world_size: int,
    device: torch.device,
    dtype: torch.dtype,
    scheme: Scheme,
    prequantized: bool = False,
) -> None:
    """``checkpoint.load_weights`` for a quantized model: swap the linear layers for QuantizedLinears, then give
    them rank `rank`'s quantized slice, either quantized here from a float checkpoint one tensor at a time, or
    read from a quantized checkpoint (`prequantized`). Every key and shape is checked, as for float loading.

    From a float checkpoint, the shards are mapped afresh for each layer and no float tensor outlives its step
    (the unquantized ones are copied), so the pages of the float weights leave the process as it goes: memory
    stays near the quantized model's size. A quantized checkpoint's tensors are the mapped file itself, as
    float checkpoints' are.
    """
    layout = Layout.from_model(model, world_size)  # the float layout, before the swap
    checkpoint.release_parameters(model)
    linears = _swap_for_empty(model, scheme, world_size)
    weight_of = {f"{name}.weight": name for name in linears}

    if prequantized:
        model_layout = quantized_layout(layout, linears, scheme)
        written, shards = _open_quantized_shards(shard_paths, scheme, model_layout, type(model))
    else:

        def open_shards() -> list[dict[str, torch.Tensor]]:
            return [checkpoint.load_shard(p) for p in shard_paths]

        model_layout, shards = layout, open_shards()
        written = Layout.for_shards(shards, type(model))  # how they were cut (the embedding may differ)
        written.check_shards_agree(shard_paths, shards)
        checkpoint.check_state_dict(written.merged_shapes(shards), layout.shapes, repr(str(shard_paths[0].parent)))

    def rank_slice(shards: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
        return model_layout.slice_from(written, shards, key, rank, world_size)

    state: dict[str, torch.Tensor] = {}
    layer = None
    for key in [k for k in shards[0] if k not in checkpoint.IGNORED_KEYS]:
        match = _LAYER.match(key)
        if not prequantized and match and match.group(1) != layer:
            layer = match.group(1)
            shards = open_shards()  # fresh mappings: the pages of the layers done leave with the old ones
        if key in weight_of:  # a float linear weight: quantize this rank's slice
            name, w = weight_of[key], rank_slice(shards, key)
            try:
                q = quantize(w, scheme, repr(key))
            except ValueError:
                checkpoint.check_finite(key, w, shard_paths, shards)  # names the file if it holds inf or NaN
                raise
            state[f"{name}.qweight"], state[f"{name}.scales"] = (t.to(device) for t in q)
        elif prequantized and key.endswith((".qweight", ".scales")):
            state[key] = rank_slice(shards, key).to(device).contiguous()
            if key.endswith(".scales"):
                _check_scales(key, state[key], scheme, shard_paths, shards)
        else:
            t = rank_slice(shards, key)
            out = t.to(device=device, dtype=dtype).contiguous()
            if not prequantized and out.device.type == "cpu" and out.data_ptr() == t.data_ptr():
                out = out.clone()  # no view may keep a float shard's mapping alive
            checkpoint.check_finite(key, out, shard_paths, shards)
            state[key] = out
    del shards
    model.load_state_dict(state, strict=True, assign=True)


# The largest |q| of each mode: a scale s stands for weights up to this many times s.
_LARGEST_Q = {"int8": 127, "int4": 8}


def _scales_ok(scales: torch.Tensor, scheme: Scheme) -> bool:
    """Whether `scales` are as ``quantize`` writes them: finite, not so large that their weights overflow fp32, and
    for int8 (max|w| / 127) not negative; int4's (m / -8 for m the group's extreme weight) take either sign. Read
    from the smallest and largest scales (NaN propagates to both), in one pass."""
    if scales.numel() == 0:
        return True
    lo, hi = (float(x) for x in torch.aminmax(scales))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return False
    largest_weight = max(-lo, hi) * _LARGEST_Q[scheme.mode]
    return largest_weight <= torch.finfo(torch.float32).max and (scheme.mode == "int4" or lo >= 0)


def _check_scales(
    key: str, scales: torch.Tensor, scheme: Scheme, paths: Sequence[Path], shards: Sequence[Mapping[str, torch.Tensor]]
) -> None:
    """Raise a ValueError naming the files and the key where `scales` (a rank's slice of `key`, from `shards`, the
    files `paths`) hold a value ``quantize`` never writes (``_scales_ok``): a damaged file would load without a
    word and generate garbage with NaN log-probabilities."""
    if _scales_ok(scales, scheme):
        return
    flat = scales.flatten().float()
    bad = ~(flat.abs() * _LARGEST_Q[scheme.mode] <= torch.finfo(torch.float32).max)  # NaN compares False
    value = flat[(bad | (flat < 0)) if scheme.mode == "int8" else bad][0].item()
    files = [str(p) for p, s in zip(paths, shards) if key in s and not _scales_ok(s[key], scheme)]
    what = "inf, NaN, negative or" if scheme.mode == "int8" else "inf, NaN or"
    raise ValueError(
        f"{', '.join(map(repr, files))}: {key!r} holds the scale {value!r}, which {scheme.mode} quantization never "
        f"writes (scales are never {what} so large that their weights overflow): the file is damaged; re-download "
        "it or quantize the float checkpoint again"
    )


# ------------------------------------------------------------------------------------- quantized checkpoints


def _linear_names(args: ModelArgs, model_cls: type) -> list[str]:
    """The names of the linear layers of a model_cls(args), from its structure (built on the meta device)."""
    with _built_as_one_rank(), torch.device("meta"):
        meta = model_cls(dataclasses.replace(args, max_batch_size=1, max_seq_len=1))
    return list(linear_layers(meta))


@dataclass
class QuantizedCheckpoint(checkpoint.Checkpoint):
    """A checkpoint written by ``quantize_checkpoint``, opened and checked: `args` are those of the float model
    it stands for, and `layout` and `written` hold P.qweight and P.scales in place of every linear layer's
    P.weight (`linears`: the layers P)."""

    scheme: Scheme
    linears: list[str]

    def remap(self) -> list[dict[str, torch.Tensor]]:
        return [_load_quantized_shard(p) for p in self.paths]

    def check_split(self, n_shards: int) -> None:
        """As a float checkpoint's, and each shard must hold whole groups of the layers split by their inputs."""
        usable = []
        for n in range(1, self.args.kv_heads + 1):
            with contextlib.suppress(ValueError):
                super().check_split(n)
                usable += [n] if self._cut_layer(n) is None else []
        if n_shards in usable:
            return
        how = f"{str(self.folder)!r} is a quantized checkpoint ({self.scheme.mode}, group {self.scheme.group_size})"
        try:
            super().check_split(n_shards)
        except ValueError as e:
            raise ValueError(f"{e}; {how}, whose shards must also hold whole groups: of those, use {usable}") from None
        cut = self._cut_layer(n_shards)
        each = self._inputs_per_shard(cut, n_shards)
        raise ValueError(
            f"{how}, and {n_shards} shards would cut its groups: each would hold {each} inputs of {cut}; use a "
            f"model-parallel size in {usable}, or reshard the float checkpoint and quantize the result with "
            "python -m llama.quantize"
        )

    def _inputs_per_shard(self, name: str, n_shards: int) -> int:
        inputs = self.layout.shapes[f"{name}.scales"][1] * self.scheme.group_size
        return inputs // n_shards if self.layout.split_dim(f"{name}.scales") == 1 else inputs

    def _cut_layer(self, n_shards: int) -> Optional[str]:
        """The first linear layer whose groups n_shards shards would cut; None if none would."""
        g = self.scheme.group_size
        return next((name for name in self.linears if self._inputs_per_shard(name, n_shards) % g), None)


def open_quantized_checkpoint(ckpt_dir: str | Path, model_cls: type = Transformer) -> QuantizedCheckpoint:
    """``checkpoint.open_checkpoint`` for a checkpoint written by ``quantize_checkpoint``: its params.json, and
    every key, shape and dtype of its shards, checked as ``Llama.build`` checks them."""
    folder = Path(ckpt_dir)
    params = checkpoint.read_params(folder)
    float_params, scheme = split_params(params, None)
    if scheme is None:
        raise ValueError(f"{str(folder)!r} is not a quantized checkpoint: its params.json has no {PARAMS_KEY!r}")
    paths = checkpoint.find_shards(folder)
    as_float = float_shaped_shards(paths, scheme, model_cls)
    args, float_layout = checkpoint.fit_params_to_shards(float_params, paths, as_float, None, model_cls)
    linears = _linear_names(args, model_cls)
    layout = quantized_layout(float_layout, linears, scheme)
    written, shards = _open_quantized_shards(paths, scheme, layout, model_cls)
    return QuantizedCheckpoint(folder, params, args, paths, shards, layout, written, scheme, linears)


def quantize_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    mode: str,
    group_size: int = DEFAULT_GROUP_SIZE,
    on_shard_saved: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Write a quantized copy of the float checkpoint in ckpt_dir, with the same shards; return out_dir.

    Each shard quantizes its own slices (so group_size must divide every shard's inputs of each layer), one
    shard at a time from fresh memory maps, as ``llama.reshard`` does; params.json gets the scheme under
    ``"quantization"``, tokenizer.model is copied when the folder has one, and the folder is written atomically
    (``checkpoint.save_checkpoint``).
    """
    scheme = Scheme(mode, group_size)
    out_dir = Path(out_dir)
    checkpoint.check_out_dir(out_dir, ckpt_dir)
    if out_dir.exists():  # fail before reading anything; save_checkpoint checks again
        raise FileExistsError(f"{str(out_dir)!r} already exists; choose a new output folder or remove it")
    checkpoint.refuse_quantized(
        ckpt_dir, checkpoint.read_params(ckpt_dir), "quantize the float checkpoint it was made from instead"
    )
    model_cls = family_of_folder(ckpt_dir).model_cls
    ckpt = checkpoint.open_checkpoint(ckpt_dir, model_cls)
    weight_of = {f"{name}.weight": name for name in _linear_names(ckpt.args, model_cls)}
    n_shards = len(ckpt.paths)
    for key, name in weight_of.items():
        scheme.check_fits(name, ckpt.shards[0][key].shape[1], n_shards)

    def shards() -> Iterator[dict[str, torch.Tensor]]:
        for rank in range(n_shards):
            shard = ckpt.remap()[rank]  # fresh mappings: the pages read for one shard leave memory with it
            out = {}
            for key, tensor in shard.items():
                if key in weight_of:
                    name = f"{key!r} of {str(ckpt.paths[rank])!r}"
                    out[f"{weight_of[key]}.qweight"], out[f"{weight_of[key]}.scales"] = quantize(tensor, scheme, name)
                else:
                    out[key] = tensor
            yield out

    params = {**ckpt.params, PARAMS_KEY: scheme.to_params()}
    tokenizer = ckpt.folder / "tokenizer.model"
    extra = [tokenizer] if tokenizer.is_file() else []
    return checkpoint.save_checkpoint(out_dir, shards(), params, extra, on_shard_saved)


def main(ckpt_dir: str, out_dir: str, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Write a weight-only quantized copy of a Meta checkpoint folder, which ``Llama.build`` loads directly.

    Args:
        ckpt_dir: folder with params.json and consolidated.NN.pth (float weights, any number of shards).
        out_dir: new folder to write (must not exist): the same shards, with P.qweight and P.scales for every
            linear layer P, params.json with a "quantization" entry, and tokenizer.model if ckpt_dir has one.
        mode: "int8" or "int4" (see ``llama.quantize``).
        group_size: inputs that share one scale; must divide every shard's inputs of each layer.
    """
    from llama.reshard import ProgressLine

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    progress = ProgressLine("quantize", len(checkpoint.find_shards(ckpt_dir)))
    out = quantize_checkpoint(ckpt_dir, out_dir, mode, group_size, on_shard_saved=progress)
    logger.info("wrote %s (%s, group size %d)", out, mode, group_size)

