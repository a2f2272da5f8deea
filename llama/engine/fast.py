"""The opt-in fast decoding path (``Llama.build(..., compile=True)``).

Decoding one token per step is bound by reading the weights, so the faithful path loses its time elsewhere:
the KV cache is sliced to a new length every step (a new shape every step, so nothing can be compiled or
captured), the host waits on the device every step, and hundreds of small kernels run eagerly. This path
keeps the math and removes that overhead. It runs the model's own blocks (``Transformer.logits``), with ops of its
own (``FastOps``, a ``BlockOps``) for what it computes differently:

- static shapes: the step writes its keys and values through the model's ``KVCache.update`` at the current
  position, given as a tensor, and attends over the whole cache up to that position (on CPUs
  ``llama.kernels.cpu_attention``'s C kernel; elsewhere ``F.scaled_dot_product_attention`` over the whole cache, the
  later positions masked);
- RoPE with real cos/sin tables taken from the model's own complex ``freqs_cis`` (so any frequency scaling the
  model applies carries over; proven equal in the tests);
- ``torch.compile`` of the whole step (inductor on CPU; CUDA graphs on GPU via "reduce-overhead");
- on CPUs, wq/wk/wv and w1/w3 stacked into one product each (``Transformer.stack_projections``); bf16 weights with
  one row run through ``llama.kernels.cpu_gemv``'s C kernel, which streams them faster than torch's bf16 kernel
  does, and quantized layers (``llama.quant``) call their C kernels directly;
- on CPUs where those kernels serve every layer, the whole step is one C call (``llama.engine.cpu_decode``): the
  same kernels and roundings without ~150 dispatched calls a token.

Prompts are prefilled eagerly: on GPUs by the model's own forward, on CPUs by ``prefill_forward``, which
keeps the reference's math but runs attention in fp32 and multiplies half-precision weights by torch's fp32
GEMM on fp32 copies of them, a chunk at a time (on CPUs without native bf16 instructions, torch's bf16
kernels are several times slower; on CPUs with them, bf16 weights use torch's bf16 GEMM). The decoding loop
(``llama.engine.loop``) also keeps sampling on the device and checks for EOS only every few steps. In fp32 the
numbers are the faithful path's within rounding; the tests compare logits and greedy tokens. Quantized layers
on a CPU: so they are with the exact kernels (``use_int8_inputs(model, False)``); the default kernels, which
both paths call, round their inputs to int8, and a last-bit difference can move one such rounding and a logit
by ~1e-2. In half precision, the attention here sums in fp32, which is more precise than the reference's
half-precision matmuls. So where two logits nearly tie (and with the int8-input kernels), greedy tokens can
differ from the default path's.
"""

from __future__ import annotations

from typing import Callable, Optional

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F

from llama.engine.cpu_decode import CpuDecoder
from llama.kernels import cpu_attention, cpu_gemv, pages
from llama.model import BlockOps, CacheRows, StackedLinear, Transformer, apply_rotary_emb_real, rope_cos_sin
from llama.model.transformer import Rotations
from llama.quant import kernels as quant_kernels
from llama.quant.linear import QuantizedLinear

Stacks = list[tuple[StackedLinear, StackedLinear]]  # per block, wq|wk|wv and w1|w3 (Transformer.stack_projections)


class FastOps(BlockOps):
    """How the fast path computes the model's blocks (``BlockOps``): products by a kernel of its choosing, with the
    stacked projections where it has them; RoPE by real cos/sin tables; attention by a given function.

    matmul(x, weight): the float layers' products (``F.linear``, or a C kernel). attend(xq, keys, values, mask):
    the attention, with the mask the caller hands the blocks. quantized_on_cpu: quantized layers call their CPU
    kernels directly (the caller checked they are built: checking inside a compiled step would trace the
    kernels' one-time build, which breaks the graph). stacks: the stacked projections, or None.
    """

    def __init__(self, matmul: Callable[..., torch.Tensor], attend: Callable[..., torch.Tensor],
                 quantized_on_cpu: bool, stacks: Optional[Stacks]):  # fmt: skip
        self.matmul, self.attention, self.quantized_on_cpu = matmul, attend, quantized_on_cpu
        # The stacked layer of each group of layers, as the blocks hand the group to linears()
        self.stacks = {} if stacks is None else {s.parts: s for pair in stacks for s in pair}

    def linear(self, x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
        if isinstance(layer, QuantizedLinear):  # it computes its own products
            return layer.cpu_forward(x) if self.quantized_on_cpu else layer(x)
        return layer.product(x, self.matmul)

    def linears(self, x: torch.Tensor, *layers: torch.nn.Module) -> tuple[torch.Tensor, ...]:
        stacked = self.stacks.get(layers)
        if stacked is None:
            return tuple(self.linear(x, layer) for layer in layers)
        return stacked.split(self.linear(x, stacked.layer))  # one product for the group

    def rotate(self, xq: torch.Tensor, xk: torch.Tensor, freqs_cis: Rotations) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = freqs_cis  # of the positions: (seqlen, head_dim // 2) each
        return apply_rotary_emb_real(xq, cos, sin), apply_rotary_emb_real(xk, cos, sin)

    def attend(
        self, xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        return self.attention(xq, keys, values, mask)


def decode_step(
    model: Transformer, tokens: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ops: FastOps
) -> torch.Tensor:
    """Logits (bsz, 1, vocab) in fp32 for tokens (bsz, 1) at position pos (a 1-element long tensor), by the model's
    blocks computed as ops says, whose attend takes the position as its mask (``attend_one``).

    Every shape is fixed by (bsz, max_seq_len), so the step compiles once per batch size: the keys and values are
    written at pos, and attention reads the whole cache, hiding the positions after pos. (cos, sin): the model's
    RoPE tables (``rope_cos_sin``).
    """
    rotations = cos.index_select(0, pos), sin.index_select(0, pos)  # (1, head_dim // 2) each
    return model.logits(model.tok_embeddings(tokens), pos, rotations, pos, ops)


def decode_rows_step(
    model: Transformer, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor,
    sin: torch.Tensor, ops: FastOps,
) -> torch.Tensor:  # fmt: skip
    """``decode_step`` for rows that each sit in their own cache slot at their own position (the continuous-batching
    engine's rows): row i's token at pos[i] of slot slots[i]. The cache is written at those cells and handed whole
    to ops' attention (``attend_rows``), which reads each row's slot up to its position."""
    rotations = cos[pos][:, None], sin[pos][:, None]  # (bsz, 1, head_dim // 2) each: a row's own position
    rows = CacheRows(slots, pos)
    return model.logits(model.tok_embeddings(tokens), rows, rotations, rows, ops)


def attend_rows(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, rows: CacheRows) -> torch.Tensor:
    """One query per row over its own slot of the whole cache, up to its own position (``llama::attend_one``)."""
    return torch.ops.llama.attend_one(q, cache_k, cache_v, rows.positions, rows.slots)


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where torch's bf16 GEMM (oneDNN) is the
    fast one: on a Zen 4, 3x faster than the fp32 GEMM on upcast copies for a 128-row prefill product (2048 ->
    5632: 7.7 ms against 24 ms, benchmarks/RESULTS.md)."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                       "_is_amx_tile_supported"))  # fmt: skip


NATIVE_BF16 = native_bf16()


def prefill_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The prefill's float products: on CPUs, half-precision weights multiply in fp32 on fp32 copies of them, a
    chunk of rows at a time (``cpu_gemv.linear_upcast``), rounded once to the model's dtype; except bf16 weights on
    CPUs that multiply bf16 natively, where torch's bf16 GEMM (the reference's product) is faster."""
    if weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16):
        if weight.dtype == torch.bfloat16 and NATIVE_BF16:
            return F.linear(x, weight)
        return cpu_gemv.linear_upcast(x, weight)
    return F.linear(x, weight)


def prefill_attention(
    xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """The reference's attention in fp32 (SDPA), query i seeing the positions where visible[i] is true."""
    keys, values = keys.float().transpose(1, 2), values.float().transpose(1, 2)
    out = F.scaled_dot_product_attention(xq.float().transpose(1, 2), keys, values, attn_mask=visible,
                                         enable_gqa=True)  # fmt: skip
    return out.transpose(1, 2).type_as(xq)


def prefill_forward(
    model: Transformer, tokens: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor, ops: FastOps,
    slot: Optional[int] = None, last_only: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Logits (bsz, seqlen, vocab) in fp32 of tokens (bsz, seqlen) at positions start_pos...: the model's forward
    (``Transformer.forward``), with its KV cache written the same way, but computed as fast CPUs allow. last_only:
    the last position's alone (bsz, 1, vocab), which is all that sampling the next token needs.

    ops: products by ``prefill_matmul`` and attention by ``prefill_attention`` (see ``FastDecoder``): the
    reference's math and roundings, except where half precision would be slow on CPUs without native bf16
    instructions: attention runs in fp32 (more precise than the reference's half-precision matmuls, as the decode
    step's is), and products with half-precision weights in fp32. Quantized layers prefill through their kernels
    (with int8 inputs, the default: the panel product; in the exact mode, torch's fp32 GEMM).

    slot: the cache slot of a single row (the continuous-batching engine's), instead of rows 0..bsz-1.
    """
    seqlen = tokens.shape[1]
    end = start_pos + seqlen
    # query i (position start_pos + i) sees the cached positions up to its own
    visible = torch.ones(seqlen, end, dtype=torch.bool, device=tokens.device).tril(diagonal=start_pos)
    rotations = cos[start_pos:end], sin[start_pos:end]
    where: int | CacheRows = start_pos
    if slot is not None:
        at = torch.tensor([start_pos], dtype=torch.long, device=tokens.device)
        where = CacheRows(torch.tensor([slot], dtype=torch.long, device=tokens.device), at, end)
    return model.logits(model.tok_embeddings(tokens), where, rotations, visible, ops, last_only)


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
        device = model.device
        # The model's own rotations, whatever frequencies it uses (Llama 3.1's scaled ones, say).
        self.cos, self.sin = rope_cos_sin(model.freqs_cis.to(device))
        # All weights share one dtype and device. use_cpu_gemv=False and use_cpu_attention=False keep torch's
        # kernels (the benchmark and the tests compare both).
        quantized = isinstance(model.output, QuantizedLinear)  # then every linear layer is (llama.quant)
        operands = None if quantized else model.output.kernel_operands()
        self.use_cpu_gemv = use_cpu_gemv and operands is not None and cpu_gemv.applies(1, operands.weight)
        self.quantized_on_cpu = quantized and device.type == "cpu" and quant_kernels.available()
        # Stacked products on CPUs, where each call costs torch's dispatch (measured); on GPUs CUDA graphs do.
        self.stacked = device.type == "cpu" and (self.quantized_on_cpu or not quantized)
        cache = model.layers[0].attention.kv_cache
        self.attention_on_cpu = use_cpu_attention and cpu_attention.applies(cache.device, cache.dtype)
        # The whole step as one C call where its kernels serve every layer (llama.engine.cpu_decode); it uses both the
        # GEMV and the attention kernels, so it is off where either is.
        self.use_cpu_step = use_cpu_step and use_cpu_gemv and self.attention_on_cpu
        # The quantized layers, whose int8-input switches (use_int8_inputs) pick their kernels
        self.switched = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        # Every step streams the weights (and reads the KV cache): on CPUs, in 2 MB pages where the system gives
        # them (llama.kernels.pages; the stacked projections are made there too), the same values.
        self.huge_page_bytes = pages.move_to_huge_pages(model) if device.type == "cpu" else 0
        self._stack_projections()
        self.step: Callable[..., torch.Tensor] = decode_step
        self.row_step: Callable[..., torch.Tensor] = decode_rows_step
        if compile:
            mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs on GPU
            self.step = torch.compile(decode_step, dynamic=False, mode=mode)
            # The engine's row counts vary step by step: torch's automatic dynamic shapes compile it once for one
            # row and once for any other count, rather than once per count.
            self.row_step = torch.compile(decode_rows_step, mode=mode)

    def _stack_projections(self) -> None:
        """Stack the model's projections (on CPUs), and make the ops and the C step that use them, with the
        quantized layers' kernels as their switches now pick them."""
        self.switches = [m.int8_x for m in self.switched]
        self.fused = self.model.stack_projections() if self.stacked else None
        # One query per row: llama::attend_one's C kernel on CPUs (it reads only the visible positions), else
        # SDPA over the whole cache with the later positions masked. Both sum and take the softmax in fp32 whatever
        # the input dtype, so in half precision this is more precise than the reference's half-precision
        # matmuls, and both read the cache as it is stored.
        attend_one = torch.ops.llama.attend_one if self.attention_on_cpu else cpu_attention.sdpa
        self.ops = FastOps(F.linear, attend_one, self.quantized_on_cpu, self.fused)
        # One row: bf16 products by cpu_gemv's kernel, where it applies (with more rows torch's kernels win)
        gemv = torch.ops.llama.linear_bf16 if self.use_cpu_gemv else F.linear
        self.one_row_ops = FastOps(gemv, attend_one, self.quantized_on_cpu, self.fused)
        self.prefill_ops = FastOps(prefill_matmul, prefill_attention, self.quantized_on_cpu, self.fused)
        # The engine's rows, each at its own slot and position (attend_rows; SDPA inside the operator off CPUs)
        self.row_ops = FastOps(F.linear, attend_rows, self.quantized_on_cpu, self.fused)
        self.one_row_row_ops = FastOps(gemv, attend_rows, self.quantized_on_cpu, self.fused)
        self.cpu_step = CpuDecoder.build(self.model, self.fused, self.cos, self.sin) if self.use_cpu_step else None

    @torch.inference_mode()
    def prefill(
        self, tokens: torch.Tensor, start_pos: int, slot: Optional[int] = None, last_only: bool = False
    ) -> torch.Tensor:
        """Logits (bsz, seqlen, vocab) in fp32 of a prompt chunk tokens (bsz, seqlen) at start_pos, written into
        the KV cache: ``prefill_forward`` on CPUs, the model's own forward on GPUs. slot: one row's chunk, written
        into that cache slot (the engine's) rather than row 0. last_only: the logits of the chunk's last position
        alone, (bsz, 1, vocab), saving the output layer's product for the others on CPUs."""
        if start_pos < 0 or start_pos + tokens.shape[1] > self.model.params.max_seq_len:
            raise ValueError(f"prefill of {tokens.shape[1]} tokens at position {start_pos}: past the KV cache of "
                             f"{self.model.params.max_seq_len} positions")  # fmt: skip
        if tokens.shape[0] > self.model.params.max_batch_size:
            raise ValueError(f"prefill of {tokens.shape[0]} rows: the KV cache holds "
                             f"{self.model.params.max_batch_size}")  # fmt: skip
        if slot is not None and (tokens.shape[0] != 1 or not 0 <= slot < self.model.params.max_batch_size):
            raise ValueError(f"prefill into slot {slot}: one row into one of the cache's "
                             f"{self.model.params.max_batch_size} slots, got {tokens.shape[0]} rows")  # fmt: skip
        if tokens.device.type != "cpu":  # GPUs run the reference's half-precision matmuls fast: its forward
            if slot is not None:
                logits = self.model.forward_rows(tokens, [slot], [start_pos])
            else:
                logits = self.model.forward(tokens, start_pos)
            return logits[:, -1:] if last_only else logits
        self._follow_switches()
        return prefill_forward(self.model, tokens, start_pos, self.cos, self.sin, self.prefill_ops, slot, last_only)

    @torch.inference_mode()
    def step_rows(self, tokens: torch.Tensor, slots: list[int], positions: list[int]) -> torch.Tensor:
        """Logits (bsz, 1, vocab) in fp32 for one token per row (bsz, 1), row i at positions[i] of cache slot
        slots[i] (the continuous-batching engine's rows): the C step where it serves that many rows, else the
        (compiled) row step. The caller keeps slots distinct and positions inside the cache."""
        self._follow_switches()
        pos = torch.tensor(positions, dtype=torch.long, device=tokens.device)
        rows = torch.tensor(slots, dtype=torch.long, device=tokens.device)
        if self.cpu_step is not None and self.cpu_step.applies(tokens.shape[0]):
            return self.cpu_step(tokens, pos, rows)
        tokens = tokens.clone(memory_format=torch.contiguous_format)
        ops = self.one_row_row_ops if tokens.shape[0] == 1 else self.row_ops
        return self.row_step(self.model, tokens, pos, rows, self.cos, self.sin, ops)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        self._follow_switches()
        pos = torch.tensor([start_pos], dtype=torch.long, device=tokens.device)
        if self.cpu_step is not None and self.cpu_step.applies(tokens.shape[0]):
            return self.cpu_step(tokens, pos)
        # A column view of the token grid carries the grid's stride, which would force a recompile for every grid
        # width; a plain clone keeps that stride when bsz is 1, so ask for fresh contiguous strides.
        tokens = tokens.clone(memory_format=torch.contiguous_format)
        ops = self.one_row_ops if tokens.shape[0] == 1 else self.ops
        return self.step(self.model, tokens, pos, self.cos, self.sin, ops)

    def _follow_switches(self) -> None:
        """After use_int8_inputs switched quantized layers, stack again: the stacked layers and the C step take
        the switches they were made with."""
        if self.switched and [m.int8_x for m in self.switched] != self.switches:
            self._stack_projections()
