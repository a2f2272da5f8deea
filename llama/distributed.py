"""Process-group, model-parallel and device setup: the one place that talks to torch.distributed."""

from __future__ import annotations

import atexit
import contextlib
import os
from typing import Iterator, Optional

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

# Variables that torchrun (and other launchers) set for every process they start.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA, as the reference; bfloat16 on CPU.

    bfloat16 halves the memory of fp32 (Llama-2-7B needs ~13.5 GB instead of 27 GB, so it fits a 16-24 GB
    laptop), decoding is memory-bound so it is also about twice as fast, and unlike float16 it has fp32's range,
    so CPU kernels without fp16 support and large activations are safe. The fp32 islands (RMSNorm, RoPE,
    softmax, logits) stay fp32 whatever the dtype.
    """
    return torch.float16 if device.type == "cuda" else torch.bfloat16


@contextlib.contextmanager
def default_dtype_scope(dtype: torch.dtype) -> Iterator[None]:
    """Set torch's default dtype for the duration of the block only."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def launched_by_torchrun() -> bool:
    return all(var in os.environ for var in LAUNCHER_VARS)


def setup_model_parallel(model_parallel_size: Optional[int], device: torch.device) -> int:
    """Make sure a process group and fairscale's model-parallel groups exist; return the model-parallel size.

    Under a launcher (torchrun) the group comes from its environment variables. Without one (a notebook, plain
    ``python``) a one-process group is started in memory, so no port or rendezvous is needed. Repeated calls
    reuse what exists, so ``Llama.build`` can run twice in one process.
    """
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if launched_by_torchrun():
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        # We made the group, so we take it down: a gloo group left to interpreter teardown sometimes aborts
        # a rank at exit ("terminate called without an active exception"), failing a finished torchrun job.
        atexit.register(_destroy_process_group)
    world_size = dist.get_world_size()
    if model_parallel_size is None:
        model_parallel_size = world_size
    if not isinstance(model_parallel_size, int) or model_parallel_size < 1 or world_size % model_parallel_size:
        raise ValueError(
            f"model_parallel_size={model_parallel_size!r} must be a positive divisor of the world size "
            f"({world_size}); leave it unset to use one model-parallel rank per process"
        )
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(model_parallel_size)
    elif fs_init.get_model_parallel_world_size() != model_parallel_size:
        raise ValueError(
            f"this process already uses model_parallel_size={fs_init.get_model_parallel_world_size()}; "
            f"cannot switch to {model_parallel_size} in the same process"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return model_parallel_size


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_main(value):
    """Global rank 0's value (any picklable object) on every rank; a no-op with one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def model_parallel_rank() -> int:
    return fs_init.get_model_parallel_rank()


def is_main_process() -> bool:
    """True on global rank 0; before a process group exists, on the process the launcher made rank 0."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", 0)) == 0
