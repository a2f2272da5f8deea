"""python -m llama.reshard: a resharded copy holds exactly the same model (float or quantized), and failures
leave nothing behind."""

import shutil
import subprocess
import sys

import pytest
import torch
from helpers import REPO
from torch.testing import assert_close

from llama import Llama, reshard
from llama.weights import checkpoint, quantized

PROMPTS = ["The quick brown fox", "Llamas live in"]


def assert_same_model(a: Llama, b: Llama) -> None:
    tokens = torch.tensor([a.tokenizer.encode(PROMPTS[0], bos=True, eos=False)])
    assert_close(b.model.forward(tokens, 0), a.model.forward(tokens, 0), rtol=0, atol=0)
    greedy = dict(temperature=0, max_gen_len=8)
    assert b.text_completion(PROMPTS, **greedy) == a.text_completion(PROMPTS, **greedy)


@pytest.mark.parametrize("src_shards, n", [(1, 2), (2, 1), (2, 4)])
def test_reshard_gives_the_same_model(make_checkpoint, tokenizer_path, tmp_path, src_shards, n, build_generator):
    src = make_checkpoint("mha", n_shards=src_shards)
    reshard.main(str(src), str(tmp_path / "out"), n)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [f"consolidated.{r:02d}.pth" for r in range(n)] + ["params.json"]
    assert (out / "params.json").read_bytes() == (src / "params.json").read_bytes()
    # Each new shard is exactly rank r's cut of the full weights.
    layout = checkpoint.open_checkpoint(src).layout
    full = layout.merge_shards([checkpoint.load_shard(p) for p in checkpoint.find_shards(src)])
    for rank, path in enumerate(checkpoint.find_shards(out)):
        shard = torch.load(path, weights_only=True)
        assert shard.keys() == full.keys()
        for key, tensor in shard.items():
            assert torch.equal(tensor, layout.slice_for_rank([full], key, rank, n)), (rank, key)
    assert_same_model(build_generator(src, tokenizer_path), build_generator(out, tokenizer_path))


@pytest.mark.slow
def test_cli_copies_tokenizer_and_shows_progress(make_checkpoint, tokenizer_path, tmp_path, build_generator):
    src = tmp_path / "src"
    shutil.copytree(make_checkpoint("mha", n_shards=2), src)
    shutil.copy(tokenizer_path, src / "tokenizer.model")
    cmd = [sys.executable, "-m", "llama.reshard", "--ckpt_dir", str(src), "--out_dir", str(tmp_path / "out"),
           "--model_parallel_size", "4"]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "reshard [" in result.stderr and "4/4 consolidated.03.pth" in result.stderr
    out = tmp_path / "out"
    assert (out / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
    assert_same_model(build_generator(src, tokenizer_path), build_generator(out, out / "tokenizer.model"))


@pytest.mark.parametrize(
    "n, message",
    [
        (4, r"n_kv_heads=2 not divisible\); use a model-parallel size in \[1, 2\]"),
        (3, r"n_heads=4, n_kv_heads=2, dim=64, vocab_size=512 not divisible"),
        (0, "must be a positive integer"),
        ("2", "must be a positive integer"),
    ],
)
def test_impossible_size_is_refused_before_writing(make_checkpoint, tmp_path, n, message):
    with pytest.raises(ValueError, match=message):
        reshard.reshard(make_checkpoint("gqa"), tmp_path / "out", n)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_nothing(make_checkpoint, tmp_path, monkeypatch):
    real_save, saved = torch.save, []

    def save_then_fail(obj, path, *args, **kwargs):
        if saved:
            raise OSError("disk full")
        saved.append(path)
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        reshard.reshard(make_checkpoint("mha"), tmp_path / "out", 2)
    assert len(saved) == 1 and list(tmp_path.iterdir()) == []  # neither out nor the temporary folder


def test_existing_output_is_refused(make_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        reshard.reshard(make_checkpoint("mha"), tmp_path / "out", 2)
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]


@pytest.mark.parametrize("inside", [".", "consolidated.01.pth", "sub/out"])
def test_out_dir_inside_the_checkpoint_is_refused(make_checkpoint, tmp_path, inside):
    src = tmp_path / "src"
    shutil.copytree(make_checkpoint("mha"), src)
    with pytest.raises(ValueError, match=f"output folder '{src / inside}' is .*the source folder '{src}'"):
        reshard.reshard(src, src / inside, 2)
    assert sorted(p.name for p in src.iterdir()) == ["consolidated.00.pth", "params.json"]


def test_bad_source_is_refused_naming_the_file(make_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(make_checkpoint("mha", n_shards=2), src)
    state = torch.load(src / "consolidated.01.pth", weights_only=True)
    state["layers.0.attention.wq.weight"] = state["layers.0.attention.wq.weight"][:, :32].clone()
    torch.save(state, src / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"consolidated.01.pth.*'layers.0.attention.wq.weight' has shape \(32, 32\)"):
        reshard.reshard(src, tmp_path / "out", 1)
    assert not (tmp_path / "out").exists()


def shard_tensors(folder) -> list[dict[str, torch.Tensor]]:
    return [torch.load(p, weights_only=True) for p in checkpoint.find_shards(folder)]


@pytest.mark.parametrize("mode, group_size, src_shards, n", [("int4", 32, 2, 1), ("int8", 16, 1, 4)])
def test_quantized_checkpoint_reshards_as_it_is(make_checkpoint, tokenizer_path, tmp_path, mode, group_size,
                                                src_shards, n, build_generator):  # fmt: skip
    float_src = make_checkpoint("mha", n_shards=src_shards)
    src = quantized.quantize_checkpoint(float_src, tmp_path / "q", mode, group_size)
    out = reshard.reshard(src, tmp_path / "out", n)
    assert (out / "params.json").read_bytes() == (src / "params.json").read_bytes()  # still quantized
    # Resharding the quantized files is quantizing the resharded float ones: the same bytes, not requantized.
    expected = quantized.quantize_checkpoint(reshard.reshard(float_src, tmp_path / "f", n), tmp_path / "fq", mode,
                                         group_size)  # fmt: skip
    got, want = shard_tensors(out), shard_tensors(expected)
    assert len(got) == n and all(g.keys() == w.keys() for g, w in zip(got, want))
    assert "layers.0.attention.wo.qweight" in got[0] and "layers.0.attention.wo.weight" not in got[0]
    for g, w in zip(got, want):
        for key in w:
            assert g[key].dtype == w[key].dtype and torch.equal(g[key], w[key]), key
    tokens = torch.tensor([[1, 40, 41, 42, 43], [1, 7, 8, 9, 10]])
    assert torch.equal(build_generator(out, tokenizer_path).model.forward(tokens, 0),
                       build_generator(src, tokenizer_path).model.forward(tokens, 0))  # fmt: skip


def test_quantized_reshard_that_would_cut_groups_is_refused_before_writing(make_checkpoint, tmp_path):
    src = quantized.quantize_checkpoint(make_checkpoint("mha"), tmp_path / "q", "int4", 32)
    # wo's 64 inputs in 4 shards are 16 each, half a group; 2 shards hold 32 (and w2's 192 inputs, 96)
    message = (r"'.*q' is a quantized checkpoint \(int4, group 32\), and 4 shards would cut its groups: each would "
               r"hold 16 inputs of layers.0.attention.wo; use a model-parallel size in \[1, 2\], or reshard the "
               r"float checkpoint and quantize the result with python -m llama.quantize")  # fmt: skip
    with pytest.raises(ValueError, match=message):
        reshard.reshard(src, tmp_path / "out", 4)
    assert list(tmp_path.iterdir()) == [src]
    with pytest.raises(ValueError, match=r"vocab_size=512 not divisible\); .* \(int4, group 32\), whose shards must "
                                         r"also hold whole groups: of those, use \[1, 2\]$"):  # fmt: skip
        reshard.reshard(src, tmp_path / "out", 3)
    assert list(tmp_path.iterdir()) == [src]


def test_broken_quantized_checkpoint_is_refused_before_writing(make_checkpoint, tmp_path):
    src = quantized.quantize_checkpoint(make_checkpoint("mha"), tmp_path / "q", "int8", 32)
    shard = torch.load(src / "consolidated.00.pth", weights_only=True)
    del shard["layers.1.feed_forward.w2.scales"]
    torch.save(shard, src / "consolidated.00.pth")
    with pytest.raises(ValueError, match="missing keys: layers.1.feed_forward.w2.scales"):
        reshard.reshard(src, tmp_path / "out", 2)
    assert list(tmp_path.iterdir()) == [src]


def test_progress_line(capsys):
    progress = reshard.ProgressLine("reshard", 4, width=8)
    progress("a/consolidated.00.pth")
    progress("a/consolidated.01.pth")
    assert capsys.readouterr().err.splitlines() == [
        "reshard [##......] 1/4 consolidated.00.pth",
        "reshard [####....] 2/4 consolidated.01.pth",
    ]
