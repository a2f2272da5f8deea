"""The fast path's decode step on CPUs as one C call (``csrc/decode_step.c``), for batch-1 (and small-batch
quantized) decoding.

A compiled step (``llama.engine.fast.decode_step``) on two cores spends 3-6 ms a token between its products: ~150
calls (the C products and attention, inductor's small kernels), each with 10-25 us of Python and torch
dispatch. ``CpuDecoder`` runs the same step with the glue in C and the library's own kernels called directly,
so a token costs one call. The numbers are the compiled step's (same kernels, same roundings; the tests compare
them).

It serves a model whose every layer the kernels serve: quantized layers (``llama.quantize``, CPU kernels
built) and bf16 float layers (``llama.kernels.cpu_gemv``'s kernel, one row only, where it is the faster choice), with
activations in bf16 or fp32, and the projections stacked (``llama.engine.fast.fuse_projections``). ``applies`` says
whether it does; elsewhere the compiled step runs. The decoder reads the weights and the KV cache where they
were when it was built, and holds them.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from llama import quantize
from llama.kernels import cpu_attention, cpu_gemv
from llama.model import Transformer
from llama.quantize import KERNEL_MAX_ROWS, QuantizedLinear

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
    _fields_ = [(name, ctypes.c_int64) for name in
                ("n_layers", "dim", "n_heads", "n_kv", "head_dim", "hidden", "max_len", "bf16")]  # fmt: skip
    _fields_ += [("eps", ctypes.c_double), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p)]
    _fields_ += [("norm", ctypes.c_void_p), ("output", Linear), ("attend", ctypes.c_void_p)]
    _fields_ += [("layers", ctypes.POINTER(Layer))]


ARGTYPES = [ctypes.POINTER(Model), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]  # SYMBOL's
_state: dict[str, object] = {}  # "fn": the loaded function, or None once building it has failed


def kernel() -> Optional[ctypes._CFuncPtr]:
    """The compiled step, built on first call; None where it cannot be built (warned once)."""
    return cpu_gemv.load_once(_state, SOURCE, SYMBOL, ARGTYPES, "the fast path runs its compiled step")


def _address(fn: ctypes._CFuncPtr) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def _product(module: torch.nn.Module, weight: torch.Tensor, scales: Optional[torch.Tensor], dtype: torch.dtype):
    """(C function, io flags) of the kernel for a layer's weights: quantized (with int8 inputs where the layer
    asks and the format allows) or bf16; None where no kernel serves it."""
    if isinstance(module, QuantizedLinear):
        fns = quantize.kernels()
        if fns is None or scales is None or scales.dtype != quantize.SCALE_DTYPE:
            return None
        fn = quantize.product_kernel(fns, module.scheme.mode, module.scheme.group_size, module.int8_x)
        return fn, quantize.IO_FLAGS[dtype]
    if weight.dtype != torch.bfloat16 or dtype != torch.bfloat16 or cpu_gemv.kernel() is None:
        return None
    return cpu_gemv.kernel(), 0


class CpuDecoder:
    """Decode steps of `model` (one new token per row, every row at one position) by ``llama_decode_step``.

    Build it with ``CpuDecoder.build(model, fused)``, which returns None where it does not apply.
    """

    def __init__(self, model: Transformer, fused: Sequence, fn: ctypes._CFuncPtr, max_rows: int):
        self.model, self.fn, self.max_rows = model, fn, max_rows
        self.dtype = model.tok_embeddings.weight.dtype
        freqs = model.freqs_cis.to("cpu")
        self.cos, self.sin = freqs.real.float().contiguous(), freqs.imag.float().contiguous()
        self.fused = fused
        # the layers whose int8-input switch (quantize.use_int8_inputs) picks their product's kernel
        self.switched = [m for m, _ in self._products(model, fused) if isinstance(m, QuantizedLinear)]
        self.switches = self._switches()
        self.struct = self._describe()

    @classmethod
    def build(cls, model: Transformer, fused: Optional[Sequence]) -> Optional[CpuDecoder]:
        """The decoder, or None unless the C step serves every part of `model` (see the module's docstring)."""
        weight = model.tok_embeddings.weight
        if fused is None or not isinstance(model, Transformer) or weight.device.type != "cpu":
            return None
        fn, attend = kernel(), cpu_attention.applies(model.layers[0].attention.cache_k)  # bf16 or fp32 caches
        if fn is None or not attend:
            return None
        if not cls._laid_out_as_the_c_step_reads(model, weight.dtype):  # also: caches in the model's dtype
            return None
        if any(cls._linear(m, s, weight.dtype) is None for m, s in cls._products(model, fused)):
            return None
        float_layers = any(not isinstance(m, QuantizedLinear) for m, _ in cls._products(model, fused))
        return cls(model, fused, fn, 1 if float_layers else KERNEL_MAX_ROWS)

    @staticmethod
    def _laid_out_as_the_c_step_reads(model: Transformer, dtype: torch.dtype) -> bool:
        """Whether every KV cache and norm weight is a contiguous tensor of the model's dtype with the shape the C
        step indexes (it reads them through raw addresses: anything else would be read out of bounds)."""
        p, first = model.params, model.layers[0].attention
        cache_shape = (p.max_batch_size, p.max_seq_len, first.n_local_kv_heads, first.head_dim)
        tensors = [(layer.attention.cache_k, cache_shape) for layer in model.layers]
        tensors += [(layer.attention.cache_v, cache_shape) for layer in model.layers]
        norms = [model.norm] + [n for layer in model.layers for n in (layer.attention_norm, layer.ffn_norm)]
        tensors += [(norm.weight, (p.dim,)) for norm in norms]
        freqs = model.freqs_cis
        return freqs.shape[0] >= p.max_seq_len and freqs.shape[1] == first.head_dim // 2 and all(
            t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous() and tuple(t.shape) == shape
            for t, shape in tensors
        )

    @staticmethod
    def _products(model: Transformer, fused: Sequence) -> list[tuple[torch.nn.Module, Optional[object]]]:
        """(layer, its Stacked or None) of every product of a step, in the C step's order."""
        products = []
        for layer, (qkv, w13) in zip(model.layers, fused):
            products += [(qkv.parts[0], qkv), (layer.attention.wo, None), (w13.parts[0], w13)]
            products.append((layer.feed_forward.w2, None))
        return products + [(model.output, None)]

    @staticmethod
    def _linear(module: torch.nn.Module, stacked, dtype: torch.dtype) -> Optional[tuple]:
        """(the kernel's function and io flags, weight, scales, n, k, group size) for a layer or a stack of
        layers; None if no kernel serves it."""
        quantized = isinstance(module, QuantizedLinear)
        if stacked is not None:
            w, s = (stacked.qweight, stacked.scales) if quantized else (stacked.weight, None)
        else:
            w, s = (module.qweight, module.scales) if quantized else (getattr(module, "weight", None), None)
        if not isinstance(w, torch.Tensor) or w.device.type != "cpu" or not w.is_contiguous():
            return None
        product = _product(module, w, s, dtype)
        if product is None or (s is not None and not s.is_contiguous()):
            return None
        k = module.in_features if quantized else w.shape[1]
        g = module.scheme.group_size if quantized else 0
        return product, w, s, w.shape[0], k, g

    def _switches(self) -> list[bool]:
        """The layers' int8-input switches (``quantize.use_int8_inputs``): the products follow them."""
        return [m.int8_x for m in self.switched]

    def _describe(self) -> Model:
        """The ctypes description of the model: pointers into tensors this decoder holds (``held``), so that
        none of them can be freed while the C step may read it."""
        model, dtype = self.model, self.dtype
        self.held: list[object] = [self.cos, self.sin, model.norm.weight]
        linears = []
        for module, stacked in self._products(model, self.fused):
            (fn, io), w, s, n, k, g = self._linear(module, stacked, dtype)
            self.held += [w, s]
            linears.append(Linear(_address(fn), w.data_ptr(), 0 if s is None else s.data_ptr(), n, k, g, io))
        layers = (Layer * len(model.layers))()
        for i, layer in enumerate(model.layers):
            norms, attn = (layer.attention_norm.weight, layer.ffn_norm.weight), layer.attention
            self.held += [*norms, attn.cache_k, attn.cache_v]
            layers[i] = Layer(norms[0].data_ptr(), norms[1].data_ptr(), *linears[4 * i : 4 * i + 4],
                              attn.cache_k.data_ptr(), attn.cache_v.data_ptr())  # fmt: skip
        self.held.append(layers)
        first = model.layers[0]
        attn, hidden = first.attention, linears[3].k  # w2's inputs
        return Model(len(model.layers), model.params.dim, attn.n_local_heads, attn.n_local_kv_heads, attn.head_dim,
                     hidden, model.params.max_seq_len, int(dtype == torch.bfloat16), first.attention_norm.eps,
                     self.cos.data_ptr(), self.sin.data_ptr(), model.norm.weight.data_ptr(), linears[-1],
                     _address(cpu_attention.kernel()), layers)  # fmt: skip

    def applies(self, bsz: int) -> bool:
        """Whether a step of bsz rows is this decoder's (more rows: the compiled step)."""
        return bsz <= self.max_rows

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits (bsz, 1, vocab) in fp32 for tokens (bsz, 1) at position pos (a 1-element long tensor)."""
        switches = self._switches()
        if switches != self.switches:  # use_int8_inputs was called: other products
            self.switches, self.struct = switches, self._describe()
        if pos.numel() != 1 or pos.dtype != torch.long or pos.device.type != "cpu":
            raise TypeError(f"decode step: pos must be a 1-element long CPU tensor, got {pos.dtype} "
                            f"{tuple(pos.shape)} on {pos.device}")  # fmt: skip
        bsz = tokens.shape[0]
        if tokens.shape != (bsz, 1) or not 1 <= bsz <= min(self.max_rows, self.model.params.max_batch_size):
            raise ValueError(f"decode step: tokens {tuple(tokens.shape)} must be (bsz, 1) with bsz at most "
                             f"{min(self.max_rows, self.model.params.max_batch_size)} (the KV cache's batch and "
                             "the kernels' rows)")  # fmt: skip
        h = F.embedding(tokens.reshape(bsz), self.model.tok_embeddings.weight).contiguous()  # (bsz, dim)
        logits = torch.empty(bsz, self.struct.output.n, dtype=self.dtype)
        code = self.fn(ctypes.byref(self.struct), h.data_ptr(), bsz, pos.data_ptr(), logits.data_ptr())
        if code == 2:
            raise ValueError(f"decode step at position {int(pos)}: outside the KV cache of "
                             f"{self.model.params.max_seq_len} positions")  # fmt: skip
        if code:
            raise MemoryError(f"decode step: a kernel ran out of memory (code {code})")
        return logits.float().view(bsz, 1, -1)
