import pytest
import torch

from llama.distributed import is_main_process, setup_model_parallel
from llama.engine import fast


def test_model_parallel_size_cannot_change_in_a_process():
    assert setup_model_parallel(1, torch.device("cpu")) == 1  # the session's group is reused
    with pytest.raises(ValueError, match="must be a positive divisor"):
        setup_model_parallel(2, torch.device("cpu"))


def test_is_main_process_uses_the_group_rank():
    assert is_main_process()  # rank 0 of the session's one-process group


def test_fast_path_refuses_model_parallelism(tiny_args, monkeypatch):
    from llama.model import Transformer

    model = Transformer(tiny_args("gqa"))
    monkeypatch.setattr(fast.fs_init, "get_model_parallel_world_size", lambda: 2)
    with pytest.raises(ValueError, match="one model-parallel rank"):
        fast.FastDecoder(model, compile=False)


def test_is_main_process_before_the_group_exists_asks_the_launcher(monkeypatch):
    import llama.distributed as distributed

    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
    monkeypatch.delenv("RANK")
    assert is_main_process()  # plain python: the only process
