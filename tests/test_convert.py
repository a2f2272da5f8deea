"""python -m llama.convert: Meta <-> Hugging Face folders hold the same model, and round trips are exact."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import CORPUS, REPO, TINY_CONFIGS, assert_same_meta_checkpoint, hf_model, hf_weights
from torch.testing import assert_close

from llama import convert
from llama.hf import convert as hf_convert
from llama.hf.config import ffn_params_for, hf_config, params_from_hf_config
from llama.hf.weights import SAFETENSORS_INDEX, HFWeights
from llama.model import Transformer, ffn_hidden_dim
from llama.tokenizer import Tokenizer
from llama.weights import checkpoint

transformers = pytest.importorskip("transformers", reason="install the test extra: pip install -e '.[test]'")


def our_model(ckpt_dir) -> Transformer:
    """Our fp32 model with the weights of ckpt_dir (any shard count)."""
    ckpt = checkpoint.open_checkpoint(ckpt_dir)
    ckpt.args.max_seq_len, ckpt.args.max_batch_size = 32, 2
    model = Transformer(ckpt.args)
    checkpoint.load_weights(model, ckpt.paths, 0, 1, torch.device("cpu"), torch.float32)
    return model.eval()


@pytest.mark.parametrize("n_shards", [1, 2])
def test_to_hf_gives_the_same_logits(make_checkpoint, tokenizer_path, tmp_path, n_shards):
    ckpt = make_checkpoint("gqa", n_shards=n_shards)
    out = convert.to_hf(str(ckpt), str(tokenizer_path), str(tmp_path / "hf"), max_position_embeddings=128)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["max_position_embeddings"] == 128
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (1, 2, "float32")
    tokens = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(hf_model(out)(tokens).logits, our_model(ckpt)(tokens, 0))


def test_hf_tokenizer_encodes_as_ours(make_checkpoint, tokenizer_path, tmp_path):
    out = convert.to_hf(str(make_checkpoint("gqa")), str(tokenizer_path), str(tmp_path / "hf"))
    assert (out / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
    ours = Tokenizer(tokenizer_path)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for line in CORPUS.splitlines():
        ids = ours.encode(line, bos=True, eos=False)
        assert theirs(line)["input_ids"] == ids, line
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids)


def test_meta_hf_meta_round_trip_is_exact(make_checkpoint, tokenizer_path, tmp_path):
    src = make_checkpoint("gqa", n_shards=2)
    hf = convert.to_hf(str(src), str(tokenizer_path), str(tmp_path / "hf"))
    back = convert.from_hf(str(hf), str(tmp_path / "meta"), model_parallel_size=2)
    assert_same_meta_checkpoint(src, back)
    assert (back / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()


def test_hf_meta_hf_round_trip_is_exact(tokenizer_path, tmp_path):
    # A folder written by transformers itself, with sizes no Meta model has (FFN 100 < 8 * dim / 3 = 128).
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=500.0, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    meta = convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "meta"), model_parallel_size=2)
    params = json.loads((meta / "params.json").read_text())
    assert ffn_hidden_dim(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")) == 100
    assert params["n_kv_heads"] == 2 and params["rope_theta"] == 500.0 and params["norm_eps"] == 1e-6
    # Our model on the Meta folder computes what transformers computes on the original.
    tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(our_model(meta)(tokens, 0), hf_model(tmp_path / "hf")(tokens).logits)
    again = convert.to_hf(str(meta), str(tokenizer_path), str(tmp_path / "hf2"), max_position_embeddings=256)
    original, converted = hf_weights(tmp_path / "hf"), hf_weights(again)
    assert original.keys() == converted.keys()
    assert all(torch.equal(original[k], converted[k]) for k in original)
    ours, theirs = json.loads((again / "config.json").read_text()), config.to_dict()
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "vocab_size", "max_position_embeddings"):  # fmt: skip
        assert ours[field] == theirs[field], field
    reloaded = transformers.AutoConfig.from_pretrained(again)
    rope = getattr(reloaded, "rope_parameters", None) or {"rope_theta": reloaded.rope_theta}  # 5.x or 4.x
    assert rope["rope_theta"] == 500.0


def test_several_safetensors_files_with_an_index(make_checkpoint, tokenizer_path, tmp_path):
    src = make_checkpoint("mha")
    hf = convert.to_hf(str(src), str(tokenizer_path), str(tmp_path / "hf"), max_file_gb=60e3 / 1e9)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in hf.glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    tokens = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(hf_model(hf)(tokens).logits, our_model(src)(tokens, 0))
    assert_same_meta_checkpoint(src, convert.from_hf(str(hf), str(tmp_path / "meta")))


@pytest.mark.parametrize("dim", [48, 64, 4096, 5120, 8192])
@pytest.mark.parametrize("extra", [-37, -1, 0, 1, 7, 100, 333])
def test_ffn_params_reproduce_any_hidden_size(dim, extra):
    intermediate = ffn_hidden_dim(dim, 1, None) + extra
    multiple_of, multiplier = ffn_params_for(dim, intermediate)
    assert ffn_hidden_dim(dim, multiple_of, multiplier) == intermediate


def test_ffn_params_prefer_meta_values(tiny_args):
    assert ffn_params_for(4096, 11008) == (256, None)  # 7B
    assert ffn_params_for(5120, 13824) == (256, None)  # 13B
    assert ffn_params_for(8192, 28672) == (4096, 1.3)  # 70B
    for name in TINY_CONFIGS:  # whatever is found gives the same size
        args = tiny_args(name)
        size = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
        assert ffn_hidden_dim(args.dim, *ffn_params_for(args.dim, size)) == size


def test_from_hf_refuses_what_it_cannot_convert(make_checkpoint, tokenizer_path, tmp_path):
    hf = convert.to_hf(str(make_checkpoint("gqa")), str(tokenizer_path), str(tmp_path / "hf"))
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(ValueError, match="config.json.*attention_bias not supported"):
        convert.from_hf(str(hf), str(tmp_path / "a"))
    (hf / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing model.layers.2.input_layernorm.weight"):
        convert.from_hf(str(hf), str(tmp_path / "b"))
    (hf / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    with pytest.raises(ValueError, match="shape mismatches.*layers.0.feed_forward.w1.weight"):
        convert.from_hf(str(hf), str(tmp_path / "c"))
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"use a model-parallel size in \[1, 2\]"):
        convert.from_hf(str(hf), str(tmp_path / "d"), model_parallel_size=4)
    (hf / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="model.safetensors"):
        convert.from_hf(str(hf), str(tmp_path / "e"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing written


def test_to_hf_refuses_a_foreign_tokenizer_and_leaves_nothing(make_checkpoint, tokenizer_path, tmp_path, monkeypatch):
    mistral_common = pytest.importorskip("mistral_common")
    foreign = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"  # 32000 pieces, not 512
    with pytest.raises(ValueError, match="has 32000 pieces.*is it the tokenizer of this model"):
        convert.to_hf(str(make_checkpoint("gqa")), str(foreign), str(tmp_path / "a"))

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        convert.to_hf(str(make_checkpoint("gqa")), str(tokenizer_path), str(tmp_path / "b"))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "c").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert.to_hf(str(make_checkpoint("gqa")), str(tokenizer_path), str(tmp_path / "c"))


def test_to_hf_refuses_a_quantized_checkpoint_before_reading_it(make_checkpoint, tokenizer_path, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    from llama import quantize as quant

    src = quant.quantize_checkpoint(make_checkpoint("gqa"), tmp_path / "q", "int8", 16)

    def must_not_run(*args, **kwargs):
        raise AssertionError("read before the checkpoint was refused")

    monkeypatch.setattr(hf_convert, "load_tokenizer", must_not_run)
    monkeypatch.setattr(checkpoint, "open_checkpoint", must_not_run)
    message = (r"'.*q' is a quantized checkpoint \(int8, group 16\); Hugging Face's Llama folders hold float "
               r"weights: convert the float checkpoint it was quantized from")  # fmt: skip
    with pytest.raises(ValueError, match=message):
        convert.to_hf(str(src), str(tokenizer_path), str(tmp_path / "hf"))
    assert list(tmp_path.iterdir()) == [src]


@pytest.mark.slow
def test_cli_both_ways(make_checkpoint, tokenizer_path, tmp_path):
    src = make_checkpoint("gqa", n_shards=2)
    script = (
        f"{sys.executable} -m llama.convert to_hf --ckpt_dir {src} --tokenizer_path {tokenizer_path} "
        f"--out_dir {tmp_path / 'hf'} && {sys.executable} -m llama.convert from_hf --hf_dir {tmp_path / 'hf'} "
        f"--out_dir {tmp_path / 'meta'} --model_parallel_size 2"
    )
    result = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "to_hf [" in result.stderr and "from_hf [" in result.stderr
    assert_same_meta_checkpoint(src, tmp_path / "meta")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_size", None, "'hidden_size' must be a positive integer, got None"),
        ("hidden_size", "abc", "'hidden_size' must be a positive integer, got 'abc'"),
        ("num_hidden_layers", 2.5, "'num_hidden_layers' must be a positive integer, got 2.5"),
        ("num_attention_heads", True, "'num_attention_heads' must be a positive integer, got True"),
        ("num_key_value_heads", "2", "'num_key_value_heads' must be a positive integer, got '2'"),
        ("intermediate_size", -1, "'intermediate_size' must be a positive integer, got -1"),
        ("rms_norm_eps", "abc", "'rms_norm_eps' must be a finite positive number, got 'abc'"),
        ("rope_theta", None, "'rope_theta' must be a finite positive number, got None"),
        ("rope_theta", float("inf"), "'rope_theta' must be a finite positive number, got inf"),
        ("rope_parameters", [], "'rope_parameters' must be an object, got list"),
    ],
)
def test_hf_config_with_a_bad_field_names_the_file_and_field(tiny_args, field, value, message):
    config = hf_config(tiny_args("gqa"), 1, 2, torch.float32, 64)
    with pytest.raises(ValueError, match="^hf/config.json: " + message):
        params_from_hf_config({**config, field: value}, "hf/config.json")
    del config["hidden_size"]
    with pytest.raises(ValueError, match="^hf/config.json lacks 'hidden_size'"):
        params_from_hf_config(config, "hf/config.json")


@pytest.mark.parametrize(
    "index, message",
    [
        ("{not json", "is not valid JSON"),
        ("[]", "must hold a JSON object with a 'weight_map'"),
        ('{"metadata": {}}', "must hold a JSON object with a 'weight_map'"),
        ('{"weight_map": {"lm_head.weight": 3}}', "'weight_map' must map weight names to file names"),
        ('{"weight_map": {"lm_head.weight": "../model.safetensors"}}', "'weight_map' must map weight names to file"),
        ('{"weight_map": {"lm_head.weight": "model-2.safetensors"}}', "names 'model-2.safetensors', which is not"),
    ],
)
def test_bad_safetensors_index_names_the_file(tmp_path, index, message):
    safetensors.torch.save_file({"lm_head.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    (tmp_path / SAFETENSORS_INDEX).write_text(index)
    with pytest.raises(ValueError, match=f"model.safetensors.index.json'.*{message}"):
        HFWeights(tmp_path)


def test_conversions_refuse_an_out_dir_inside_the_source(make_checkpoint, tokenizer_path, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(make_checkpoint("gqa"), src)
    with pytest.raises(ValueError, match=f"output folder '{src / 'hf'}' is .*the source folder '{src}'"):
        convert.to_hf(str(src), str(tokenizer_path), str(src / "hf"))
    hf = convert.to_hf(str(src), str(tokenizer_path), str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=f"output folder '{hf / 'consolidated.00.pth'}' is .*the source folder"):
        convert.from_hf(str(hf), str(hf / "consolidated.00.pth"))
    assert sorted(p.name for p in src.iterdir()) == ["consolidated.00.pth", "params.json"]
    assert not (hf / "consolidated.00.pth").exists()
