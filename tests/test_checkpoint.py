import pytest
import torch
from conftest import random_model

from llama import checkpoint
from llama.model import check_model_parallel_fit


def test_shard_dims_follow_fairscale_layers():
    assert checkpoint.shard_dim("layers.3.attention.wq.weight") == 0
    assert checkpoint.shard_dim("layers.3.feed_forward.w3.weight") == 0
    assert checkpoint.shard_dim("output.weight") == 0
    assert checkpoint.shard_dim("layers.3.attention.wo.weight") == 1
    assert checkpoint.shard_dim("layers.3.feed_forward.w2.weight") == 1
    assert checkpoint.shard_dim("tok_embeddings.weight") == 1
    assert checkpoint.shard_dim("layers.3.attention_norm.weight") is None
    assert checkpoint.shard_dim("norm.weight") is None
    assert checkpoint.shard_dim("rope.freqs") is None


@pytest.mark.parametrize("n", [2, 4])
def test_split_then_merge_is_exact(tiny_args, n):
    state = random_model(tiny_args("mha", vocab_size=96)).state_dict()
    shards = checkpoint.split_state_dict(state, n)
    assert shards[0]["layers.0.attention.wq.weight"].shape[0] == state["layers.0.attention.wq.weight"].shape[0] // n
    assert shards[1]["tok_embeddings.weight"].shape[1] == state["tok_embeddings.weight"].shape[1] // n
    assert torch.equal(shards[1]["norm.weight"], state["norm.weight"])
    merged = checkpoint.merge_shards(shards)
    assert all(torch.equal(merged[k], state[k]) for k in state)


def test_reslicing_between_shard_counts(tiny_args):
    state = random_model(tiny_args("mha", vocab_size=96)).state_dict()
    two = checkpoint.split_state_dict(state, 2)
    four = checkpoint.split_state_dict(state, 4)
    for key in state:
        for rank in range(4):
            assert torch.equal(checkpoint.slice_for_rank(two, key, rank, 4), four[rank][key])


def test_model_parallel_fit_names_usable_sizes(tiny_args):
    args = tiny_args("gqa", vocab_size=96)  # 4 heads, 2 KV heads
    check_model_parallel_fit(args, 2)
    with pytest.raises(ValueError, match=r"n_kv_heads=2.*use a model-parallel size in \[1, 2\]"):
        check_model_parallel_fit(args, 4)


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
