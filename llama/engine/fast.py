"""The opt-in fast decoding path (``Llama.build(..., compile=True)``).

Decoding one token per step is bound by reading the weights, so the faithful path loses its time elsewhere:
the KV cache is sliced to a new length every step (a new shape every step, so nothing can be compiled or
captured), the host waits on the device every step, and hundreds of small kernels run eagerly. This path
keeps the math and removes that overhead:

- static shapes: the step writes its keys and values into the preallocated cache at the current position
  (``index_copy_``) and attends over the cache up to that position (on CPUs ``llama.kernels.cpu_attention``'s C
  kernel; elsewhere ``F.scaled_dot_product_attention`` over the whole cache, the later positions masked);
- RoPE with real cos/sin tables taken from the model's own complex ``freqs_cis`` (so any frequency scaling the
  model applies carries over; proven equal in the tests), and the KV cache written through the model's own
  ``Attention.update_cache``;
- ``torch.compile`` of the whole step (inductor on CPU; CUDA graphs on GPU via "reduce-overhead");
- on CPUs, wq/wk/wv and w1/w3 stacked into one product each (``fuse_projections``); bf16 weights with one
  row run through ``llama.kernels.cpu_gemv``'s C kernel, which streams them faster than torch's bf16 kernel does, and
  quantized layers (``llama.quantize``) call their C kernels directly;
- on CPUs where those kernels serve every layer, the whole step is one C call (``llama.engine.cpu_decode``): the
  same kernels and roundings without ~150 dispatched calls a token.

Prompts are prefilled eagerly: on GPUs by the model's own forward, on CPUs by ``prefill_forward``, which
keeps the reference's math but runs attention in fp32 and multiplies half-precision weights by torch's fp32
GEMM on fp32 copies of them, a chunk at a time (on CPUs without native bf16 instructions, torch's bf16
kernels are several times slower). The decoding loop in ``Llama._decode`` also keeps sampling on the
device and checks for EOS only every few steps. In fp32 the numbers are the faithful path's within rounding;
the tests compare logits and greedy tokens. Quantized layers on a CPU: so they are with the exact kernels
(``quantize.use_int8_inputs(model, False)``); the default kernels, which both paths call, round their inputs to
int8, and a last-bit difference can move one such rounding and a logit by ~1e-2. In half precision, the
attention here sums in fp32, which is more precise than the reference's half-precision matmuls. So where two
logits nearly tie (and with the int8-input kernels), greedy tokens can differ from the default path's.
"""

from __future__ import annotations

from typing import Callable, Optional

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F

from llama import quantize
from llama.engine.cpu_decode import CpuDecoder
from llama.kernels import cpu_attention, cpu_gemv
from llama.model import Transformer
from llama.quantize import QuantizedLinear


def rope_cos_sin(freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (end, head_dim // 2) of the rotations in a complex freqs_cis (end, head_dim // 2)."""
    return freqs_cis.real.contiguous(), freqs_cis.imag.contiguous()


def apply_rotary_emb_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2k], x[2k+1]) by the angles whose cos/sin are given, in fp32.

    x: (bsz, seqlen, n_heads, head_dim); cos, sin: (seqlen, head_dim // 2).
    """
    xf = x.float().unflatten(-1, (-1, 2))
    even, odd = xf[..., 0], xf[..., 1]  # (bsz, seqlen, n_heads, head_dim // 2)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def _linear(plain: Callable[..., torch.Tensor], quantized_on_cpu: bool) -> Callable[..., torch.Tensor]:
    """linear(x, module): a quantized layer (llama.quantize) computes its own product (by its CPU kernels when
    quantized_on_cpu); a float one is plain(x, weight)."""

    def linear(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        if isinstance(module, QuantizedLinear):
            return module.cpu_forward(x) if quantized_on_cpu else module(x)
        return plain(x, module.weight)

    return linear


def _block(
    h: torch.Tensor,
    layer: torch.nn.Module,
    fused: Optional[tuple[Stacked, Stacked]],
    linear: Callable[..., torch.Tensor],
    plain: Callable[..., torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    start_pos: int | torch.Tensor,
    attend: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """One transformer block, as ``TransformerBlock.forward`` computes it, for h (bsz, seqlen, dim) at positions
    start_pos... (cos, sin: their rotations): the block's keys and values go into its cache, and
    attend(xq, cache_k, cache_v) gives the attention output (bsz, seqlen, n_heads, head_dim). fused: the block's
    stacked wq/wk/wv and w1/w3, or None."""
    bsz, seqlen = h.shape[:2]
    attn, ff = layer.attention, layer.feed_forward
    x = layer.attention_norm(h)
    if fused is not None:
        xq, xk, xv = fused[0](x, plain)
    else:
        xq, xk, xv = linear(x, attn.wq), linear(x, attn.wk), linear(x, attn.wv)
    xq = xq.reshape(bsz, seqlen, attn.n_local_heads, attn.head_dim)
    xk = xk.reshape(bsz, seqlen, attn.n_local_kv_heads, attn.head_dim)
    xv = xv.reshape(bsz, seqlen, attn.n_local_kv_heads, attn.head_dim)
    xq, xk = apply_rotary_emb_real(xq, cos, sin), apply_rotary_emb_real(xk, cos, sin)
    cache_k, cache_v = attn.update_cache(xk, xv, start_pos)  # (bsz, max_len, n_kv_heads, head_dim)
    h = h + linear(attend(xq, cache_k, cache_v).reshape(bsz, seqlen, -1), attn.wo)
    x = layer.ffn_norm(h)
    gate, up = fused[1](x, plain) if fused is not None else (linear(x, ff.w1), linear(x, ff.w3))
    return h + linear(F.silu(gate) * up, ff.w2)


def decode_step(
    model: Transformer,
    tokens: torch.Tensor,
    pos: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    use_cpu_gemv: bool = False,
    quantized_on_cpu: bool = False,
    fused: Optional[list[tuple[Stacked, Stacked]]] = None,
    attention_on_cpu: bool = False,
) -> torch.Tensor:
    """Logits (bsz, 1, vocab) in fp32 for tokens (bsz, 1) at position pos (a 1-element long tensor).

    Every shape is fixed by (bsz, max_seq_len), so the step compiles once per batch size. use_cpu_gemv: run
    the linear layers through ``cpu_gemv.linear_bf16`` when bsz is 1 (the caller checks it applies).
    quantized_on_cpu: quantized layers call their CPU kernels directly (the caller checked they are built;
    checking inside the step would trace the kernels' one-time build, which breaks the graph). fused: per
    layer, wq/wk/wv and w1/w3 stacked (fuse_projections), so that each group is one product.
    attention_on_cpu: attention through ``llama.kernels.cpu_attention``'s C kernel (the caller checked it applies).
    """
    bsz = tokens.shape[0]
    plain = torch.ops.llama.linear_bf16 if use_cpu_gemv and bsz == 1 else F.linear
    linear = _linear(plain, quantized_on_cpu)
    # One query per head: llama::attend_one's C kernel on CPUs (it reads only the visible positions), else SDPA
    # over the whole cache with the later positions masked. Both sum and take the softmax in fp32 whatever the
    # input dtype, so in half precision this is more precise than the reference's half-precision matmuls, and
    # both read the cache as it is stored.
    attend_one = torch.ops.llama.attend_one if attention_on_cpu else cpu_attention.sdpa

    def attend(xq: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
        return attend_one(xq, cache_k, cache_v, pos)

    h = F.embedding(tokens, model.tok_embeddings.weight)  # (bsz, 1, dim)
    c, s = cos.index_select(0, pos), sin.index_select(0, pos)  # (1, head_dim // 2)
    for i, layer in enumerate(model.layers):
        h = _block(h, layer, None if fused is None else fused[i], linear, plain, c, s, pos, attend)
    return linear(model.norm(h), model.output).float()


def prefill_forward(
    model: Transformer,
    tokens: torch.Tensor,
    start_pos: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    quantized_on_cpu: bool = False,
    fused: Optional[list[tuple[Stacked, Stacked]]] = None,
) -> torch.Tensor:
    """Logits (bsz, seqlen, vocab) in fp32 of tokens (bsz, seqlen) at positions start_pos...: the model's forward
    (``Transformer.forward``), with its KV cache written the same way, but computed as fast CPUs allow.

    The reference's math and roundings, except where half precision would be slow on CPUs without native bf16
    instructions: attention runs in fp32 (SDPA with the causal mask; more precise than the reference's
    half-precision matmuls, as the decode step's is), and on CPUs the products with half-precision weights run
    in fp32 on fp32 copies of the weights, a chunk of rows at a time (``cpu_gemv.linear_upcast``), rounded
    once to the model's dtype. Quantized layers prefill through their exact fp32 GEMM (``quantize.cpu_linear``).
    """
    bsz, seqlen = tokens.shape

    def plain(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16):
            return cpu_gemv.linear_upcast(x, weight)
        return F.linear(x, weight)

    linear = _linear(plain, quantized_on_cpu)
    end = start_pos + seqlen
    # query i (position start_pos + i) sees the cached positions up to its own
    visible = torch.ones(seqlen, end, dtype=torch.bool, device=tokens.device).tril(diagonal=start_pos)

    def attend(xq: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
        keys, values = cache_k[:, :end].float().transpose(1, 2), cache_v[:, :end].float().transpose(1, 2)
        out = F.scaled_dot_product_attention(xq.float().transpose(1, 2), keys, values, attn_mask=visible,
                                             enable_gqa=True)  # fmt: skip
        return out.transpose(1, 2).type_as(xq)

    h = F.embedding(tokens, model.tok_embeddings.weight)  # (bsz, seqlen, dim)
    c, s = cos[start_pos:end], sin[start_pos:end]
    for i, layer in enumerate(model.layers):
        h = _block(h, layer, None if fused is None else fused[i], linear, plain, c, s, start_pos, attend)
    return linear(model.norm(h), model.output).float()


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-D tensors concatenated along the rows: a view where they already lie one after another in one
    storage (a model stacked before, by another FastDecoder), else a new tensor."""
    first = tensors[0]
    offsets = [first.storage_offset() + sum(t.numel() for t in tensors[:i]) for i in range(len(tensors))]
    adjacent = all(t.is_contiguous() and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                   and t.storage_offset() == offset for t, offset in zip(tensors, offsets))  # fmt: skip
    if not adjacent:
        return torch.cat(tensors)
    rows = sum(t.shape[0] for t in tensors)
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(
        first.untyped_storage(), first.storage_offset(), (rows, first.shape[1])
    )


class Stacked:
    """Linear layers that read the same input (wq, wk, wv; or w1, w3), their weights stacked along the outputs,
    so that a decode step makes one product (one kernel call, each with torch's dispatch cost) for all of them.
    The layers' own weights become views into the stacked ones: nothing is held twice, and every other path
    computes what it computed before."""

    def __init__(self, parts: tuple[torch.nn.Module, ...]):
        self.parts = parts
        with torch.no_grad():
            if isinstance(parts[0], QuantizedLinear):
                self.qweight, self.scales = _stack([p.qweight for p in parts]), _stack([p.scales for p in parts])
                self.sizes = [p.out_features for p in parts]
                for p, q, s in zip(parts, self.qweight.split(self.sizes), self.scales.split(self.sizes)):
                    p.qweight, p.scales = q, s
            else:
                self.weight = _stack([p.weight for p in parts])
                self.sizes = [p.weight.shape[0] for p in parts]
                for p, w in zip(parts, self.weight.split(self.sizes)):
                    p.weight = torch.nn.Parameter(w, requires_grad=p.weight.requires_grad)

    @staticmethod
    def applies(parts: tuple[torch.nn.Module, ...]) -> bool:
        """Whether the layers stack: all quantized alike (the scheme, the int8-input switch) or all float with one
        dtype, and one input size."""
        first = parts[0]
        if isinstance(first, QuantizedLinear):
            return all(isinstance(p, QuantizedLinear) and p.scheme == first.scheme and p.int8_x == first.int8_x
                       and p.in_features == first.in_features for p in parts)  # fmt: skip
        weights = [getattr(p, "weight", None) for p in parts]
        return all(isinstance(w, torch.Tensor) and w.ndim == 2 and not isinstance(p, QuantizedLinear)
                   and w.dtype == weights[0].dtype and w.shape[1] == weights[0].shape[1]
                   for p, w in zip(parts, weights))  # fmt: skip

    def __call__(self, x: torch.Tensor, plain: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Each layer's output for x; plain(x, weight) multiplies float weights. Quantized layers call their CPU
        kernels (the caller checked they are built), with the first layer's int8-input switch read now."""
        first = self.parts[0]
        if isinstance(first, QuantizedLinear):
            y = quantize.cpu_linear(x, self.qweight, self.scales, first.scheme, first.int8_x)
        else:
            y = plain(x, self.weight)
        return y.split(self.sizes, dim=-1)


def fuse_projections(model: Transformer) -> Optional[list[tuple[Stacked, Stacked]]]:
    """Per layer, wq/wk/wv and w1/w3 as Stacked products (65 calls a CPU decode step instead of 113). None
    unless every group stacks."""
    groups = [((layer.attention.wq, layer.attention.wk, layer.attention.wv), (layer.feed_forward.w1,
              layer.feed_forward.w3)) for layer in model.layers]  # fmt: skip
    if not all(Stacked.applies(parts) for pair in groups for parts in pair):
        return None
    return [(Stacked(qkv), Stacked(w13)) for qkv, w13 in groups]


class FastDecoder:
    """Runs decode steps (one new token per row) of `model` on the static-shape path, compiled if asked."""

    # The fast loop asks the device whether every row has ended only this often.
    eos_check_every = 16

    def __init__(
        self, model: Transformer, compile: bool = True, use_cpu_gemv: bool = True, use_cpu_attention: bool = True,
        use_cpu_step: bool = True,
    ):  # fmt: skip
        if fs_init.model_parallel_is_initialized() and fs_init.get_model_parallel_world_size() != 1:
            raise ValueError(
                "the fast path (compile=True) runs with one model-parallel rank; load the checkpoint on one "
                "process (any shard count works) or use the default path under torchrun"
            )
        self.model = model
        device = model.tok_embeddings.weight.device
        # The model's own rotations, whatever frequencies it uses (Llama 3.1's scaled ones, say).
        self.cos, self.sin = rope_cos_sin(model.freqs_cis.to(device))
        # All weights share one dtype and device. use_cpu_gemv=False and use_cpu_attention=False keep torch's
        # kernels (the benchmark and the tests compare both).
        weight = getattr(model.output, "weight", None)  # a quantized output layer (llama.quantize) has none
        self.use_cpu_gemv = use_cpu_gemv and weight is not None and cpu_gemv.applies(1, weight)
        self.quantized_on_cpu = weight is None and device.type == "cpu" and quantize.available()
        # Stacked products on CPUs, where each call costs torch's dispatch (measured); on GPUs CUDA graphs do.
        on_cpu = device.type == "cpu" and (self.quantized_on_cpu or weight is not None)
        self.fused = fuse_projections(model) if on_cpu else None
        self.attention_on_cpu = use_cpu_attention and cpu_attention.applies(model.layers[0].attention.cache_k)
        # The whole step as one C call where its kernels serve every layer (llama.engine.cpu_decode); it uses both the
        # GEMV and the attention kernels, so it is off where either is.
        self.cpu_step = None
        if use_cpu_step and use_cpu_gemv and self.attention_on_cpu:
            self.cpu_step = CpuDecoder.build(model, self.fused)
        self.step: Callable[..., torch.Tensor] = decode_step
        if compile:
            mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs on GPU
            self.step = torch.compile(decode_step, dynamic=False, mode=mode)

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Logits (bsz, seqlen, vocab) in fp32 of a prompt chunk tokens (bsz, seqlen) at start_pos, written into
        the KV cache: ``prefill_forward`` on CPUs, the model's own forward on GPUs."""
        if start_pos < 0 or start_pos + tokens.shape[1] > self.model.params.max_seq_len:
            raise ValueError(f"prefill of {tokens.shape[1]} tokens at position {start_pos}: past the KV cache of "
                             f"{self.model.params.max_seq_len} positions")  # fmt: skip
        if tokens.shape[0] > self.model.params.max_batch_size:
            raise ValueError(f"prefill of {tokens.shape[0]} rows: the KV cache holds "
                             f"{self.model.params.max_batch_size}")  # fmt: skip
        if tokens.device.type != "cpu":  # GPUs run the reference's half-precision matmuls fast: its forward
            return self.model.forward(tokens, start_pos)
        return prefill_forward(self.model, tokens, start_pos, self.cos, self.sin, self.quantized_on_cpu, self.fused)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        pos = torch.tensor([start_pos], dtype=torch.long, device=tokens.device)
        if self.cpu_step is not None and self.cpu_step.applies(tokens.shape[0]):
            return self.cpu_step(tokens, pos)
        # A column view of the token grid carries the grid's stride, which would force a recompile for every grid
        # width; a plain clone keeps that stride when bsz is 1, so ask for fresh contiguous strides.
        tokens = tokens.clone(memory_format=torch.contiguous_format)
        return self.step(self.model, tokens, pos, self.cos, self.sin, self.use_cpu_gemv, self.quantized_on_cpu,
                         self.fused, self.attention_on_cpu)  # fmt: skip
