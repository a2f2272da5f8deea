"""Llama 3.x checkpoints end to end: tiny random weights with Meta's real tokenizer, against Meta's reference
formulas and Hugging Face transformers with ``rope_type: llama3``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import META_TOKENIZER, MP_PROMPTS, SEPARATOR, init_random_, run, run_worker
from torch.testing import assert_close

from llama import Llama, reshard
from llama.chat_format import Llama3ChatFormat
from llama.model import Llama3Transformer, ModelArgs, VocabParallelEmbedding, ffn_hidden_dim, precompute_freqs_cis
from llama.tokenizer import Llama3Tokenizer
from llama.weights import checkpoint
from llama.weights.layout import Layout, meta_to_hf_state_dict

transformers = pytest.importorskip("transformers", reason="install the test extra: pip install -e '.[test]'")
PROMPTS = ["The quick brown fox", "Llamas live in", "def square(x):"]
# Llama 3.1's params.json keys, shrunk (8B: dim 4096, 32 layers, 32 heads, 8 KV heads, multiple_of 1024).
PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128256, "multiple_of": 32,
          "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}  # fmt: skip


def tiny_llama3(max_seq_len: int = 64, seed: int = 0) -> Llama3Transformer:
    args = ModelArgs.from_params(PARAMS, max_seq_len=max_seq_len, max_batch_size=4)
    model = init_random_(Llama3Transformer(args), seed).eval()
    with torch.no_grad():
        model.output.weight[128000:] = 0.0  # keep greedy text on ordinary tokens
    return model


def write_checkpoint(folder: Path, model: Llama3Transformer, n_shards: int, embedding_dim: int = 0) -> Path:
    """Meta's Llama 3 folder layout: params.json, consolidated.NN.pth and tokenizer.model side by side."""
    layout = Layout.from_model(model)
    if embedding_dim != 0:  # as another tool might write it: the embedding split by columns
        layout = Layout(layout.shapes, {**layout.split_dims, "tok_embeddings.weight": embedding_dim})
    checkpoint.save_checkpoint(folder, layout.split_state_dict(model.state_dict(), n_shards), PARAMS, [META_TOKENIZER])
    return folder


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("l3") / "mp1", tiny_llama3(), 1)


def greedy(generator: Llama) -> list[str]:
    return [r["generation"] for r in generator.text_completion(PROMPTS, temperature=0, max_gen_len=10)]


def test_scaled_frequencies_equal_metas():
    from llama_models.llama3.model import precompute_freqs_cis as meta_freqs_cis

    for head_dim, theta in [(128, 500000.0), (64, 500000.0), (16, 10000.0)]:
        ours = precompute_freqs_cis(head_dim, 1024, theta, use_scaled=True)
        assert torch.equal(ours, meta_freqs_cis(head_dim, 1024, theta, use_scaled=True))
        assert not torch.equal(ours, precompute_freqs_cis(head_dim, 1024, theta))  # the scaling changes something


def hf_twin(model: Llama3Transformer, rope_scaling: dict | None) -> transformers.LlamaForCausalLM:
    args = model.params
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, num_hidden_layers=args.n_layers,
        intermediate_size=ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier),
        num_attention_heads=args.n_heads, num_key_value_heads=args.kv_heads, rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta, rope_scaling=rope_scaling, max_position_embeddings=131072,
        tie_word_embeddings=False, attn_implementation="eager",
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.load_state_dict(meta_to_hf_state_dict(model.state_dict(), args), strict=True)
    return hf


def test_logits_equal_transformers_with_llama3_rope():
    model = tiny_llama3(max_seq_len=512, seed=3)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}  # fmt: skip
    tokens = torch.randint(0, 128000, (2, 400), generator=torch.Generator().manual_seed(0))
    ours = model(tokens, 0)
    with torch.no_grad():
        assert_close(ours, hf_twin(model, llama3)(tokens).logits)
        unscaled = hf_twin(model, None)(tokens).logits
    assert (ours - unscaled).abs().max() > 1e-3  # the test can tell scaled RoPE from plain RoPE


def test_build_recognizes_llama3_from_the_files(llama3_dir, build_generator):
    generator = build_generator(llama3_dir, max_seq_len=512)
    assert isinstance(generator.tokenizer, Llama3Tokenizer) and isinstance(generator.formatter, Llama3ChatFormat)
    assert isinstance(generator.model, Llama3Transformer)
    assert isinstance(generator.model.tok_embeddings, VocabParallelEmbedding)
    assert generator.model.params.use_scaled_rope
    # The same weights in a plain (unscaled) model give other logits: params.json's key is applied.
    tokens = torch.tensor([generator.tokenizer.encode("hello world", bos=True, eos=False)])
    plain = build_generator(llama3_dir, max_seq_len=512, rope_scaling_factor=1.0).model(tokens, 300)
    assert not torch.equal(generator.model(tokens, 300), plain)


def test_chat_completion_reports_why_it_stopped(llama3_dir, build_generator):
    generator = build_generator(llama3_dir)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."}]
    result = generator.chat_completion([dialog], temperature=0, max_gen_len=5)[0]
    assert result["generation"]["role"] == "assistant"
    assert result["generation"]["stop_reason"] == "out_of_tokens"  # stop ids are 0-scored, so the budget ends it
    streamed = "".join(generator.chat_completion_stream(dialog, temperature=0, max_gen_len=5))
    assert streamed == result["generation"]["content"]


@pytest.mark.parametrize("embedding_dim", [0, 1], ids=["vocab-split", "column-split"])
def test_sharded_checkpoints_give_the_same_tokens(llama3_dir, tmp_path, embedding_dim, build_generator):
    two = write_checkpoint(tmp_path / "mp2", tiny_llama3(), 2, embedding_dim)
    shard = checkpoint.load_shard(two / "consolidated.00.pth")
    assert shard["tok_embeddings.weight"].shape == ((64128, 64) if embedding_dim == 0 else (128256, 32))
    assert greedy(build_generator(two)) == greedy(build_generator(llama3_dir))


def test_reshard_writes_llama3s_layout(llama3_dir, tmp_path, build_generator):
    reshard.reshard(llama3_dir, tmp_path / "mp2", 2)
    shard = checkpoint.load_shard(tmp_path / "mp2" / "consolidated.01.pth")
    assert shard["tok_embeddings.weight"].shape == (64128, 64)  # split by vocabulary rows, as Meta's are
    assert (tmp_path / "mp2" / "tokenizer.model").read_bytes() == META_TOKENIZER.read_bytes()
    assert greedy(build_generator(tmp_path / "mp2")) == greedy(build_generator(llama3_dir))


def test_reshard_of_an_embedding_split_by_columns(llama3_dir, tmp_path, build_generator):
    """Shards cut as another tool might cut them are joined as they were cut, then written in Llama 3's layout."""
    two = write_checkpoint(tmp_path / "mp2", tiny_llama3(), 2, embedding_dim=1)
    one = reshard.reshard(two, tmp_path / "mp1", 1)
    assert checkpoint.load_shard(one / "consolidated.00.pth")["tok_embeddings.weight"].shape == (128256, 64)
    assert greedy(build_generator(one)) == greedy(build_generator(llama3_dir))


@pytest.mark.slow
@pytest.mark.parametrize("nproc, n_shards", [(2, 2), (4, 1), (4, 2)])
def test_processes_match_one(llama3_dir, tmp_path, nproc, n_shards, build_generator):
    """2 and 4 processes on 1- and 2-shard files; with 4 there are more ranks than the 2 KV heads."""
    folder = llama3_dir if n_shards == 1 else write_checkpoint(tmp_path / "mp2", tiny_llama3(), 2)
    single = build_generator(llama3_dir)
    expected = [r["generation"] for r in single.text_completion(MP_PROMPTS, temperature=0, max_gen_len=12)]
    tokens = torch.tensor([single.tokenizer.encode(MP_PROMPTS[0], bos=True, eos=False)])
    result = run_worker(nproc, folder, folder / "tokenizer.model", MP_PROMPTS)
    assert result["generations"] == expected
    assert_close(torch.tensor(result["logits"]), single.model.forward(tokens, 0), rtol=1e-5, atol=1e-5)


def test_reshard_refuses_more_shards_than_kv_heads(llama3_dir, tmp_path):
    with pytest.raises(ValueError, match=r"cannot be split over 4 .*n_kv_heads=2"):
        reshard.reshard(llama3_dir, tmp_path / "mp4", 4)


def test_params_json_of_llama3_checkpoints_load():
    # Meta's 3.1 8B and 3.2 1B params.json, as listed in llama-models' sku_list.
    for params in [
        {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8, "n_layers": 32,
         "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256},
        {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "ffn_dim_multiplier": 1.5,
         "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True},
    ]:  # fmt: skip
        args = ModelArgs.from_params(params)
        assert args.use_scaled_rope and args.vocab_size == 128256
    with pytest.raises(ValueError, match="use_scaled_rope must be true or false"):
        ModelArgs.from_params({**PARAMS, "use_scaled_rope": "yes"})


def test_fast_path_equals_the_faithful_one(llama3_dir, build_generator):
    from llama.engine.fast import FastDecoder

    faithful = build_generator(llama3_dir)
    fast = Llama(faithful.model, faithful.tokenizer, fast=FastDecoder(faithful.model, compile=False))
    assert greedy(fast) == greedy(faithful)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["example_text_completion.py", "example_chat_completion.py"])
def test_example_scripts_run_llama3_with_the_same_flags(llama3_dir, script):
    tokenizer = llama3_dir / "tokenizer.model"
    out = run([sys.executable, script, str(llama3_dir), str(tokenizer), "--max_gen_len=4", "--dtype=float32",
               "--max_batch_size=4"]).stdout  # fmt: skip
    assert out.count(f"Using {llama3_dir}") == 1
    assert out.count(SEPARATOR) >= 4


def test_compiled_fast_path_equals_the_faithful_one(llama3_dir, build_generator):
    faithful = build_generator(llama3_dir)
    assert greedy(build_generator(llama3_dir, compile=True)) == greedy(faithful)
