"""python -m llama.convert on Llama 3.x: scaled RoPE, tied embeddings, and a tokenizer.json made from Meta's
ranks file, checked against Hugging Face transformers and tiktoken."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import META_TOKENIZER, assert_same_meta_checkpoint, hf_model, hf_weights, init_random_
from torch.testing import assert_close

from llama import convert
from llama.chat_format import Llama3ChatFormat
from llama.hf.config import params_from_hf_config
from llama.hf.tokenizers import bpe_split, byte_level_alphabet
from llama.model import Llama3Transformer, ModelArgs
from llama.tokenizer import Llama3Tokenizer
from llama.weights import checkpoint
from llama.weights.layout import Layout

transformers = pytest.importorskip("transformers", reason="install the test extra: pip install -e '.[test]'")

# Llama 3.1 8B's params.json, shrunk; multiple_of 1024 and multiplier 1.3 are what from_hf finds first for its
# FFN size, so params.json survives a round trip as it is.
PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128256, "multiple_of": 1024,
          "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}  # fmt: skip

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Café, naïve, résumé; 日本語のテキスト, 한국어, Ελληνικά, русский текст, emoji 🙂🚀👍🏽 and ZWJ 👩‍👩‍👧",
    "def square(x: int) -> int:\n    return x ** 2  # squared\n\n\nclass A:\n\tpass\r\n",
    "Numbers: 1234567890, 3.14159, 1e-10, 007, 10,000,000 and 2024-12-01T06:50:30Z",
    "   leading spaces, trailing spaces   \n\n\n   \t\t  \n",
    "I'm sure they'll say WE'VE done it; don't you THINK so?",
    "\u00a0non-breaking\u2003em space\u3000ideographic\x0bvertical tab\x1cfile separator\u2028line separator",
    "{\"json\": [1, 2, {\"a\": null}], 'x': True}\n<html><body>&nbsp;</body></html>",
    "a" * 300 + " " * 50 + "!" * 40,
    "",
    " ",
    "\n",
]


def tiny_model(params: dict, seed: int, tied: bool = False) -> Llama3Transformer:
    model = init_random_(Llama3Transformer(ModelArgs.from_params(params, max_seq_len=1)), seed)
    with torch.no_grad():
        model.output.weight[128000:] = 0.0  # keep greedy tokens on ordinary ones
        if tied:  # as Llama 3.2 1B/3B: output.weight stored, equal to tok_embeddings.weight
            model.tok_embeddings.weight[128000:] = 0.0
            model.tok_embeddings.weight /= 8.0  # logits of order 1, as the fan-in-scaled untied output gives
            model.output.weight.copy_(model.tok_embeddings.weight)
    return model


def save(folder: Path, model: Llama3Transformer, params: dict, n_shards: int = 1) -> Path:
    shards = Layout.from_model(model).split_state_dict(model.state_dict(), n_shards)
    return checkpoint.save_checkpoint(folder, shards, params, [META_TOKENIZER])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    """A tiny Llama 3.1 checkpoint in Meta's layout (2 shards, vocabulary-split embedding) and to_hf's folder."""
    root = tmp_path_factory.mktemp("convert3")
    meta = save(root / "meta", tiny_model(PARAMS, seed=5), PARAMS, n_shards=2)
    convert.to_hf(str(meta), str(meta / "tokenizer.model"), str(root / "hf"))
    return root


def our_model(ckpt_dir: Path, max_seq_len: int = 512) -> Llama3Transformer:
    ckpt = checkpoint.open_checkpoint(ckpt_dir, Llama3Transformer)
    ckpt.args.max_seq_len, ckpt.args.max_batch_size = max_seq_len, 2
    model = Llama3Transformer(ckpt.args)
    checkpoint.load_weights(model, ckpt.paths, 0, 1, torch.device("cpu"), torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(ckpts):
    return transformers.AutoTokenizer.from_pretrained(ckpts / "hf")


def test_config_json(ckpts):
    config = json.loads((ckpts / "hf" / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    assert config["rope_theta"] == 500000.0 and config["max_position_embeddings"] == 131072
    assert config["bos_token_id"] == 128000 and config["eos_token_id"] == [128001, 128008, 128009]
    assert config["tie_word_embeddings"] is False and config["vocab_size"] == 128256
    reloaded = transformers.AutoConfig.from_pretrained(ckpts / "hf")
    rope = getattr(reloaded, "rope_parameters", None) or reloaded.rope_scaling  # 5.x or 4.x
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0


def test_to_hf_gives_the_same_logits_and_greedy_tokens(ckpts, build_generator):
    tokens = torch.randint(0, 128000, (2, 300), generator=torch.Generator().manual_seed(0))
    hf = hf_model(ckpts / "hf")
    with torch.no_grad():
        assert_close(hf(tokens).logits, our_model(ckpts / "meta")(tokens, 0))  # positions past 256: scaled RoPE
    generator = build_generator(ckpts / "meta", ckpts / "meta" / "tokenizer.model", max_batch_size=2)
    prompt = generator.tokenizer.encode("The quick brown fox", bos=True, eos=False)
    ours, _ = generator.generate([prompt], max_gen_len=12, temperature=0)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert theirs[0, len(prompt) :].tolist() == ours[0]


def test_hf_tokenizer_gives_our_ids(ckpts, hf_tokenizer):
    ours = Llama3Tokenizer(META_TOKENIZER)
    theirs = hf_tokenizer
    assert (ckpts / "hf" / "tokenizer.model").read_bytes() == META_TOKENIZER.read_bytes()
    rng = random.Random(0)
    pools = ["abcXYZ", " \t\n\r", "0123456789", "éñüßçø", "日本語한국어", "🙂🚀", "αβγ", "абв",
             "!#$%&()*+,-./:;<=>?@[]^_{|}~'\""]  # fmt: skip
    texts = TEXTS + ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    # Text made of random tokens reaches merges that ordinary text rarely does.
    texts += [ours.decode([rng.randrange(128000) for _ in range(rng.randint(1, 20))]) for _ in range(300)]
    for text in texts:
        ids = ours.encode(text, bos=True, eos=False)
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids[1:]), text
    assert theirs.bos_token == "<|begin_of_text|>" and theirs.eos_token == "<|end_of_text|>"
    assert theirs.model_max_length == 131072


def test_merges_are_the_pairs_tiktoken_joins():
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"bc": 3, b"ab": 4, b"abc": 5, b"cab": 6}
    assert bpe_split(b"abc", ranks) == (b"a", b"bc")  # "bc" (3) is joined before "ab" (4)
    assert bpe_split(b"cab", ranks) == (b"c", b"ab")
    ranks[b"ca"] = 7
    assert bpe_split(b"cab", ranks) == (b"c", b"ab")
    assert bpe_split(b"abcd", {**ranks, b"d": 8, b"cd": 9, b"ab": 10, b"abcd": 11}) == (b"abc", b"d")
    # A token that merging alone never reaches: "bc" is joined first and leaves "a", "bc", "d", which no token
    # joins; only a whole pre-tokenized "abcd" gives it (ignore_merges).
    unreachable = {b"a": 0, b"b": 1, b"c": 2, b"d": 3, b"bc": 4, b"ab": 5, b"cd": 6, b"abcd": 7}
    assert bpe_split(b"abcd", unreachable) is None
    alphabet = byte_level_alphabet()
    assert len(set(alphabet)) == 256 and alphabet[ord("A")] == "A" and alphabet[ord(" ")] == "Ġ"


@pytest.mark.parametrize(
    "dialog",
    [
        [{"role": "user", "content": "Name a river."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."}],
        [
            {"role": "system", "content": "You are a helpful assistant.\nAnswer in French."},
            {"role": "user", "content": "  What is 2 + 2?  "},
            {"role": "assistant", "content": "4 (quatre)."},
            {"role": "user", "content": "Et 日本語? 🙂"},
        ],
        [{"role": "user", "content": ""}, {"role": "assistant", "content": "def f():\n    pass"}],
        [{"role": "ipython", "content": '{"result": 42}'}, {"role": "tool", "content": "done"}],
    ],
)
def test_chat_template_gives_our_prompt(hf_tokenizer, dialog):
    theirs = hf_tokenizer.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
    ids = theirs["input_ids"] if hasattr(theirs, "keys") else theirs  # BatchEncoding in 5.x, a list in 4.x
    assert list(ids) == Llama3ChatFormat(Llama3Tokenizer(META_TOKENIZER)).encode_dialog_prompt(dialog)


def test_meta_hf_meta_round_trip_is_exact(ckpts, tmp_path):
    back = convert.from_hf(str(ckpts / "hf"), str(tmp_path / "meta"), model_parallel_size=2)
    assert_same_meta_checkpoint(ckpts / "meta", back)
    assert json.loads((back / "params.json").read_text()) == PARAMS
    assert list(json.loads((back / "params.json").read_text())) == list(PARAMS)  # Meta's key order
    assert checkpoint.load_shard(back / "consolidated.00.pth")["tok_embeddings.weight"].shape == (64128, 64)
    assert (back / "tokenizer.model").read_bytes() == META_TOKENIZER.read_bytes()


def test_tokenizer_model_is_rebuilt_from_tokenizer_json(ckpts, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(ckpts / "hf", hf)
    (hf / "tokenizer.model").unlink()
    back = convert.from_hf(str(hf), str(tmp_path / "meta"), model_parallel_size=2)
    assert (back / "tokenizer.model").read_bytes() == META_TOKENIZER.read_bytes()
    assert_same_meta_checkpoint(ckpts / "meta", back)


def tied_checkpoint(folder: Path, params: dict) -> Path:
    return save(folder, tiny_model(params, seed=7, tied=True), params)


def test_tied_embeddings_round_trip(tmp_path):
    params = {**PARAMS, "rope_scaling_factor": 32.0}  # as HF's 3.2 1B/3B configs
    meta = tied_checkpoint(tmp_path / "meta", params)
    hf = convert.to_hf(str(meta), str(meta / "tokenizer.model"), str(tmp_path / "hf"))
    config = json.loads((hf / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["rope_scaling"]["factor"] == 32.0
    assert "lm_head.weight" not in hf_weights(hf)
    tokens = torch.randint(0, 128000, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(hf_model(hf)(tokens).logits, our_model(meta)(tokens, 0))
    back = convert.from_hf(str(hf), str(tmp_path / "back"))
    assert_same_meta_checkpoint(meta, back)  # output.weight written again, and rope_scaling_factor kept
    assert list(json.loads((back / "params.json").read_text())) == list(params)


def test_hf_meta_hf_round_trip_is_exact(ckpts, tmp_path):
    # A folder written by transformers itself (5.x writes rope_parameters), tied, with to_hf's tokenizer files
    # but no tokenizer.model, as on the hub.
    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=64, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpts / "hf" / name, tmp_path / "hf" / name)
    meta = convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "meta"))
    params = json.loads((meta / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["rope_scaling_factor"] == 32.0
    assert params["vocab_size"] == 128256 and params["n_kv_heads"] == 1
    assert (meta / "tokenizer.model").read_bytes() == META_TOKENIZER.read_bytes()
    shard = checkpoint.load_shard(meta / "consolidated.00.pth")
    assert torch.equal(shard["output.weight"], shard["tok_embeddings.weight"])
    tokens = torch.randint(0, 128000, (1, 300), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(our_model(meta)(tokens, 0), hf_model(tmp_path / "hf")(tokens).logits)
    again = convert.to_hf(str(meta), str(meta / "tokenizer.model"), str(tmp_path / "hf2"))
    original, converted = hf_weights(tmp_path / "hf"), hf_weights(again)
    assert original.keys() == converted.keys() and "lm_head.weight" not in converted
    assert all(torch.equal(original[k], converted[k]) for k in original)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
    ours, theirs = json.loads((again / "config.json").read_text()), config.to_dict()
    for field in ("hidden_size", "intermediate_size", "num_key_value_heads", "vocab_size", "max_position_embeddings",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id"):  # fmt: skip
        assert ours[field] == theirs[field], field
    reloaded = transformers.AutoConfig.from_pretrained(again)
    rope = getattr(reloaded, "rope_parameters", None) or reloaded.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0


def test_llama3_without_scaled_rope_gets_8192_positions(tmp_path):
    params = {k: v for k, v in PARAMS.items() if k != "use_scaled_rope"}  # Llama 3 (not 3.1)
    meta = tied_checkpoint(tmp_path / "meta", params)
    hf = convert.to_hf(str(meta), str(meta / "tokenizer.model"), str(tmp_path / "hf"))
    config = json.loads((hf / "config.json").read_text())
    assert config["max_position_embeddings"] == 8192 and "rope_scaling" not in config
    assert json.loads((convert.from_hf(str(hf), str(tmp_path / "back")) / "params.json").read_text()) == params
    with pytest.raises(ValueError, match="max_position_embeddings must be a positive integer"):
        convert.to_hf(str(meta), str(meta / "tokenizer.model"), str(tmp_path / "bad"), max_position_embeddings=0)


@pytest.mark.parametrize(
    "rope, message",
    [
        ({"rope_type": "yarn", "factor": 4.0}, "RoPE scaling of type 'yarn' is not supported"),
        ({"type": "dynamic", "factor": 2.0}, "RoPE scaling of type 'dynamic' is not supported"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}, "low_freq_factor=2.0 is not supported"),
        ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 4096},
         "original_max_position_embeddings=4096 is not supported"),
        ({"rope_type": "llama3"}, "llama3 RoPE scaling lacks 'factor'"),
        ({"rope_type": "llama3", "factor": -1}, "'factor' must be a finite positive number"),
    ],
)
@pytest.mark.parametrize("field", ["rope_scaling", "rope_parameters"])
def test_from_hf_refuses_other_rope_scaling(ckpts, tmp_path, rope, message, field):
    config = json.loads((ckpts / "hf" / "config.json").read_text())
    del config["rope_scaling"]
    with pytest.raises(ValueError, match="^hf/config.json: .*" + message):
        params_from_hf_config({**config, field: rope}, "hf/config.json")


def test_from_hf_refuses_a_tokenizer_json_it_cannot_rebuild(ckpts, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(ckpts / "hf", hf, ignore=shutil.ignore_patterns("tokenizer.model"))
    original = json.loads((hf / "tokenizer.json").read_text(encoding="utf-8"))

    def write(contents):
        (hf / "tokenizer.json").write_text(json.dumps(contents, ensure_ascii=False), encoding="utf-8")

    other = json.loads(json.dumps(original))
    other["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    write(other)
    with pytest.raises(ValueError, match="does not split text with Llama 3's pattern"):
        convert.from_hf(str(hf), str(tmp_path / "a"))
    other = json.loads(json.dumps(original))
    other["added_tokens"][9]["content"] = "<|my_token|>"
    write(other)
    with pytest.raises(ValueError, match="added tokens are not Llama 3's 256 special tokens"):
        convert.from_hf(str(hf), str(tmp_path / "b"))
    other = json.loads(json.dumps(original))
    other["model"]["merges"][:2] = other["model"]["merges"][1::-1]
    write(other)
    with pytest.raises(ValueError, match="is out of the order of the ids"):
        convert.from_hf(str(hf), str(tmp_path / "c"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing written


def test_to_hf_refuses_a_llama2_tokenizer_for_llama3_weights(ckpts, tokenizer_path, tmp_path):
    with pytest.raises(ValueError, match="has 512 pieces but the checkpoint's vocabulary has 128256 rows"):
        convert.to_hf(str(ckpts / "meta"), str(tokenizer_path), str(tmp_path / "a"))
    assert list(tmp_path.iterdir()) == []


def test_to_hf_of_an_embedding_split_by_columns(ckpts, tmp_path):
    """Shards cut as another tool might cut them (the embedding by columns) give the same Hugging Face weights."""
    model = tiny_model(PARAMS, seed=5)  # the model of ckpts
    layout = Layout.from_model(model)
    layout = Layout(layout.shapes, {**layout.split_dims, "tok_embeddings.weight": 1})
    shards = layout.split_state_dict(model.state_dict(), 2)
    meta = checkpoint.save_checkpoint(tmp_path / "meta", shards, PARAMS, [META_TOKENIZER])
    hf = convert.to_hf(str(meta), str(meta / "tokenizer.model"), str(tmp_path / "hf"))
    got, want = hf_weights(hf), hf_weights(ckpts / "hf")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_safetensors_are_in_hf_layout(ckpts):
    state = safetensors.torch.load_file(ckpts / "hf" / "model.safetensors")
    assert state["model.embed_tokens.weight"].shape == (128256, 64) and "lm_head.weight" in state
