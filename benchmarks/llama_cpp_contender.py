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
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

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
