"""Shared fixtures: tiny model configs, a small trained SentencePiece tokenizer, tiny checkpoints, a way to build a
tiny generator from them, and Meta's Llama 3 tokenizer and chat format. Plain helpers live in helpers.py."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import pytest
import torch
from helpers import CORPUS, META_TOKENIZER, TINY_CONFIGS, params_json, random_model

from llama.distributed import setup_model_parallel
from llama.model import ModelArgs
from llama.weights import checkpoint
from llama.weights.layout import Layout

if TYPE_CHECKING:  # imported where used, so that a module that fails to import fails only the tests that use it
    from llama import Llama
    from llama.chat_format import Llama3ChatFormat
    from llama.tokenizer import Llama3Tokenizer

# Tiny models gain nothing from threads, and on a shared 2-core machine threads fighting another job make
# in-process tests many times slower.
torch.set_num_threads(1)

# What build_generator passes to Llama.build unless a test says otherwise: the CPU in fp32, whose results are exact
# and comparable, and room for the tests' prompts (a few rows of up to 64 tokens).
GENERATOR_DEFAULTS = dict(max_seq_len=64, max_batch_size=4, device="cpu", dtype=torch.float32)


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


@pytest.fixture(scope="session")
def build_generator(tokenizer_path) -> Callable[..., Llama]:
    """Factory: build_generator(ckpt_dir, tokenizer=None, **overrides) -> Llama.build(ckpt_dir, tokenizer, ...) with
    GENERATOR_DEFAULTS updated by overrides. Without a tokenizer: the folder's own tokenizer.model where it has one
    (Llama 3 folders, the demo model), else the session's SentencePiece model (tokenizer_path)."""
    from llama import Llama

    def build(ckpt_dir: Path, tokenizer: Optional[Path] = None, **overrides) -> Llama:
        if tokenizer is None:
            own = Path(ckpt_dir) / "tokenizer.model"
            tokenizer = own if own.is_file() else tokenizer_path
        return Llama.build(str(ckpt_dir), str(tokenizer), **{**GENERATOR_DEFAULTS, **overrides})

    return build


# ---------------------------------------------------------------- Meta's Llama 3 tokenizer and chat format


@pytest.fixture(scope="session")
def llama3_tokenizer() -> Llama3Tokenizer:
    """Our tokenizer on Meta's real Llama 3 tokenizer.model."""
    from llama.tokenizer import Llama3Tokenizer

    return Llama3Tokenizer(META_TOKENIZER)


@pytest.fixture(scope="session")
def llama3_format(llama3_tokenizer) -> Llama3ChatFormat:
    """Our Llama 3 chat format over llama3_tokenizer."""
    from llama.chat_format import Llama3ChatFormat

    return Llama3ChatFormat(llama3_tokenizer)


@pytest.fixture(scope="session")
def meta_format():
    """Meta's own llama_models ChatFormat over the same tokenizer.model: the reference llama3_format must match."""
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    return ChatFormat(Tokenizer(META_TOKENIZER))
