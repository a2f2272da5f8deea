"""Hostile folders and arguments for python -m llama.convert (issue 24, items 10 and 14): from_hf refuses what it
cannot convert faithfully, naming the file and key, leaves nothing behind, and writes no file outside the
output's temporary folder; to_hf checks max_file_gb first and ties embeddings only when they are bit for bit
equal."""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import params_json, random_model

from llama import convert
from llama.hf.weights import SAFETENSORS_INDEX
from llama.weights import checkpoint
from llama.weights.layout import Layout

BYTES = [bytes([b]) for b in range(256)]
MERGED = [b"th", b"the", b" t", b" the", b"ab", b"he"]  # each the join of two earlier tokens
N_WORDS = len(BYTES + MERGED) + 256  # ranks and Llama 3's special tokens: 518, split in two by rows


@pytest.fixture(scope="module")
def folders(tmp_path_factory, make_checkpoint, tokenizer_path) -> Path:
    """hf2: to_hf of a tiny Llama 2 checkpoint. hf3: to_hf of a tiny checkpoint with a small Llama 3 ranks file
    (the 256 bytes and a few merges), without its tokenizer.model, so that from_hf rebuilds it from
    tokenizer.json. ranks.model: that ranks file."""
    root = tmp_path_factory.mktemp("hostile_convert")
    convert.to_hf(str(make_checkpoint("gqa")), str(tokenizer_path), str(root / "hf2"))
    ranks = root / "ranks.model"
    ranks.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % rank for rank, t in enumerate(BYTES + MERGED)))
    meta3 = make_checkpoint("gqa", vocab_size=N_WORDS)
    convert.to_hf(str(meta3), str(ranks), str(root / "hf3"))
    (root / "hf3" / "tokenizer.model").unlink()
    return root


def copy(folders: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folders / name, tmp_path / name))


def rewrite_weights(hf: Path, change) -> None:
    state = safetensors.torch.load_file(hf / "model.safetensors")
    change(state)
    safetensors.torch.save_file(state, hf / "model.safetensors", metadata={"format": "pt"})


def assert_nothing_written(tmp_path: Path, *kept: str) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)  # no output, no hidden temporary folder


# -- weights --


@pytest.mark.parametrize(
    "dtype, message",
    [
        (torch.int8, "holds I8 values; weights must be floating point"),
        (torch.int64, "holds I64 values; weights must be floating point"),
        (torch.bool, "holds BOOL values; weights must be floating point"),
        (torch.float8_e4m3fn, "holds F8_E4M3 values: FP8 checkpoints are not supported"),
    ],
)
def test_from_hf_refuses_weights_that_are_not_float(folders, tmp_path, dtype, message):
    hf = copy(folders, "hf2", tmp_path)
    key = "model.layers.1.self_attn.o_proj.weight"
    rewrite_weights(hf, lambda state: state.update({key: state[key].to(dtype)}))
    with pytest.raises(ValueError, match=f"model.safetensors'?: '{key}' {message}"):
        convert.from_hf(str(hf), str(tmp_path / "meta"))
    assert_nothing_written(tmp_path, "hf2")


def test_from_hf_names_the_dtype_of_a_quantized_folder_first(folders, tmp_path):
    # A GPTQ-style tensor is also a name the config does not explain; its dtype says more.
    hf = copy(folders, "hf2", tmp_path)
    key = "model.layers.0.self_attn.q_proj.qzeros"
    rewrite_weights(hf, lambda state: state.update({key: torch.zeros(2, 8, dtype=torch.int32)}))
    with pytest.raises(ValueError, match=f"'{key}' holds I32 values; .* A quantized folder .* cannot be converted"):
        convert.from_hf(str(hf), str(tmp_path / "meta"))
    assert_nothing_written(tmp_path, "hf2")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("model_parallel_size", [1, 2])
def test_from_hf_refuses_nan_and_inf_weights(folders, tmp_path, bad, model_parallel_size):
    hf = copy(folders, "hf2", tmp_path)
    key = "model.layers.1.mlp.down_proj.weight"

    def poison(state):
        state[key][-1, -1] = bad  # in the last rank's part

    rewrite_weights(hf, poison)
    with pytest.raises(ValueError, match=f"model.safetensors'?: '{key}' holds NaN or inf values"):
        convert.from_hf(str(hf), str(tmp_path / "meta"), model_parallel_size=model_parallel_size)
    assert_nothing_written(tmp_path, "hf2")


def test_from_hf_refuses_a_weight_in_two_files(folders, tmp_path):
    hf = copy(folders, "hf2", tmp_path)
    shutil.copy(hf / "model.safetensors", hf / "model-old.safetensors")  # a stale file left next to the new one
    with pytest.raises(ValueError, match="'lm_head.weight' is in both 'model-old.safetensors' and 'model.safetensors'"):
        convert.from_hf(str(hf), str(tmp_path / "meta"))
    assert_nothing_written(tmp_path, "hf2")


def test_from_hf_refuses_a_weight_in_two_indexed_files(folders, tmp_path):
    hf = copy(folders, "hf2", tmp_path)
    state = safetensors.torch.load_file(hf / "model.safetensors")
    names = sorted(state)
    first, second = names[: len(names) // 2], names[len(names) // 2 - 1 :]  # one name in both
    safetensors.torch.save_file({k: state[k] for k in first}, hf / "model-00001-of-00002.safetensors")
    safetensors.torch.save_file({k: state[k] for k in second}, hf / "model-00002-of-00002.safetensors")
    (hf / "model.safetensors").unlink()
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in second[1:]})
    (hf / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ValueError, match=f"'{first[-1]}' is in both 'model-00001-of-00002.safetensors' and"):
        convert.from_hf(str(hf), str(tmp_path / "meta"))
    assert_nothing_written(tmp_path, "hf2")


# -- tokenizer.json --


def write_tokenizer_json(hf: Path, contents) -> None:
    (hf / "tokenizer.json").write_text(json.dumps(contents, ensure_ascii=False), encoding="utf-8")


def read_tokenizer_json(hf: Path) -> dict:
    return json.loads((hf / "tokenizer.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("contents", [[], None, {"version": "1.0", "model": None}, {"version": "1.0"}, "BPE"])
def test_from_hf_refuses_a_tokenizer_json_without_a_model(folders, tmp_path, contents):
    # Skipped before: the folder was written in Llama 2's layout, without a tokenizer.model.
    hf = copy(folders, "hf3", tmp_path)
    write_tokenizer_json(hf, contents)
    with pytest.raises(ValueError, match="tokenizer.json' is not a tokenizer.json of Hugging Face's tokenizers"):
        convert.from_hf(str(hf), str(tmp_path / "meta"))
    assert_nothing_written(tmp_path, "hf3")


@pytest.mark.parametrize(
    "keep, message",
    [
        (lambda merges: [], r"its merges lack 't' \+ 'h', the pair tiktoken joins into token 'th' \(id 256\), and 5 "),
        (lambda merges: merges[:3] + merges[4:], r"its merges lack 'Ġ' \+ 'the', .* token 'Ġthe' \(id 259\), and 0 "),
    ],
    ids=["none", "one missing"],
)
def test_from_hf_refuses_merges_that_tokenize_otherwise(folders, tmp_path, keep, message):
    hf = copy(folders, "hf3", tmp_path)
    contents = read_tokenizer_json(hf)
    contents["model"]["merges"] = keep(contents["model"]["merges"])
    write_tokenizer_json(hf, contents)
    with pytest.raises(ValueError, match=message):
        convert.from_hf(str(hf), str(tmp_path / "meta"))
    assert_nothing_written(tmp_path, "hf3")


@pytest.mark.parametrize(
    "merges, message",
    [
        (["th"], r"merge 0 is 'th'; each merge must be two tokens"),
        (["t h e"], r"merge 0 is 't h e'; each merge must be two tokens"),
        ([["t", "h"], ["th"]], r"merge 1 is \['th'\]; each merge must be two tokens"),
        ([["t", "h", "e"]], r"merge 0 is \['t', 'h', 'e'\]"),
        ([["t", 5]], r"merge 0 is \['t', 5\]"),
        ([1], r"merge 0 is 1;"),
        ([None], r"merge 0 is None;"),
        (None, r"the BPE model's 'merges' must be a list, got NoneType"),
        ({"t": "h"}, r"the BPE model's 'merges' must be a list, got dict"),
    ],
)
def test_from_hf_refuses_malformed_merges(folders, tmp_path, merges, message):
    hf = copy(folders, "hf3", tmp_path)
    contents = read_tokenizer_json(hf)
    contents["model"]["merges"] = merges
    write_tokenizer_json(hf, contents)
    with pytest.raises(ValueError, match="tokenizer.json: " + message):
        convert.from_hf(str(hf), str(tmp_path / "meta"))
    assert_nothing_written(tmp_path, "hf3")


def test_from_hf_refuses_malformed_added_tokens(folders, tmp_path):
    hf = copy(folders, "hf3", tmp_path)
    contents = read_tokenizer_json(hf)
    contents["added_tokens"][3]["id"] = [1]
    write_tokenizer_json(hf, contents)
    with pytest.raises(ValueError, match="'added_tokens' must be a list of objects with a str 'content' and an int"):
        convert.from_hf(str(hf), str(tmp_path / "meta"))


def test_from_hf_writes_no_file_outside_the_output_folder(folders, tmp_path, monkeypatch):
    # A run killed outright leaves whatever it wrote. The tokenizer.model rebuilt from tokenizer.json was written
    # to /tmp/from_hf-XXXX, which nothing removed; now it goes into the output's own temporary folder.
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    parent = tmp_path / "out"
    seen = []  # what the system's temporary folder and the output's parent hold while the shards are written
    save_checkpoint = checkpoint.save_checkpoint

    def watched_save_checkpoint(out_dir, shards, *args, **kwargs):
        def watched():
            for shard in shards:
                seen.append((sorted(os.listdir(system_tmp)), len(os.listdir(parent))))
                yield shard

        return save_checkpoint(out_dir, watched(), *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", watched_save_checkpoint)
    meta = convert.from_hf(str(folders / "hf3"), str(parent / "meta"), model_parallel_size=2)
    assert seen == [([], 1), ([], 1)]  # only the output's temporary folder
    assert os.listdir(system_tmp) == [] and os.listdir(parent) == ["meta"]
    assert (meta / "tokenizer.model").read_bytes() == (folders / "ranks.model").read_bytes()
    assert json.loads((meta / "params.json").read_text())["vocab_size"] == N_WORDS


# -- to_hf --


@pytest.mark.parametrize("bad", ["x", "5", 0, -1, float("nan"), float("inf"), True, None])
def test_to_hf_checks_max_file_gb_first(make_checkpoint, tokenizer_path, tmp_path, bad):
    message = rf"max_file_gb must be a finite positive number of gigabytes, got {bad!r}"
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        convert.to_hf(str(make_checkpoint("gqa")), str(tokenizer_path), str(tmp_path / "hf"), max_file_gb=bad)
    with pytest.raises(ValueError, match="max_file_gb must be"):  # before any work: the folder is not even opened
        convert.to_hf(str(tmp_path / "missing"), str(tmp_path / "missing.model"), str(tmp_path / "hf"), max_file_gb=bad)
    assert_nothing_written(tmp_path)


def test_to_hf_ties_only_bitwise_equal_embeddings(tiny_args, tokenizer_path, tmp_path):
    args = tiny_args("gqa", vocab_size=512)
    model = random_model(args)
    with torch.no_grad():
        model.tok_embeddings.weight[3, 5] = 0.0
        model.output.weight.copy_(model.tok_embeddings.weight)
    layout = Layout.from_model(model)

    def to_hf(name: str) -> tuple[dict, dict]:
        meta = checkpoint.save_checkpoint(tmp_path / f"meta-{name}", layout.split_state_dict(model.state_dict(), 1),
                                          params_json(args))  # fmt: skip
        hf = convert.to_hf(str(meta), str(tokenizer_path), str(tmp_path / f"hf-{name}"))
        return json.loads((hf / "config.json").read_text()), safetensors.torch.load_file(hf / "model.safetensors")

    config, weights = to_hf("equal")
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in weights
    with torch.no_grad():
        model.output.weight[3, 5] = -0.0  # torch.equal counts it equal to +0.0
    config, weights = to_hf("signed-zero")
    assert config["tie_word_embeddings"] is False
    assert torch.signbit(weights["lm_head.weight"][3, 5])
    assert not torch.signbit(weights["model.embed_tokens.weight"][3, 5])
