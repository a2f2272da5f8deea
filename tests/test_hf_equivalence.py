"""Our model against Hugging Face transformers' LlamaForCausalLM: the same weights give the same logits."""

import pytest
import torch
from helpers import TINY_CONFIGS, random_model
from torch.testing import assert_close

from llama import Llama, Tokenizer
from llama.model import ffn_hidden_dim
from llama.weights.layout import hf_to_meta_state_dict, meta_to_hf_state_dict, permute_qk

transformers = pytest.importorskip("transformers", reason="install the test extra: pip install -e '.[test]'")


def hf_twin(model):
    """A LlamaForCausalLM holding `model`'s weights (q/k rows permuted to HF's rotate-half layout)."""
    args = model.params
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier),
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.load_state_dict(meta_to_hf_state_dict(model.state_dict(), args), strict=True)
    return hf


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_transformers(tiny_args, name):
    model = random_model(tiny_args(name, vocab_size=128), seed=5)
    hf = hf_twin(model)
    tokens = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert_close(model(tokens, 0), expected)


def test_incremental_logits_match_transformers(tiny_args):
    model = random_model(tiny_args("gqa", vocab_size=128), seed=6)
    hf = hf_twin(model)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    ours = torch.cat([model(tokens[:, :7], 0)] + [model(tokens[:, p : p + 1], p) for p in range(7, 12)], dim=1)
    with torch.no_grad():
        assert_close(ours, hf(tokens).logits)


def test_greedy_generation_matches_transformers(tiny_args, tokenizer_path):
    tokenizer = Tokenizer(tokenizer_path)
    model = random_model(tiny_args("gqa", vocab_size=tokenizer.n_words), seed=7)
    hf = hf_twin(model)
    generator = Llama(model, tokenizer)
    for text in ["The quick brown fox", "Question: what is the capital of France?"]:
        prompt = tokenizer.encode(text, bos=True, eos=False)
        ours, _ = generator.generate([prompt], max_gen_len=16, temperature=0)
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=tokenizer.eos_id,
                pad_token_id=tokenizer.eos_id,
            )  # fmt: skip
        theirs = out[0, len(prompt) :].tolist()
        if tokenizer.eos_id in theirs:
            theirs = theirs[: theirs.index(tokenizer.eos_id)]
        assert ours[0] == theirs


def test_permutation_round_trip_and_name_table(tiny_args):
    w = torch.randn(4 * 16, 64)
    assert torch.equal(permute_qk(permute_qk(w, 4), 4, inverse=True), w)
    args = tiny_args("mqa")
    state = random_model(args).state_dict()
    back = hf_to_meta_state_dict(meta_to_hf_state_dict(state, args), args)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
