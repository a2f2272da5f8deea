"""Shared fixtures: tiny model configs, a small trained SentencePiece tokenizer, and tiny checkpoints."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import pytest
import torch

from llama.distributed import setup_model_parallel
from llama.model import ModelArgs, Transformer
from llama.weights import checkpoint
from llama.weights.layout import Layout

REPO = Path(__file__).resolve().parent.parent

# Tiny models gain nothing from threads, and on a shared 2-core machine threads fighting another job make
# in-process tests many times slower.
torch.set_num_threads(1)

# name -> tiny ModelArgs covering each variant the reference supports
TINY_CONFIGS = {
    "mha": dict(dim=64, n_layers=2, n_heads=4),
    "gqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2),
    "mqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1),
    "ffn_multiplier": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim_multiplier=1.3, multiple_of=16),
    "odd_multiple_of": dict(dim=48, n_layers=3, n_heads=6, n_kv_heads=3, multiple_of=7, rope_theta=500.0),
}

CORPUS = """\
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
A journey of a thousand miles begins with a single step, said the old teacher to the students.
Llamas live in the mountains of South America and are related to camels and alpacas.
Numbers such as 12345 and 2024 appear in text, along with punctuation: commas, periods; and quotes "like this".
Café, naïve, résumé and jalapeño carry accents; 日本語 and emoji 🙂 fall back to bytes.
Researchers trust reference code because it gives the same numbers every time it runs.
Question: what is the capital of France? Answer: the capital of France is Paris.
[INST] <<SYS>> system prompts and instructions <</SYS>> [/INST]
"""


@pytest.fixture(scope="session", autouse=True)
def model_parallel() -> None:
    """One in-memory gloo process group with model-parallel size 1 for the whole session, as Llama.build makes."""
    setup_model_parallel(None, torch.device("cpu"))


@pytest.fixture
def tiny_args() -> Callable[..., ModelArgs]:
    """Factory: tiny_args("gqa", vocab_size=..., max_seq_len=...) -> ModelArgs."""

    def make(name: str = "gqa", **overrides) -> ModelArgs:
        base = dict(vocab_size=97, multiple_of=32, max_batch_size=4, max_seq_len=64)
        base.update(TINY_CONFIGS[name])
        base.update(overrides)
        return ModelArgs(**base)

    return make


def init_random_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every weight a well-spread random value (fan-in scaled), so logits are far from ties."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "tok_embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
    return model


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    return init_random_(Transformer(args), seed).eval()


def params_json(args: ModelArgs) -> dict:
    """The params.json Meta would write for args (vocab_size -1: the tokenizer decides)."""
    keep = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier", "norm_eps", "rope_theta")
    params = {k: v for k, v in dataclasses.asdict(args).items() if k in keep and v is not None}
    params["vocab_size"] = -1
    return params


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    """A 512-piece SentencePiece BPE model with byte fallback and Llama's special ids, trained once per run."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("tokenizer")
    text = folder / "corpus.txt"
    text.write_text(CORPUS * 20, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(folder / "tok"),
        model_type="bpe",
        vocab_size=512,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return folder / "tok.model"


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tokenizer_path) -> Callable[..., Path]:
    """Factory: make_checkpoint(config_name, n_shards=1, seed=0) -> folder with Meta's layout (cached)."""
    from llama.tokenizer import Tokenizer

    vocab = Tokenizer(tokenizer_path).n_words
    made: dict[tuple, Path] = {}

    def make(name: str = "gqa", n_shards: int = 1, seed: int = 0, **overrides) -> Path:
        key = (name, n_shards, seed, tuple(sorted(overrides.items())))
        if key not in made:
            base = dict(vocab_size=vocab, multiple_of=32, max_batch_size=4, max_seq_len=64)
            base.update(TINY_CONFIGS[name])
            base.update(overrides)
            args = ModelArgs(**base)
            model = random_model(args, seed)
            out = tmp_path_factory.mktemp("ckpt") / f"{name}-mp{n_shards}"
            shards = Layout.from_model(model).split_state_dict(model.state_dict(), n_shards)
            checkpoint.save_checkpoint(out, shards, params_json(args))
            made[key] = out
        return made[key]

    return make


def build_kernels_portably(monkeypatch, tmp_path, module) -> None:
    """Make `module` (llama.quantize, llama.kernels.cpu_attention...) build its C kernels anew into tmp_path for the
    baseline x86-64 (or without -march at all elsewhere), so that they take their plain loops, not AVX2's."""
    from llama.kernels import cpu_gemv

    portable = "-march=x86-64" if torch.backends.cpu.get_cpu_capability() != "DEFAULT" else "-O3"
    monkeypatch.setattr(cpu_gemv, "BASE_FLAGS", [portable if f == "-march=native" else f for f in cpu_gemv.BASE_FLAGS])
    monkeypatch.setenv("LLAMA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(module, "_state", {})
