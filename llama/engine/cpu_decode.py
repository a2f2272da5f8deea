"""The fast path's decode step on CPUs as one C call (``csrc/decode_step.c``), for batches of 1 to 16 rows, each row at
its own position and cache slot where the caller says so (a continuous batch).

A compiled step (``llama.engine.fast.decode_step``) on two cores spends 3-6 ms a token between its products: ~150
calls (the C products and attention, inductor's small kernels), each with 10-25 us of Python and torch
dispatch. ``CpuDecoder`` runs the same step with the glue in C and the library's own kernels called directly,
so a token costs one call. The numbers are the compiled step's (same kernels, same roundings; the tests compare
them).

It serves a model whose every layer the kernels serve: quantized layers (``llama.quant``, CPU kernels built) and
bf16 float layers (``llama.kernels.cpu_gemv``'s kernel), with activations in bf16 or fp32, and the projections
stacked (``Transformer.stack_projections``), for up to ``KERNEL_MAX_ROWS`` rows (the kernels read each weight once
for all of them). ``applies`` says whether it does; elsewhere the compiled step runs. Each row is computed on its
own (see ``csrc/decode_step.c``): with bf16 float layers a row's logits are bitwise those of the same row alone.

``csrc/decode_step.c`` is the one second copy of the transformer block (``llama.model.transformer``), kept equal
to it by the tests. Everything it reads, it asks the model's modules for: each linear layer its
``kernel_operands()`` (and a quantized one its ``cpu_kernel()``), each norm its weight and eps, each attention its
``heads()``, each ``KVCache`` its shape, dtype and ``pointers()``; the RoPE tables are the model's own
(``rope_cos_sin`` of its ``freqs_cis``). The decoder reads the weights and the KV cache where they were when it was
built, and holds them.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch

from llama.kernels import cpu_attention, cpu_gemv
from llama.model import LinearOperands, StackedLinear, Transformer
from llama.quant.kernels import IO_FLAGS, KERNEL_MAX_ROWS
from llama.quant.linear import QuantizedLinear

SOURCE = Path(__file__).parent.parent / "csrc" / "decode_step.c"
SYMBOL = "llama_decode_step"


class Linear(ctypes.Structure):
    _fields_ = [("fn", ctypes.c_void_p), ("w", ctypes.c_void_p), ("s", ctypes.c_void_p)] + [
        (name, ctypes.c_int64) for name in ("n", "k", "g", "io")
    ]


class Layer(ctypes.Structure):
    _fields_ = [("attention_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p)]
    _fields_ += [(name, Linear) for name in ("qkv", "wo", "w13", "w2")]
    _fields_ += [("cache_k", ctypes.c_void_p), ("cache_v", ctypes.c_void_p)]


class Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("n_layers", "dim", "n_heads", "n_kv", "head_dim", "hidden")]
    _fields_ += [(name, ctypes.c_int64) for name in ("max_len", "max_batch", "bf16")]
    _fields_ += [("eps", ctypes.c_double), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p)]
    _fields_ += [("norm", ctypes.c_void_p), ("output", Linear), ("attend", ctypes.c_void_p)]
    _fields_ += [("layers", ctypes.POINTER(Layer))]


# SYMBOL's: model, h, rows, pos, n_pos, slots, logits
ARGTYPES = [ctypes.POINTER(Model), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
ARGTYPES += [ctypes.c_void_p]
_state: dict[str, object] = {}  # "fn": the loaded function, or None once building it has failed


def kernel() -> Optional[ctypes._CFuncPtr]:
    """The compiled step, built on first call; None where it cannot be built (warned once)."""
    return cpu_gemv.load_once(_state, SOURCE, SYMBOL, ARGTYPES, "the fast path runs its compiled step")


def _address(fn: ctypes._CFuncPtr) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def _linear(layer: torch.nn.Module, dtype: torch.dtype) -> Optional[tuple[ctypes._CFuncPtr, int, LinearOperands]]:
    """(C function, io flags, operands) of the kernel that computes a linear layer's product with activations of
    `dtype`: a quantized layer's own (``cpu_kernel``), or the bf16 GEMV; None where no kernel serves it or its
    tensors are not where and how the kernel reads them."""
    operands = layer.kernel_operands()
    w, s = operands.weight, operands.scales
    if w.device.type != "cpu" or not w.is_contiguous() or (s is not None and not s.is_contiguous()):
        return None
    if isinstance(layer, QuantizedLinear):
        fn = layer.cpu_kernel()
        return None if fn is None else (fn, IO_FLAGS[dtype], operands)
    if w.dtype != torch.bfloat16 or dtype != torch.bfloat16 or cpu_gemv.kernel() is None:
        return None
    return cpu_gemv.kernel(), 0, operands


def _products(model: Transformer, stacks: list[tuple[StackedLinear, StackedLinear]]) -> list[torch.nn.Module]:
    """The linear layers a step multiplies by, in the C step's order: per block the stacked wq|wk|wv, wo, the
    stacked w1|w3 and w2; then the output layer."""
    products = []
    for layer, (qkv, w13) in zip(model.layers, stacks):
        products += [qkv.layer, layer.attention.wo, w13.layer, layer.feed_forward.w2]
    return products + [model.output]


class CpuDecoder:
    """Decode steps of `model` (one new token per row, each row at its own position and cache slot, or all rows at
    one position in cache rows 0..bsz-1) by ``llama_decode_step``.

    Build it with ``CpuDecoder.build(model, stacks, cos, sin)``, which returns None where it does not apply. It
    computes with the layers' kernels as they were when built: after ``use_int8_inputs``, build another (the fast
    path does).
    """

    def __init__(self, model: Transformer, stacks: list, cos: torch.Tensor, sin: torch.Tensor,
                 fn: ctypes._CFuncPtr, max_rows: int):  # fmt: skip
        self.model, self.fn, self.max_rows = model, fn, max_rows
        self.dtype = model.dtype
        self.cos, self.sin = cos, sin
        self.struct = self._describe(stacks)

    @classmethod
    def build(
        cls, model: Transformer, stacks: Optional[list], cos: torch.Tensor, sin: torch.Tensor
    ) -> Optional[CpuDecoder]:
        """The decoder, or None unless the C step serves every part of `model` (see the module's docstring).

        stacks: the model's stacked projections (``Transformer.stack_projections``); cos, sin: its RoPE tables
        (``rope_cos_sin`` of its freqs_cis, on the CPU).
        """
        if stacks is None or not isinstance(model, Transformer) or model.device.type != "cpu":
            return None
        cache = model.layers[0].attention.kv_cache
        fn, attend = kernel(), cpu_attention.applies(cache.device, cache.dtype)  # bf16 or fp32 caches
        if fn is None or not attend:
            return None
        if not cls._laid_out_as_the_c_step_reads(model, cos, sin):  # also: caches in the model's dtype
            return None
        products = _products(model, stacks)
        kernels = [_linear(m, model.dtype) for m in products]
        if any(k is None for k in kernels):
            return None
        # as many rows as the bf16 GEMV takes for every float layer (quantized ones take KERNEL_MAX_ROWS)
        floats = [
            operands.weight for m, (_, _, operands) in zip(products, kernels) if not isinstance(m, QuantizedLinear)
        ]
        max_rows = max(r for r in range(1, KERNEL_MAX_ROWS + 1) if all(cpu_gemv.applies(r, w) for w in floats))
        return cls(model, stacks, cos, sin, fn, max_rows)

    @staticmethod
    def _laid_out_as_the_c_step_reads(model: Transformer, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        """Whether every KV cache and norm weight is a contiguous CPU tensor of the model's dtype with the shape
        the C step indexes, the norms share one eps, and the RoPE tables cover the cache's positions (the C step
        reads them through raw addresses: anything else would be read out of bounds)."""
        p, dtype = model.params, model.dtype
        n_heads, n_kv, head_dim = model.layers[0].attention.heads()
        cache_shape = (p.max_batch_size, p.max_seq_len, n_kv, head_dim)
        caches = [layer.attention.kv_cache for layer in model.layers]
        caches_ok = all(layer.attention.heads() == (n_heads, n_kv, head_dim) for layer in model.layers) and all(
            c.dtype == dtype and c.device.type == "cpu" and c.is_contiguous() and c.shape == cache_shape for c in caches
        )
        norms = [model.norm] + [n for layer in model.layers for n in (layer.attention_norm, layer.ffn_norm)]
        operands = [norm.kernel_operands() for norm in norms]  # (weight, eps)
        norms_ok = all(
            w.dtype == dtype and w.device.type == "cpu" and w.is_contiguous() and tuple(w.shape) == (p.dim,)
            and eps == operands[0][1] for w, eps in operands
        )  # fmt: skip
        tables_ok = all(
            t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
            and t.shape[0] >= p.max_seq_len and t.shape[1] == head_dim // 2 for t in (cos, sin)
        )  # fmt: skip
        return caches_ok and norms_ok and tables_ok

    def _describe(self, stacks: list) -> Model:
        """The ctypes description of the model: pointers into tensors this decoder holds (``held``), so that
        none of them can be freed while the C step may read it."""
        model, dtype = self.model, self.dtype
        final_norm, eps = model.norm.kernel_operands()
        self.held: list[object] = [self.cos, self.sin, final_norm]
        linears = []
        for layer in _products(model, stacks):
            fn, io, (w, s, n, k, g) = _linear(layer, dtype)
            self.held += [w, s]
            linears.append(Linear(_address(fn), w.data_ptr(), 0 if s is None else s.data_ptr(), n, k, g, io))
        layers = (Layer * len(model.layers))()
        for i, block in enumerate(model.layers):
            attention_norm, ffn_norm = block.attention_norm.kernel_operands()[0], block.ffn_norm.kernel_operands()[0]
            cache = block.attention.kv_cache
            self.held += [attention_norm, ffn_norm, *cache.buffers()]
            layers[i] = Layer(attention_norm.data_ptr(), ffn_norm.data_ptr(), *linears[4 * i : 4 * i + 4],
                              *cache.pointers())  # fmt: skip
        self.held.append(layers)
        n_heads, n_kv, head_dim = model.layers[0].attention.heads()
        hidden = linears[3].k  # w2's inputs
        p = model.params
        return Model(len(model.layers), p.dim, n_heads, n_kv, head_dim, hidden, p.max_seq_len, p.max_batch_size,
                     int(dtype == torch.bfloat16), eps, self.cos.data_ptr(), self.sin.data_ptr(),
                     final_norm.data_ptr(), linears[-1], _address(cpu_attention.kernel()), layers)  # fmt: skip

    def applies(self, bsz: int) -> bool:
        """Whether a step of bsz rows is this decoder's (more rows: the compiled step)."""
        return bsz <= self.max_rows

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, slots: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (bsz, 1, vocab) in fp32 for tokens (bsz, 1), written into the KV cache as they go.

        pos: a long CPU tensor of 1 element (every row at that position) or bsz elements (row b at pos[b]); slots:
        None (row b in the cache's row b) or bsz distinct cache rows (row b in slots[b]). Row b's RoPE takes its
        position, its keys and values go to cache[slot, position], and it attends over positions 0..position of its
        slot. Positions and slots are checked before anything is written (ValueError).
        """
        bsz = tokens.shape[0]
        limit = min(self.max_rows, self.model.params.max_batch_size)
        if tokens.shape != (bsz, 1) or not 1 <= bsz <= limit:
            raise ValueError(f"decode step: tokens {tuple(tokens.shape)} must be (bsz, 1) with bsz at most {limit} "
                             "(the KV cache's batch and the kernels' rows)")  # fmt: skip
        cpu_attention.check_rows("decode step", bsz, self.model.params.max_batch_size, pos, slots, torch.device("cpu"))
        if slots is not None and len(set(slots.tolist())) != bsz:  # two rows would write the same cache cells
            raise ValueError(f"decode step: slots {slots.tolist()} repeat a cache row; each row needs its own")
        pos = pos.contiguous()
        slots = None if slots is None else slots.contiguous()
        h = self.model.tok_embeddings(tokens.reshape(bsz)).contiguous()  # (bsz, dim)
        logits = torch.empty(bsz, self.struct.output.n, dtype=self.dtype)
        code = self.fn(ctypes.byref(self.struct), h.data_ptr(), bsz, pos.data_ptr(), pos.numel(),
                       None if slots is None else slots.data_ptr(), logits.data_ptr())  # fmt: skip
        if code in (2, 3):
            params = self.model.params
            raise cpu_attention.bad_rows("decode step", pos, slots, params.max_batch_size, params.max_seq_len)
        if code:
            raise MemoryError(f"decode step: a kernel ran out of memory (code {code})")
        return logits.float().view(bsz, 1, -1)
