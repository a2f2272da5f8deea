"""llama.cpp as a contender in bench_decode.py (``--llama_cpp``): the same random weights, written to a GGUF file.

Needs two packages that the project does not depend on: ``gguf`` (pure Python, writes the file) and
``llama-cpp-python``, which pip builds from source with the machine's C++ compiler (several minutes):

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python gguf

The GGUF file carries the model's weights unchanged (bf16 stays bf16) with a made-up vocabulary of the
model's size: the benchmark feeds token ids and never tokenizes text. llama.cpp's RoPE for the "llama"
architecture rotates adjacent pairs, as Meta's checkpoints expect, so the file holds Meta's layout as is.
`python benchmarks/llama_cpp_contender.py` checks that: a small random model, in fp32 and in bf16, must give
llama.cpp the same greedy tokens as our faithful path.

The quantized contenders (q8_0, q4_0) are made by llama.cpp itself from that file (``quantize_gguf``, as its
``llama-quantize`` tool does, with its default parameters: q4_0 keeps ``output.weight`` in q6_K, and
``file_summary`` shows the mix). ``prefiller`` evaluates a prompt in one batch on an emptied KV cache (prefill timing).
``batch_stepper`` runs llama.cpp's batched decode step: one token for each of several sequences in one batch, each
at its own position (bench_batch_decode.py's ``--what step --llama_cpp``).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from llama.model import Transformer, ffn_hidden_dim, scale_rope_frequencies


def _numpy(t: torch.Tensor):
    """The tensor as a numpy array and its GGML type: bf16 as raw 16-bit words, since numpy has no bf16."""
    import gguf

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view("uint16"), gguf.GGMLQuantizationType.BF16
    if t.dtype == torch.float16:
        return t.numpy(), gguf.GGMLQuantizationType.F16
    return t.float().numpy(), gguf.GGMLQuantizationType.F32


def write_gguf(model: Transformer, path: Path) -> None:
    """Write `model` (one model-parallel rank) as a GGUF file of the "llama" architecture."""
    import gguf

    a = model.params
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(a.max_seq_len)
    writer.add_embedding_length(a.dim)
    writer.add_block_count(a.n_layers)
    writer.add_feed_forward_length(ffn_hidden_dim(a.dim, a.multiple_of, a.ffn_dim_multiplier))
    writer.add_head_count(a.n_heads)
    writer.add_head_count_kv(a.kv_heads)
    writer.add_rope_dimension_count(a.head_dim)
    writer.add_rope_freq_base(a.rope_theta)
    writer.add_layer_norm_rms_eps(a.norm_eps)
    dtype = model.output.weight.dtype
    file_types = {torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16, torch.float16: gguf.LlamaFileType.MOSTLY_F16}
    writer.add_file_type(file_types.get(dtype, gguf.LlamaFileType.ALL_F32))

    # A SentencePiece-style vocabulary: <unk> <s> </s>, the 256 byte pieces, then plain pieces.
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    tokens = ["<unk>", "<s>", "</s>"] + byte_pieces
    tokens += [f"piece{i}" for i in range(a.vocab_size - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (a.vocab_size - 259)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * a.vocab_size)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    names = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
             "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up",
             "feed_forward.w2": "ffn_down", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}  # fmt: skip
    tensors = {"token_embd.weight": model.tok_embeddings.weight, "output_norm.weight": model.norm.weight,
               "output.weight": model.output.weight}  # fmt: skip
    for i, layer in enumerate(model.layers):
        for ours, theirs in names.items():
            module = layer.get_submodule(ours)
            tensors[f"blk.{i}.{theirs}.weight"] = module.weight
    if a.use_scaled_rope:
        # llama.cpp divides each rotation frequency by a per-pair factor read from this tensor: ours / scaled.
        inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2)[: a.head_dim // 2].float() / a.head_dim))
        factor = 8.0 if a.rope_scaling_factor is None else a.rope_scaling_factor
        tensors["rope_freqs.weight"] = inv_freq / scale_rope_frequencies(inv_freq, factor)
    for name, t in tensors.items():
        if t.ndim == 1:
            t = t.float()  # llama.cpp keeps norm weights in fp32
        array, ggml_type = _numpy(t)
        writer.add_tensor(name, array, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# llama.cpp's quantized file types, by the names its tools give them -> the ftype constant of llama_cpp
QUANT_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def require():
    """The llama_cpp module, once it and gguf are found to be installed; else a SystemExit that says how."""
    try:
        import gguf  # noqa: F401
        import llama_cpp
    except ImportError as e:
        raise SystemExit(f"--llama_cpp needs llama-cpp-python and gguf ({e}); see {__file__}") from e
    return llama_cpp


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Send what C code writes to stdout and stderr (llama.cpp's log: a line per tensor quantized or loaded) to a
    temporary file, shown only if the block raises."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            if failed:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace"))


def quantize_gguf(src: Path, dst: Path, ftype: str) -> None:
    """Quantize the GGUF file src to dst with llama.cpp's own quantizer (its default parameters)."""
    llama_cpp = require()
    if ftype not in QUANT_FTYPES:
        raise ValueError(f"unknown llama.cpp file type {ftype!r}; choose from {sorted(QUANT_FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[ftype])
    with quiet():
        if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {src} to {ftype} (its log is above)")


def file_summary(path: Path) -> dict:
    """The GGUF file's size in MB, how many of its tensors have each GGML type (e.g. {"Q4_0": 112, "Q6_K": 1,
    "F32": 33}), and the bytes a decode step reads: every tensor but the embedding table, of which it reads a row."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    return {
        "MB": path.stat().st_size / 1e6,
        "tensor_types": dict(collections.Counter(t.tensor_type.name for t in tensors)),
        "bytes_per_token": sum(int(t.n_bytes) for t in tensors if t.name != "token_embd.weight"),
    }


def load(path: Path, n_ctx: int, n_batch: int = 512):
    """llama.cpp's model of the GGUF file, on as many threads as torch uses, with one context of n_ctx positions
    that evaluates up to n_batch prompt tokens in one batch."""
    threads = torch.get_num_threads()
    with quiet():
        return require().Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
            n_threads_batch=threads, verbose=False,
        )  # fmt: skip


def generator(llm, prompt: list[int]) -> Callable[[int], list[int]]:
    """A function that greedily generates n tokens after `prompt` with the llama.cpp model llm."""

    def generate(n: int) -> list[int]:
        out: list[int] = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            out.append(token)
            if len(out) == n:
                break
        return out

    return generate


def prefiller(llm, token: int = 100) -> Callable[[int], None]:
    """A function that evaluates a prompt of n tokens (all `token`) with the llama.cpp model llm, from position 0.

    reset() rewinds to position 0 and eval() first drops every cached position from there, so each call starts
    on an empty KV cache. A prompt longer than the context's batch would go in several batches: refused.
    """
    llama_cpp = require()
    batch = min(llama_cpp.llama_n_batch(llm.ctx), llama_cpp.llama_n_ubatch(llm.ctx))

    def prefill(n: int) -> None:
        if n > batch:
            raise ValueError(f"a {n}-token prompt does not fit llama.cpp's batch of {batch}; load it with n_batch={n}")
        llm.reset()
        llm.eval([token] * n)
        if llm.n_tokens != n:
            raise RuntimeError(f"llama.cpp holds {llm.n_tokens} positions after a {n}-token prompt")

    return prefill


@contextlib.contextmanager
def gguf_model(path: Path) -> Iterator[object]:
    """llama.cpp's model of the GGUF file (memory-mapped, on the CPU) through its C API, freed when the block ends."""
    llama_cpp = require()
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP  # as Llama() loads it (load)
    with quiet():
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {path} (its log is above)")
    try:
        yield model
    finally:
        llama_cpp.llama_model_free(model)


class BatchStep:
    """Call it to run one llama.cpp decode step of len(positions) sequences in one batch (see batch_stepper)."""

    def __init__(self, llama_cpp, ctx, positions: list[int], tokens: list[int]) -> None:
        self.llama_cpp, self.ctx, self.positions = llama_cpp, ctx, positions
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llama_cpp.llama_get_model(ctx)))
        self.batch = llama_cpp.llama_batch_init(len(positions), 0, 1)
        self.batch.n_tokens = len(positions)
        for s, (pos, token) in enumerate(zip(positions, tokens)):  # row s: sequence s, its own position
            self.batch.token[s], self.batch.pos[s], self.batch.logits[s] = token, pos, 1
            self.batch.n_seq_id[s], self.batch.seq_id[s][0] = 1, s

    def __call__(self) -> None:
        if (code := self.llama_cpp.llama_decode(self.ctx, self.batch)) != 0:
            raise RuntimeError(f"llama_decode failed ({code}) on a step of {len(self.positions)} sequences")
        self.llama_cpp.llama_synchronize(self.ctx)
        # forget the position just written, so that the next call runs the same step on the same caches
        for s, pos in enumerate(self.positions):
            if not self.llama_cpp.llama_memory_seq_rm(self.memory, s, pos, -1):
                raise RuntimeError(f"llama.cpp could not drop position {pos} of sequence {s}")

    def logits(self) -> torch.Tensor:
        """The last step's logits, (rows, vocabulary), fp32."""
        import numpy as np

        rows = []
        for s in range(len(self.positions)):
            ptr = self.llama_cpp.llama_get_logits_ith(self.ctx, s)
            if not ptr:
                raise RuntimeError(f"llama.cpp has no logits for row {s} of the step")
            rows.append(torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()))
        return torch.stack(rows)

    def free(self) -> None:
        self.llama_cpp.llama_batch_free(self.batch)


@contextlib.contextmanager
def batch_stepper(
    model,
    positions: list[int],
    tokens: list[int],
    flash_attn: bool = False,
    kv_unified: bool = False,
    prompt: Optional[list[int]] = None,
) -> Iterator[BatchStep]:
    """A BatchStep of llama.cpp's model (gguf_model): each call decodes tokens[s] at positions[s] for sequence s,
    every row's logits, in one llama_batch, on as many threads as torch uses (as load does).

    Its context holds one sequence per row. Before the first call, untimed, each sequence s is filled with the first
    positions[s] tokens of `prompt` (default: random ids), so that every row attends to a cache of its own length,
    and one step runs whose logits must be finite. After each step the position it wrote is dropped again, so that
    every call measures the same step. kv_unified=False (llama.cpp's default) gives each sequence its own KV stream,
    as its docs advise for sequences that share no prefix; flash_attn=False is load's (Llama()'s) default.
    """
    llama_cpp = require()
    if len(positions) != len(tokens) or not positions:
        raise ValueError(f"give one token per position ({len(tokens)} tokens, {len(positions)} positions)")
    rows, longest = len(positions), max(positions) + 1
    if prompt is not None and len(prompt) < longest - 1:
        raise ValueError(f"a prompt of {len(prompt)} tokens cannot fill a cache to position {longest - 1}")
    params = llama_cpp.llama_context_default_params()
    per_seq = -(-longest // 256) * 256  # llama.cpp pads contexts to 256 positions
    params.n_seq_max, params.kv_unified = rows, kv_unified
    params.n_ctx = per_seq * rows  # one stream of per_seq positions per sequence, or one stream of them all
    params.n_batch = params.n_ubatch = max(512, longest, rows)  # a sequence's prefill in one batch
    params.n_threads = params.n_threads_batch = torch.get_num_threads()
    attention = "ENABLED" if flash_attn else "DISABLED"
    params.flash_attn_type = getattr(llama_cpp, f"LLAMA_FLASH_ATTN_TYPE_{attention}")
    with quiet():
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            raise RuntimeError("llama.cpp could not make a context (its log is above)")
    step = None
    try:
        n_ctx, n_ctx_seq = llama_cpp.llama_n_ctx(ctx), llama_cpp.llama_n_ctx_seq(ctx)
        if n_ctx < rows * longest or n_ctx_seq < longest:
            raise RuntimeError(f"llama.cpp's context ({n_ctx} positions, {n_ctx_seq} per sequence) is too short for "
                               f"{rows} sequences of up to {longest}")  # fmt: skip
        step = BatchStep(llama_cpp, ctx, positions, tokens)
        prefill = llama_cpp.llama_batch_init(longest, 0, 1)
        try:  # every sequence starts with the same tokens: a row's cache depends on its position alone
            if prompt is None:
                prompt = torch.randint(3, step.n_vocab, (longest,), generator=torch.Generator().manual_seed(0)).tolist()
            for s, n in enumerate(positions):
                if n == 0:
                    continue
                prefill.n_tokens = n
                for i, token in enumerate(prompt[:n]):
                    prefill.token[i], prefill.pos[i], prefill.logits[i] = token, i, int(i == n - 1)
                    prefill.n_seq_id[i], prefill.seq_id[i][0] = 1, s
                if (code := llama_cpp.llama_decode(ctx, prefill)) != 0:
                    raise RuntimeError(f"llama_decode failed ({code}) on the {n}-token prefill of sequence {s}")
        finally:
            llama_cpp.llama_batch_free(prefill)
        step()
        logits = step.logits()
        if not torch.isfinite(logits).all():
            raise RuntimeError(f"llama.cpp's {rows}-row step gave logits that are not finite")
        yield step
    finally:
        if step is not None:
            step.free()
        with quiet():
            llama_cpp.llama_free(ctx)


def contender(model: Transformer, prompt: list[int], folder: Path) -> Callable[[int], object]:
    """A function that greedily generates n tokens after `prompt` with llama.cpp on the same weights."""
    require()  # fail before writing the file
    path = folder / "model.gguf"
    write_gguf(model, path)
    return generator(load(path, model.params.max_seq_len), prompt)


def main() -> None:
    """Check the export: a small random model gives llama.cpp the same greedy tokens as our faithful path."""
    import tempfile

    from llama.distributed import setup_model_parallel
    from llama.model import ModelArgs

    setup_model_parallel(1, torch.device("cpu"))
    base = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=32, max_batch_size=1,
                max_seq_len=64)  # fmt: skip
    prompt = [1, 300, 301, 302, 303, 304]
    llama3 = dict(rope_theta=500000.0, use_scaled_rope=True)  # Llama 3.1's RoPE, through rope_freqs.weight
    for dtype, args in [(torch.float32, ModelArgs(**base)), (torch.bfloat16, ModelArgs(**base)),
                        (torch.float32, ModelArgs(**base, **llama3))]:  # fmt: skip
        torch.manual_seed(0)
        model = Transformer(args).eval()
        with torch.no_grad():
            for p in model.parameters():  # large weights: well-separated logits, so rounding moves no choice
                p.copy_(torch.ones_like(p) if p.ndim == 1 else torch.randn_like(p) / p.shape[1] ** 0.25)
        model.to(dtype)
        ours, tokens = [], torch.tensor([prompt])
        for _ in range(12):
            ours.append(model.forward(tokens, 0)[0, -1].argmax().item())
            tokens = torch.cat([tokens, torch.tensor([[ours[-1]]])], dim=1)
        with tempfile.TemporaryDirectory() as folder:
            theirs = contender(model, prompt, Path(folder))(12)
            print(f"{dtype}, scaled RoPE {args.use_scaled_rope}\n  ours:      {ours}\n  llama.cpp: {theirs}")
            if ours != theirs:
                raise SystemExit(f"llama.cpp's greedy tokens differ from ours in {dtype}: the GGUF export is wrong")
            # llama.cpp's batched step (bench_batch_decode.py): each row's next token is ours after its own prefix
            long_prompt, positions, steps = prompt + list(range(310, 330)), [6, 25, 13], [400, 401, 402]
            expected = [model.forward(torch.tensor([long_prompt[:p] + [t]]), 0)[0, -1].argmax().item()
                        for p, t in zip(positions, steps)]  # fmt: skip
            with gguf_model(Path(folder) / "model.gguf") as theirs_model:
                with batch_stepper(theirs_model, positions, steps, prompt=long_prompt) as step:
                    batched = step.logits().argmax(-1).tolist()
            print(f"  a step of {len(positions)} rows at positions {positions}: ours {expected}, llama.cpp {batched}")
            if batched != expected:
                raise SystemExit(f"llama.cpp's batched step differs from ours in {dtype}: batch_stepper is wrong")
            if dtype == torch.bfloat16:  # smoke test of llama.cpp's quantizer and prompt evaluation on this file
                for ftype in QUANT_FTYPES:
                    path = Path(folder) / f"model-{ftype}.gguf"
                    quantize_gguf(Path(folder) / "model.gguf", path, ftype)
                    llm = load(path, args.max_seq_len)
                    quantized = generator(llm, prompt)(12)
                    prefiller(llm)(args.max_seq_len)
                    same = next((i for i, (a, b) in enumerate(zip(quantized, ours)) if a != b), len(ours))
                    print(f"  llama.cpp {ftype}: {quantized} (the first {same} as bf16's; {file_summary(path)})")
    print("same greedy tokens")


if __name__ == "__main__":
    main()
