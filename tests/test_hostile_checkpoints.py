"""Hostile checkpoint folders (issue 24, items 7, 8 and 14): poisoned scales and weights, float8 weights, odd
params.json entries, damaged quantized shards and copied shards are refused on load with errors that name the
file, the key and the fix, never loaded into a model that generates garbage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from llama.reshard import reshard
from llama.weights import checkpoint
from llama.weights.quantized import open_quantized_checkpoint, quantize_checkpoint

# The generator size these tests load with (build_generator's defaults allow a bigger batch and longer rows).
SIZE = dict(max_seq_len=32, max_batch_size=1)


def edited_copy(src: Path, dst: Path, shard: int = 0, change: Callable[[dict], None] = lambda s: None,
                params: Callable[[dict], dict] = lambda p: p) -> Path:  # fmt: skip
    """A copy of checkpoint folder src at dst, with change() applied to shard `shard` and params() to params.json."""
    shutil.copytree(src, dst)
    path = dst / f"consolidated.{shard:02d}.pth"
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)
    (dst / "params.json").write_text(json.dumps(params(json.loads((dst / "params.json").read_text()))))
    return dst


def put(key: str, value: float, index=(0, 0)) -> Callable[[dict], None]:
    def change(state: dict) -> None:
        state[key][index] = value

    return change


@pytest.fixture(scope="module")
def quantized(make_checkpoint, tmp_path_factory) -> Callable[..., Path]:
    """Factory: quantized(mode, n_shards) -> a folder written by quantize_checkpoint (cached)."""
    made: dict[tuple, Path] = {}

    def make(mode: str = "int8", n_shards: int = 1) -> Path:
        if (mode, n_shards) not in made:
            out = tmp_path_factory.mktemp("quantized") / f"{mode}-mp{n_shards}"
            made[mode, n_shards] = quantize_checkpoint(make_checkpoint("gqa", n_shards=n_shards), out, mode)
        return made[mode, n_shards]

    return make


# ---------------------------------------------------------------- item 7: poisoned scales and weights


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -3e38])
def test_poisoned_scales_are_refused_naming_the_file_and_key(
    quantized, tokenizer_path, tmp_path, mode, value, build_generator
):
    key = "layers.1.feed_forward.w2.scales"
    bad = edited_copy(quantized(mode, n_shards=2), tmp_path / "bad", 1, put(key, value))
    message = rf"consolidated.01.pth': '{key}' holds the scale .*, which {mode} quantization never writes"
    with pytest.raises(ValueError, match=message) as error:
        build_generator(bad, tokenizer_path, **SIZE)
    assert "consolidated.00.pth" not in str(error.value)  # only the damaged file is named


def test_int4_scales_take_either_sign_and_load(quantized, tokenizer_path, build_generator):
    # int4 scales are m / -8 for m the group's weight of largest magnitude: negative wherever m > 0, so only
    # values that no quantization writes (inf, NaN, or weights that overflow) are refused, not the sign.
    scales = torch.load(quantized("int4") / "consolidated.00.pth", weights_only=True)["output.scales"]
    assert (scales < 0).any() and (scales > 0).any()
    build_generator(quantized("int4"), tokenizer_path, **SIZE)


@pytest.mark.parametrize("key", ["layers.0.attention_norm.weight", "norm.weight", "tok_embeddings.weight"])
@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_inf_or_nan_weights_are_refused_in_float_and_quantized_folders(
    make_checkpoint, quantized, tokenizer_path, tmp_path, key, value, build_generator
):
    # loading reads a weight that every shard holds (a norm) from the first shard, a split one from all of them
    shard, index = (0, (0,)) if key.endswith("norm.weight") else (1, (0, 0))
    float_folder = edited_copy(make_checkpoint("gqa", n_shards=2), tmp_path / "float", shard, put(key, value, index))
    quantized_folder = edited_copy(quantized("int8", n_shards=2), tmp_path / "q", shard, put(key, value, index))
    message = rf"consolidated.0{shard}.pth': '{key}' holds inf or NaN values; the file is damaged: re-download it"
    for folder, quantize in [(float_folder, None), (float_folder, "int4"), (quantized_folder, None)]:
        with pytest.raises(ValueError, match=message):
            build_generator(folder, tokenizer_path, quantize=quantize, **SIZE)


def test_inf_or_nan_in_a_linear_weight_names_the_file_and_key(
    make_checkpoint, tokenizer_path, tmp_path, build_generator
):
    key = "layers.0.attention.wq.weight"
    bad = edited_copy(make_checkpoint("gqa", n_shards=2), tmp_path / "bad", 1, put(key, float("inf")))
    message = rf"consolidated.01.pth': '{key}' holds inf or NaN values"
    for quantize in [None, "int8"]:  # loaded as it is, or quantized while loading
        with pytest.raises(ValueError, match=message):
            build_generator(bad, tokenizer_path, quantize=quantize, **SIZE)
    # python -m llama.quantize: quantize itself names the key and the file
    with pytest.raises(ValueError, match=rf"cannot quantize '{key}' of '.*consolidated.01.pth': it holds inf or NaN"):
        quantize_checkpoint(bad, tmp_path / "out", "int8")
    assert not (tmp_path / "out").exists()


def test_weights_that_overflow_the_dtype_asked_for_are_refused(
    make_checkpoint, tokenizer_path, tmp_path, build_generator
):
    bad = edited_copy(make_checkpoint("gqa"), tmp_path / "big", 0, put("norm.weight", 1e6, (0,)))
    build_generator(bad, tokenizer_path, dtype=torch.float32, **SIZE)  # finite in the file and in fp32
    with pytest.raises(ValueError, match="'norm.weight' of .* holds values beyond the range of torch.float16"):
        build_generator(bad, tokenizer_path, dtype=torch.float16, **SIZE)


# ---------------------------------------------------------------- item 8: float8 weights


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_weights_are_refused(make_checkpoint, quantized, tokenizer_path, tmp_path, dtype, build_generator):
    def to_fp8(key: str) -> Callable[[dict], None]:
        def change(state: dict) -> None:
            state[key] = state[key].to(dtype)

        return change

    message = (rf"consolidated.00.pth': '{{key}}' holds {dtype} values: FP8 checkpoints are not supported .*"
               r"download the model's bf16 release instead")  # fmt: skip
    key = "layers.0.attention.wq.weight"
    fp8 = edited_copy(make_checkpoint("gqa"), tmp_path / "fp8", 0, to_fp8(key))
    for quantize in [None, "int8"]:
        with pytest.raises(ValueError, match=message.format(key=key)):
            build_generator(fp8, tokenizer_path, quantize=quantize, **SIZE)
    with pytest.raises(ValueError, match=message.format(key=key)):
        reshard(fp8, tmp_path / "out", 2)
    key = "layers.0.ffn_norm.weight"
    fp8_norm = edited_copy(quantized("int8"), tmp_path / "fp8q", 0, to_fp8(key))
    with pytest.raises(ValueError, match=message.format(key=key)):
        build_generator(fp8_norm, tokenizer_path, **SIZE)


def test_other_weight_dtypes_name_the_dtype_file_and_key(make_checkpoint, tokenizer_path, tmp_path, build_generator):
    def cast(key: str, dtype: torch.dtype) -> Callable[[dict], None]:
        def change(state: dict) -> None:
            state[key] = state[key].to(dtype)

        return change

    double = edited_copy(make_checkpoint("gqa"), tmp_path / "f64", 0, cast("norm.weight", torch.float64))
    with pytest.raises(ValueError, match=r"'norm.weight' holds torch.float64 values; weights must be bfloat16, "
                                         r"float16 or float32"):  # fmt: skip
        build_generator(double, tokenizer_path, **SIZE)
    ints = edited_copy(make_checkpoint("gqa"), tmp_path / "int", 0, cast("output.weight", torch.int16))
    with pytest.raises(ValueError, match=r"consolidated.00.pth': 'output.weight' holds torch.int16 values"):
        build_generator(ints, tokenizer_path, **SIZE)


def test_a_folder_with_fp8_scales_is_an_fp8_checkpoint(make_checkpoint, tokenizer_path, tmp_path, build_generator):
    folder = edited_copy(make_checkpoint("gqa"), tmp_path / "fp8")
    torch.save({"0_feed_forward.w1_0": torch.ones(1)}, folder / "fp8_scales_0.pt")
    message = r"'.*fp8' is an FP8 checkpoint \(it holds fp8_scales_0.pt\): FP8 checkpoints are not supported"
    with pytest.raises(ValueError, match=message):
        build_generator(folder, tokenizer_path, **SIZE)
    with pytest.raises(ValueError, match=message):
        checkpoint.open_checkpoint(folder)


# ---------------------------------------------------------------- item 14: unclear errors


def test_quantization_null_in_params_json_means_not_quantized(
    make_checkpoint, tokenizer_path, tmp_path, build_generator
):
    folder = edited_copy(make_checkpoint("gqa"), tmp_path / "null", params=lambda p: {**p, "quantization": None})
    tokens = torch.tensor([[1, 40, 41, 42]])
    expected = build_generator(make_checkpoint("gqa"), tokenizer_path, **SIZE).model.forward(tokens, 0)
    assert torch.equal(build_generator(folder, tokenizer_path, **SIZE).model.forward(tokens, 0), expected)
    # the tools that refuse quantized folders read it as a float one too (an AttributeError before)
    quantize_checkpoint(folder, tmp_path / "q", "int8")
    reshard(folder, tmp_path / "two", 2)
    assert torch.equal(build_generator(tmp_path / "two", tokenizer_path, **SIZE).model.forward(tokens, 0), expected)
    assert checkpoint.read_params(folder).get("quantization", "absent") == "absent"


@pytest.mark.parametrize("shape", [(-1,), (1, 64, -1)])
def test_a_qweight_of_the_wrong_rank_names_key_shape_and_rank(
    quantized, tokenizer_path, tmp_path, shape, build_generator
):
    key = "layers.0.attention.wq.qweight"

    def reshape(state: dict) -> None:
        state[key] = state[key].reshape(shape)

    bad = edited_copy(quantized("int8"), tmp_path / "bad", 0, reshape)
    got = tuple(torch.load(bad / "consolidated.00.pth", weights_only=True)[key].shape)
    message = rf"consolidated.00.pth' .*'{key}' has shape {re_shape(got)}, but a linear layer's qweight is 2-D"
    with pytest.raises(ValueError, match=message):
        build_generator(bad, tokenizer_path, **SIZE)
    with pytest.raises(ValueError, match=message):
        reshard(bad, tmp_path / "out", 2)


def re_shape(shape: tuple) -> str:
    return str(shape).replace("(", r"\(").replace(")", r"\)")


def drop(*keys: str) -> Callable[[dict], None]:
    def change(state: dict) -> None:
        for key in keys:
            del state[key]

    return change


def wrong_rows(name: str) -> Callable[[dict], None]:
    def change(state: dict) -> None:  # a consistent pair standing for a weight with half the rows
        for part in ("qweight", "scales"):
            state[f"{name}.{part}"] = state[f"{name}.{part}"][: state[f"{name}.{part}"].shape[0] // 2].clone()

    return change


P = "layers.1.attention.wk"


@pytest.mark.parametrize(
    "change, message",
    [
        (drop(f"{P}.qweight", f"{P}.scales"), rf"missing keys: {P}.qweight and {P}.scales"),
        (drop(f"{P}.qweight"), rf"missing keys: {P}.qweight \(next to {P}.scales"),
        (drop(f"{P}.scales"), rf"missing keys: {P}.scales \(next to {P}.qweight"),
        (drop("output.qweight", "output.scales"), r"missing keys: output.qweight and output.scales"),
        (wrong_rows(P), rf"{P}.qweight and {P}.scales: checkpoint \(16, 64\) vs model \(32, 64\)"),
    ],
)  # fmt: skip
def test_errors_about_a_quantized_folder_name_the_keys_it_holds(
    quantized, tokenizer_path, tmp_path, change, message, build_generator
):
    bad = edited_copy(quantized("int4"), tmp_path / "bad", 0, change)
    for load in [lambda: build_generator(bad, tokenizer_path, **SIZE), lambda: open_quantized_checkpoint(bad)]:
        with pytest.raises(ValueError, match=message) as error:
            load()
        assert ".weight" not in str(error.value).replace("norm.weight", "")  # no key that is not in the folder


def test_a_float_weight_in_a_quantized_folder_is_named(
    quantized, make_checkpoint, tokenizer_path, tmp_path, build_generator
):
    float_shard = torch.load(make_checkpoint("gqa") / "consolidated.00.pth", weights_only=True)

    def swap(state: dict) -> None:
        del state[f"{P}.qweight"], state[f"{P}.scales"]
        state[f"{P}.weight"] = float_shard[f"{P}.weight"]

    bad = edited_copy(quantized("int8"), tmp_path / "bad", 0, swap)
    message = rf"'{P}.weight' is a float weight, but params.json says the checkpoint is quantized, where each linear"
    with pytest.raises(ValueError, match=message):
        build_generator(bad, tokenizer_path, **SIZE)


def copy_shard(folder: Path, src: int, dst: int) -> None:
    shutil.copyfile(folder / f"consolidated.{src:02d}.pth", folder / f"consolidated.{dst:02d}.pth")


def test_a_shard_copied_over_another_is_named(make_checkpoint, quantized, tokenizer_path, tmp_path, build_generator):
    message = (r"consolidated.00.pth and consolidated.01.pth in '.*' are copies of each other \(both hold the "
               r"same slice of 'output.{part}'\), but each shard must hold its own rank's slice: "
               r"re-download them")  # fmt: skip
    over = edited_copy(make_checkpoint("gqa", n_shards=2), tmp_path / "over")
    copy_shard(over, 0, 1)  # loaded as another model before, without a word
    # a one-shard folder with its shard copied as a second one: blamed on the tokenizer before
    added = edited_copy(make_checkpoint("gqa"), tmp_path / "added")
    copy_shard(added, 0, 1)
    for folder in [over, added]:
        with pytest.raises(ValueError, match=message.format(part="weight")):
            build_generator(folder, tokenizer_path, **SIZE)
        with pytest.raises(ValueError, match=message.format(part="weight")):
            reshard(folder, tmp_path / "out", 1)
    q_over = edited_copy(quantized("int8", n_shards=2), tmp_path / "q_over")
    copy_shard(q_over, 0, 1)
    with pytest.raises(ValueError, match=message.format(part="qweight")):
        build_generator(q_over, tokenizer_path, **SIZE)
    with pytest.raises(ValueError, match=message.format(part="qweight")):
        reshard(q_over, tmp_path / "out", 1)
    assert not (tmp_path / "out").exists()


def test_scales_that_do_not_fit_their_qweight_name_both(quantized, tokenizer_path, tmp_path, build_generator):
    name = "layers.0.feed_forward.w2"

    def cut(state: dict) -> None:
        state[f"{name}.scales"] = state[f"{name}.scales"][:, :-1].clone()  # one group too few

    bad = edited_copy(quantized("int8"), tmp_path / "bad", 0, cut)
    message = rf"{name}.qweight \(.*\) and {name}.scales \(.*\) do not fit together"
    with pytest.raises(ValueError, match=message):
        build_generator(bad, tokenizer_path, **SIZE)
    with pytest.raises(ValueError, match=message):
        reshard(bad, tmp_path / "out", 2)
