import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from helpers import REPO, init_random_, random_model
from torch import nn

from llama.model import Transformer, ffn_hidden_dim
from llama.weights import checkpoint
from llama.weights.layout import Layout, check_model_parallel_fit

# The hand-written table the layout replaced: split dim by the last name part before ".weight".
OLD_SPLIT_DIMS = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def old_shard_dim(key):
    parts = key.split(".")
    return OLD_SPLIT_DIMS.get(parts[-2]) if len(parts) >= 2 and parts[-1] == "weight" else None


def old_full_shapes(args):
    """The hand-written full-shape formula the layout replaced."""
    dim, q_dim, kv_dim = args.dim, args.n_heads * args.head_dim, args.kv_heads * args.head_dim
    hidden = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
    vocab = args.vocab_size
    shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    per_layer = {
        "attention.wq": (q_dim, dim), "attention.wk": (kv_dim, dim), "attention.wv": (kv_dim, dim),
        "attention.wo": (dim, q_dim), "feed_forward.w1": (hidden, dim), "feed_forward.w2": (dim, hidden),
        "feed_forward.w3": (hidden, dim), "attention_norm": (dim,), "ffn_norm": (dim,),
    }  # fmt: skip
    for i in range(args.n_layers):
        for name, shape in per_layer.items():
            shapes[f"layers.{i}.{name}.weight"] = shape
    return shapes


@pytest.mark.parametrize("name", ["mha", "gqa", "mqa", "ffn_multiplier", "odd_multiple_of"])
def test_layout_from_the_model_equals_the_table_it_replaces(tiny_args, name):
    args = tiny_args(name, vocab_size=96)
    layout = Layout.for_args(args)
    assert dict(layout.split_dims) == {key: old_shard_dim(key) for key in layout.split_dims}
    assert dict(layout.shapes) == old_full_shapes(args)
    assert layout.split_dim("rope.freqs") is None
    # A built model gives the same layout as the meta-device one.
    assert Layout.from_model(random_model(args)) == layout


@pytest.mark.parametrize("n", [2, 4])
def test_split_then_merge_is_exact(tiny_args, n):
    model = random_model(tiny_args("mha", vocab_size=96))
    state, layout = model.state_dict(), Layout.from_model(model)
    shards = layout.split_state_dict(state, n)
    assert shards[0]["layers.0.attention.wq.weight"].shape[0] == state["layers.0.attention.wq.weight"].shape[0] // n
    assert shards[1]["tok_embeddings.weight"].shape[1] == state["tok_embeddings.weight"].shape[1] // n
    assert torch.equal(shards[1]["norm.weight"], state["norm.weight"])
    merged = layout.merge_shards(shards)
    assert merged.keys() == state.keys() and all(torch.equal(merged[k], state[k]) for k in state)


def test_reslicing_between_shard_counts(tiny_args):
    model = random_model(tiny_args("mha", vocab_size=96))
    state, layout = model.state_dict(), Layout.from_model(model)
    two = layout.split_state_dict(state, 2)
    four = layout.split_state_dict(state, 4)
    for key in state:
        for rank in range(4):
            assert torch.equal(layout.slice_for_rank(two, key, rank, 4), four[rank][key])


def test_model_parallel_fit_names_usable_sizes(tiny_args):
    args = tiny_args("gqa", vocab_size=96)  # 4 heads, 2 KV heads
    check_model_parallel_fit(args, 2)
    with pytest.raises(ValueError, match=r"n_kv_heads=2.*use a model-parallel size in \[1, 2\]"):
        check_model_parallel_fit(args, 4)


class Experts(nn.Module):
    """Llama 4's stacked experts as docs/layout.md describes them: (n_experts, dim, ffn) for w1 and w3, (n_experts,
    ffn, dim) for w2, all split along the expert FFN dimension, which the module declares."""

    split_dims = {"w1": 2, "w2": 1, "w3": 2}

    def __init__(self, n_experts: int, dim: int, ffn: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n_experts, dim, ffn))
        self.w2 = nn.Parameter(torch.randn(n_experts, ffn, dim))
        self.w3 = nn.Parameter(torch.randn(n_experts, dim, ffn))


def with_experts(ffn: int) -> type:
    """A model class whose every block's feed-forward also holds Experts(4, dim, ffn)."""

    class MoETransformer(Transformer):
        def __init__(self, params):
            super().__init__(params)
            for layer in self.layers:
                layer.feed_forward.experts = Experts(4, params.dim, ffn)

    return MoETransformer


def test_a_new_layer_type_declares_its_own_split(tiny_args):
    """The layout, the slicing of shards and the fit check read the split a module declares: a new kind of layer
    (Llama 4's experts) needs no table, regex or rule elsewhere."""
    args = tiny_args("gqa", vocab_size=96)
    model_cls = with_experts(ffn=48)
    layout = Layout.for_args(args, model_cls)
    key = "layers.1.feed_forward.experts"
    assert [layout.split_dim(f"{key}.{w}") for w in ("w1", "w2", "w3")] == [2, 1, 2]
    assert layout.shapes[f"{key}.w1"] == (4, 64, 48) and layout.shapes[f"{key}.w2"] == (4, 48, 64)
    state = init_random_(model_cls(args)).state_dict()
    shards = layout.split_state_dict(state, 2)
    assert shards[1][f"{key}.w1"].shape == (4, 64, 24) and shards[1][f"{key}.w2"].shape == (4, 24, 64)
    assert torch.equal(shards[1][f"{key}.w2"], state[f"{key}.w2"][:, 24:])
    assert all(torch.equal(v, state[k]) for k, v in layout.merge_shards(shards).items())
    check_model_parallel_fit(args, 2, model_cls=model_cls)
    # experts of 33 rows split over no more than one rank, and the error names them
    message = r"\(layers.0.feed_forward.experts.w1 dim 2=33 not divisible\); use a model-parallel size in \[1\]"
    with pytest.raises(ValueError, match=message):
        check_model_parallel_fit(args, 2, model_cls=with_experts(ffn=33))


def test_the_float_checkpoint_reader_knows_nothing_of_quantization():
    """Loading flows down one way: llama.weights.quantized builds on llama.weights.checkpoint, never the reverse;
    a folder is quantized when its params.json says so, and that key is all the float reader knows of it."""
    code = (
        "import sys, llama.weights.checkpoint\n"
        "print(sorted(m for m in sys.modules if m.startswith(('llama.quant', 'llama.weights.quantized'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "[]"


def test_save_checkpoint_is_atomic(tmp_path):
    class Boom:
        def items(self):
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        checkpoint.save_checkpoint(tmp_path / "out", [{"a": torch.zeros(2)}, Boom()], {"dim": 8})
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one is left behind
    out = checkpoint.save_checkpoint(tmp_path / "out", [{"a": torch.zeros(2)}], {"dim": 8})
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "params.json"]
    with pytest.raises(FileExistsError, match="already exists"):
        checkpoint.save_checkpoint(tmp_path / "out", [{"a": torch.zeros(2)}], {"dim": 8})


def test_load_shard_refuses_non_tensor_entries(tmp_path):
    torch.save({"a": torch.zeros(1), "b": 3}, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match="'b' is a int, not a tensor"):
        checkpoint.load_shard(tmp_path / "consolidated.00.pth")
    torch.save([torch.zeros(1)], tmp_path / "consolidated.01.pth")
    with pytest.raises(ValueError, match="must hold a dict of tensors"):
        checkpoint.load_shard(tmp_path / "consolidated.01.pth")


# ---------------------------------------------------------------- loading: memory and bad shards


def mapped_ranges(path) -> list[tuple[int, int]]:
    """Address ranges of this process that map the file at path (from /proc/self/maps)."""
    ranges = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_weights_of_the_right_dtype_are_the_mapped_file_itself(make_checkpoint, tokenizer_path, build_generator):
    ckpt = make_checkpoint("gqa")  # float32 weights
    model = build_generator(ckpt, tokenizer_path, max_seq_len=32, max_batch_size=2).model
    ranges = mapped_ranges(ckpt / "consolidated.00.pth")
    for name, param in model.named_parameters():
        ptr = param.data_ptr()
        assert any(lo <= ptr < hi for lo, hi in ranges), f"{name} was copied"


def test_load_weights_frees_the_constructed_weights(tiny_args, tmp_path):
    args = tiny_args("gqa")
    checkpoint.save_checkpoint(tmp_path / "ckpt", [random_model(args).state_dict()], {})
    model = Transformer(args)
    constructed = [weakref.ref(p) for p in model.parameters()]
    checkpoint.load_weights(model, checkpoint.find_shards(tmp_path / "ckpt"), 0, 1, torch.device("cpu"),
                            torch.bfloat16)  # fmt: skip
    assert all(ref() is None for ref in constructed)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())


def damaged_copy(src, dst, shard: int, change) -> None:
    shutil.copytree(src, dst)
    path = dst / f"consolidated.{shard:02d}.pth"
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("layers.1.ffn_norm.weight"),
         r"consolidated.01.pth' does not hold the same keys as consolidated.00.pth; .*: layers.1.ffn_norm.weight"),
        (lambda s: s.update({"layers.0.attention.wk.weight": torch.zeros(16, 48)}),
         r"consolidated.01.pth': 'layers.0.attention.wk.weight' has shape \(16, 48\), which does not fit \(16, 64\)"),
        (lambda s: s.update({"norm.weight": torch.zeros(65)}),
         r"consolidated.01.pth': 'norm.weight' has shape \(65,\), which does not fit \(64,\)"),
        (lambda s: s.update({"tok_embeddings.weight": torch.zeros(512)}),
         r"consolidated.01.pth': 'tok_embeddings.weight' has shape \(512,\), but it must have a dimension 1"),
    ],
)  # fmt: skip
def test_shards_that_do_not_fit_together_name_the_file_and_key(
    make_checkpoint, tokenizer_path, tmp_path, change, message, build_generator
):
    damaged_copy(make_checkpoint("gqa", n_shards=2), tmp_path / "ckpt", 1, change)
    with pytest.raises(ValueError, match=message):
        build_generator(tmp_path / "ckpt", tokenizer_path, max_seq_len=32, max_batch_size=2)
    with pytest.raises(ValueError, match=message):
        checkpoint.open_checkpoint(tmp_path / "ckpt")


def test_multi_shard_params_mismatch_names_the_keys(make_checkpoint, tokenizer_path, tmp_path, build_generator):
    shutil.copytree(make_checkpoint("gqa", n_shards=2), tmp_path / "ckpt")
    params = json.loads((tmp_path / "ckpt" / "params.json").read_text())
    (tmp_path / "ckpt" / "params.json").write_text(json.dumps({**params, "n_kv_heads": 4}))
    message = r"shape mismatches \(does params.json match the weights\?\): layers.0.attention.wk.weight: checkpoint"
    with pytest.raises(ValueError, match=message):
        build_generator(tmp_path / "ckpt", tokenizer_path, max_seq_len=32, max_batch_size=2)
    with pytest.raises(ValueError, match=message):
        checkpoint.open_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("damage", ["truncate", "empty"])
def test_damaged_second_shard_names_the_file(make_checkpoint, tokenizer_path, tmp_path, damage, build_generator):
    shutil.copytree(make_checkpoint("gqa", n_shards=2), tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3] if damage == "truncate" else b"")
    with pytest.raises(ValueError, match="cannot read checkpoint shard .*consolidated.01.pth"):
        build_generator(tmp_path / "ckpt", tokenizer_path, max_seq_len=32, max_batch_size=2)


def test_open_checkpoint_reads_the_vocabulary_from_the_weights(make_checkpoint, tmp_path):
    ckpt = checkpoint.open_checkpoint(make_checkpoint("gqa", n_shards=2))
    assert ckpt.args.vocab_size == 512 and ckpt.params["vocab_size"] == -1 and len(ckpt.paths) == 2
    shutil.copytree(make_checkpoint("gqa"), tmp_path / "ckpt")
    params = json.loads((tmp_path / "ckpt" / "params.json").read_text())
    (tmp_path / "ckpt" / "params.json").write_text(json.dumps({**params, "vocab_size": 500}))
    with pytest.raises(ValueError, match="params.json' says vocab_size=500, but output.weight has 512 rows"):
        checkpoint.open_checkpoint(tmp_path / "ckpt")


def test_saving_a_slice_writes_only_the_slice(tmp_path):
    big = torch.randn(1000, 100)
    checkpoint.save_checkpoint(tmp_path / "ckpt", [{"a": big[:10], "b": big[:, :5]}], {})
    saved = torch.load(tmp_path / "ckpt" / "consolidated.00.pth", weights_only=True)
    assert torch.equal(saved["a"], big[:10]) and torch.equal(saved["b"], big[:, :5])
    assert (tmp_path / "ckpt" / "consolidated.00.pth").stat().st_size < 30_000  # 24 kB of slices, not 400 kB


# ---------------------------------------------------------------- hostile inputs


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64])
def test_load_shard_refuses_weights_that_are_not_floating_point(tmp_path, dtype):
    torch.save({"norm.weight": torch.ones(4), "output.weight": torch.ones(4, 2, dtype=dtype)}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match=rf"x.pth': 'output.weight' holds {dtype} values; weights must be floating"):
        checkpoint.load_shard(tmp_path / "x.pth")


def test_two_files_for_one_shard_are_refused(make_checkpoint, tmp_path):
    shutil.copytree(make_checkpoint("gqa"), tmp_path / "ckpt")
    shutil.copy(tmp_path / "ckpt" / "consolidated.00.pth", tmp_path / "ckpt" / "consolidated.0.pth")
    with pytest.raises(ValueError, match=r"both consolidated.0.pth and consolidated.00.pth hold shard 0"):
        checkpoint.find_shards(tmp_path / "ckpt")


def test_params_json_without_a_needed_key_names_it(make_checkpoint, tmp_path):
    shutil.copytree(make_checkpoint("gqa"), tmp_path / "ckpt")
    params = json.loads((tmp_path / "ckpt" / "params.json").read_text())
    del params["n_heads"]
    (tmp_path / "ckpt" / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=r"params.json' is not a valid model configuration: .*lacks 'n_heads'"):
        checkpoint.open_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dim": 10**9}, r"gives dim = 1000000000, but the checkpoint has 64 in norm.weight"),
        ({"n_layers": 10**9}, r"gives n_layers = 1000000000, but the checkpoint has 2 layers in its shards"),
        ({"multiple_of": 10**9}, r"gives the FFN size = 1000000000, but the checkpoint has 192 rows"),
        ({"n_heads": 4, "n_kv_heads": 4}, r"layers.0.attention.wk.weight: checkpoint \(32, 64\) vs model \(64, 64\)"),
        ({"norm_eps": float("nan")}, r"not a valid model configuration: .*norm_eps must be a finite"),
    ],
)  # fmt: skip
def test_params_are_compared_with_the_shards_before_any_model_is_made(make_checkpoint, tmp_path, change, message):
    src = make_checkpoint("gqa", n_shards=2)
    params = json.loads((src / "params.json").read_text())
    paths = checkpoint.find_shards(src)
    shards = [checkpoint.load_shard(p) for p in paths]
    checkpoint.fit_params_to_shards(params, paths, shards, 512)
    with pytest.raises(ValueError, match=message):
        checkpoint.fit_params_to_shards({**params, **change}, paths, shards, 512)
    with pytest.raises(ValueError, match=r"the tokenizer has 500 tokens but the checkpoint's output.weight has 512"):
        checkpoint.fit_params_to_shards(params, paths, shards, 500)  # a tokenizer of another model


WRITER = """
import sys, time
from llama.weights import checkpoint
with checkpoint.atomic_output_dir(sys.argv[1]) as tmp:
    (tmp / "consolidated.00.pth").write_bytes(b"half a shard")
    print(tmp, flush=True)
    time.sleep(120)
"""


def start_writer(out_dir):
    """A process that is writing out_dir (in its temporary folder) until it is stopped; and that folder."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


def test_sigterm_while_writing_leaves_nothing(tmp_path):
    proc, tmp = start_writer(tmp_path / "out")
    assert tmp.is_dir() and tmp.parent == tmp_path
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="tells a reused PID by /proc/PID/stat (Linux)")
def test_next_run_removes_the_folders_of_dead_writers_only(tmp_path, caplog):
    killed, killed_tmp = start_writer(tmp_path / "a")
    alive, alive_tmp = start_writer(tmp_path / "b")
    try:
        killed.kill()
        killed.wait(timeout=30)
        assert killed_tmp.is_dir()  # SIGKILL cannot be caught: the writer left its folder
        reused = tmp_path / ".c.tmp-reused"  # a dead writer's folder whose PID now belongs to a live process
        shutil.copytree(alive_tmp, reused)
        marker = json.loads((reused / checkpoint.WRITER_MARKER).read_text())
        (reused / checkpoint.WRITER_MARKER).write_text(json.dumps({**marker, "start_time": marker["start_time"] + 1}))
        unmarked = tmp_path / ".d.tmp-unmarked"  # no marker: whose it is cannot be told, so it stays
        unmarked.mkdir()
        with caplog.at_level(logging.WARNING, logger="llama.weights.checkpoint"):
            with checkpoint.atomic_output_dir(tmp_path / "e") as tmp:
                (tmp / "x").write_text("x")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive_tmp.name, unmarked.name, "e"])
        assert str(killed_tmp) in caplog.text and str(reused) in caplog.text and "no longer running" in caplog.text
        assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["x"]  # the marker does not stay
    finally:
        alive.kill()
        alive.wait(timeout=30)


@pytest.mark.parametrize(
    "error, free",
    [
        (OSError(errno.ENOSPC, "No space left on device"), 10**12),
        (RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"), 0),
        (RuntimeError("basic_ios::clear: iostream error"), 4096),
    ],
)
def test_full_disk_says_so_and_leaves_nothing(tmp_path, monkeypatch, error, free):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "save", fail)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))
    with pytest.raises(OSError, match=rf"no space left on '{tmp_path}' while writing '{tmp_path / 'out'}'") as e:
        checkpoint.save_checkpoint(tmp_path / "out", [{"a": torch.zeros(2)}], {"dim": 8})
    assert e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_write_error_with_free_space_is_left_as_it_is(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("file write failed")

    monkeypatch.setattr(torch, "save", fail)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, 10**12))
    with pytest.raises(RuntimeError, match="^file write failed$"):
        checkpoint.save_checkpoint(tmp_path / "out", [{"a": torch.zeros(2)}], {"dim": 8})
    assert list(tmp_path.iterdir()) == []


def test_out_dir_inside_the_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for out in (ckpt, ckpt / "consolidated.01.pth", ckpt / "a" / ".." / "b"):
        with pytest.raises(ValueError, match=rf"output folder '{out}' is .*the source folder '{ckpt}'"):
            checkpoint.check_out_dir(out, ckpt)
    checkpoint.check_out_dir(tmp_path / "ckpt-mp2", ckpt)
    checkpoint.check_out_dir(tmp_path, ckpt)  # the parent exists, but atomic_output_dir refuses it
