"""The demo model shipped in llama/demo/ (see MODEL_CARD.md): it loads, decodes deterministically, predicts
held-out fortunes far better than unigram frequencies, and writes English words."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from llama import Llama
from llama.demo import DEMO_CKPT_DIR, DEMO_DIR, DEMO_TOKENIZER_PATH
from tools import demo_eval  # tools/ is not installed: pytest puts the repository root on sys.path

DATA = Path(__file__).resolve().parent / "data"

# Perplexity of the demo model on the first demo_eval.TEST_MAX_TOKENS tokens of tests/data/demo_heldout.txt, as
# reported in MODEL_CARD.md ("test sample"), with a 10% margin for other CPUs' float rounding.
MODEL_CARD_SAMPLE_PPL = 91.60
PPL_LIMIT = MODEL_CARD_SAMPLE_PPL * 1.1

PROMPTS = ["A computer is", "The meaning of life is", "Never trust a man who"]
META_PARAM_KEYS = {
    "dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier", "norm_eps", "rope_theta",
    "vocab_size",
}  # fmt: skip


# The demo model's generator: rows long enough for the held-out documents (build_generator's default is 64).
DEMO = dict(ckpt_dir=DEMO_CKPT_DIR, tokenizer=DEMO_TOKENIZER_PATH, max_seq_len=256, max_batch_size=8)


@pytest.fixture(scope="module")
def generator(build_generator) -> Llama:
    return build_generator(**DEMO)


def test_demo_folder_is_a_small_meta_checkpoint():
    params = json.loads((DEMO_DIR / "params.json").read_text())
    assert set(params) == META_PARAM_KEYS
    assert params["vocab_size"] == -1
    shard = DEMO_DIR / "consolidated.00.pth"
    assert shard.stat().st_size <= 20 * 1024 * 1024
    state = torch.load(shard, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    assert "layers.0.attention.wq.weight" in state and "output.weight" in state
    assert not list(DEMO_DIR.glob("consolidated.0[1-9].pth"))


def test_tokenizer_has_llama_special_ids(generator):
    tok = generator.tokenizer
    assert (tok.sp_model.unk_id(), tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert tok.n_words == generator.model.params.vocab_size
    text = "Hello, world!\n\t-- 1984 caf\u00e9 \u2603"
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text  # byte fallback: nothing is lost


def test_greedy_and_seeded_sampling_are_deterministic_across_builds(generator, build_generator):
    first = generator.text_completion(PROMPTS, temperature=0, max_gen_len=20)
    second = build_generator(**DEMO).text_completion(PROMPTS, temperature=0, max_gen_len=20)
    assert first == second
    assert all(r["generation"].strip() for r in first)
    # Llama.build seeds torch (seed=1), so sampling right after a build is reproducible too.
    sample = dict(temperature=0.8, top_p=0.9, max_gen_len=16)
    sampled = [build_generator(**DEMO).text_completion(PROMPTS, **sample) for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_heldout_perplexity_matches_model_card_and_beats_unigram(generator):
    texts = demo_eval.read_texts(DATA / "demo_heldout.txt")
    docs = demo_eval.target_documents(generator.tokenizer, texts, max_tokens=demo_eval.TEST_MAX_TOKENS)
    nll, n = demo_eval.model_nll(generator, docs)
    assert n == demo_eval.TEST_MAX_TOKENS
    model_ppl = demo_eval.perplexity(nll, n)
    # Unigram frequencies fitted on these very tokens (no smoothing): the best any unigram model can do on them.
    u_nll, u_n = demo_eval.unigram_nll(demo_eval.unigram_counts(docs), docs, generator.tokenizer.n_words, add=0.0)
    unigram_ppl = demo_eval.perplexity(u_nll, u_n)
    assert model_ppl < PPL_LIMIT, (model_ppl, PPL_LIMIT)
    assert model_ppl < 0.5 * unigram_ppl, (model_ppl, unigram_ppl)


def test_generations_are_mostly_english_words(generator, build_generator):
    vocabulary = set((DATA / "demo_words.txt").read_text().split())
    outs = generator.text_completion(PROMPTS, temperature=0, max_gen_len=48)
    outs += build_generator(**DEMO).text_completion(PROMPTS, temperature=0.8, top_p=0.9, max_gen_len=48)
    words = [w.lower() for o in outs for w in re.findall(r"[A-Za-z]+", o["generation"])]
    assert len(words) >= 30, outs
    known = sum(w in vocabulary for w in words) / len(words)
    assert known >= 0.7, (known, outs)
