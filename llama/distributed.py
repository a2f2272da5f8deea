"""Process-group, model-parallel and device setup: the one place that talks to torch.distributed."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
from datetime import timedelta
from typing import Any, Iterator, Optional

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

from llama.checks import is_finite_number

# Variables that torchrun (and other launchers) set for every process they start.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# How long a collective waits for the other ranks before it fails (torch's own defaults: 30 min for gloo, 10 min for
# NCCL). It must outlast the longest legitimate wait: ranks meet at the first forward's all-reduce, and the weights
# are memory-mapped, so a rank whose shard comes slowly off a cold or network disk arrives late (17 GB, a 70B shard
# on 8 ranks, takes ~3 min at 100 MB/s). 300 s covers that and still ends a job with a stuck rank in 5 minutes.
DEFAULT_TIMEOUT_S = 300.0

# The other ranks' side of broadcast_from_main(..., patient=True): rank 0 is waiting for a person (the chat's next
# line), which has no natural bound. Finite, so a forgotten job still ends one day.
PATIENT_TIMEOUT = timedelta(days=30)

_timeout_s: Optional[float] = None  # the timeout of the groups we made; None while we made none
_patient_group: Optional[Any] = None  # made by start_patient_broadcasts, by every rank at the same call


class CollectiveError(RuntimeError):
    """A collective (broadcast, all-reduce) failed or timed out: another rank stopped answering or died."""


def check_timeout_s(timeout_s: Any) -> float:
    """timeout_s as a float; None means DEFAULT_TIMEOUT_S. ValueError unless a positive finite number."""
    if timeout_s is None:
        return DEFAULT_TIMEOUT_S
    if not is_finite_number(timeout_s) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive finite number of seconds, got {timeout_s!r}")
    return float(timeout_s)


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# The device types the library runs on; others (meta, mps, xla...) fail deep in torch, or build a model that
# computes nothing.
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")


def check_device(device: Any) -> torch.device:
    """device (a str or torch.device) as a torch.device if the library runs on it, else a ValueError that names
    the supported ones: cpu, and cuda or cuda:N for a GPU this process can see."""
    supported = "use 'cpu', 'cuda' or 'cuda:N'"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"device={device!r} is not a device; {supported}") from e
    if parsed.type not in SUPPORTED_DEVICE_TYPES:
        raise ValueError(
            f"device={str(parsed)!r} is not supported: this library runs on CPUs and CUDA GPUs; {supported}"
        )
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={str(parsed)!r}, but this torch has no usable CUDA device; use device='cpu'")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(
                f"device={str(parsed)!r}, but this process sees {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
            )
    return parsed


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes that allocations on `device` can still get: the free memory of a CUDA device, or the physical
    memory of the host (its total: memory that the page cache holds is freed on demand, so what is free now
    says little); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):  # no sysconf (Windows), or no such name on this system
        return None


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


def setup_model_parallel(
    model_parallel_size: Optional[int], device: torch.device, timeout_s: Optional[float] = None
) -> int:
    """Make sure a process group and fairscale's model-parallel groups exist; return the model-parallel size.

    Under a launcher (torchrun) the group comes from its environment variables. Without one (a notebook, plain
    ``python``) a one-process group is started in memory, so no port or rendezvous is needed. Repeated calls
    reuse what exists, so ``Llama.build`` can run twice in one process.

    ``timeout_s`` (default ``DEFAULT_TIMEOUT_S``) bounds every collective of the groups made here: a rank that
    waits longer for the others fails (see ``collective``) instead of blocking. A process group that already
    exists (made by the caller, or by an earlier call) is reused and keeps the timeout it was made with; so do
    fairscale's groups once made. On NCCL the same timeout drives torch's watchdog: with
    ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` (torchrun's default) it aborts a collective that ran past it and ends
    the process with its own "Watchdog caught collective operation timeout" error.
    """
    global _timeout_s
    timeout_s = check_timeout_s(timeout_s)
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if launched_by_torchrun():
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        _timeout_s = timeout_s
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
        # fairscale takes no timeout, and torch gives a new group its backend's default, not the world's; so
        # its calls to torch.distributed.new_group get ours while it runs.
        new_group = dist.new_group
        dist.new_group = lambda *args, **kwargs: new_group(*args, **{"timeout": timeout, **kwargs})
        try:
            fs_init.initialize_model_parallel(model_parallel_size)
        finally:
            dist.new_group = new_group
        _timeout_s = _timeout_s or timeout_s
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


def broadcast_from_main(value, *, patient: bool = False):
    """Global rank 0's value (any picklable object) on every rank; a no-op with one process.

    Raises ``CollectiveError`` naming the ranks and the timeout when another rank does not answer in time.
    ``patient=True`` is for a value rank 0 waits for a person to give (the chat's next line): the other ranks
    then wait up to ``PATIENT_TIMEOUT`` for it, while rank 0 itself still gives up after the usual timeout.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    with collective("broadcast_from_main (rank 0's value to every rank)"):
        group = start_patient_broadcasts() if patient else None
        dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def start_patient_broadcasts():
    """Make (once) the group that ``broadcast_from_main(..., patient=True)`` uses, and return it.

    Every rank must call it at the same point, before rank 0 starts waiting for a person: making a group is a
    collective too, which the other ranks could not wait through. ``chat_loop`` calls it before the first line.
    """
    global _patient_group
    if _patient_group is None and dist.is_initialized() and dist.get_world_size() > 1:
        with collective("making the group for the chat's lines"):
            # Each rank's timeout is its own: the others wait for the person, rank 0 only for the other ranks.
            wait = PATIENT_TIMEOUT if dist.get_rank() else timedelta(seconds=_timeout_s or DEFAULT_TIMEOUT_S)
            _patient_group = dist.new_group(backend="gloo", timeout=wait)  # gloo: no GPU, no NCCL watchdog
    return _patient_group


# Signs that a RuntimeError came from a collective rather than from the computation around it.
_COLLECTIVE_SIGNS = re.compile(r"gloo|nccl|timed out|timeout|connection (?:closed|reset)|peer", re.IGNORECASE)


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective inside the block into a ``CollectiveError`` that says what to do.

    The error names this rank, ``what`` was waited for, the timeout, and the ranks that did not answer: those
    torch's message names, else the other ranks of the job (gloo's "Timed out waiting 5000ms for recv operation"
    names none). Other errors pass through unchanged. Usable as a decorator (the example scripts' ``main``).
    """
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as e:
        if not isinstance(e, dist.DistError) and not _COLLECTIVE_SIGNS.search(str(e)):
            raise
        raise CollectiveError(explain_collective_failure(what, e)) from e


def explain_collective_failure(what: str, error: BaseException) -> str:
    """The message of ``collective``'s CollectiveError for ``error``, raised while waiting on ``what``."""
    text = " ".join(str(error).split())
    me = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    named = sorted({int(r) for r in re.findall(r"\branks?\s*:?\s*\[?(\d+)", text, re.IGNORECASE)} - {me})
    if named:
        who = f"rank(s) {', '.join(map(str, named))} did not answer (as torch's message says)"
    else:
        others = ", ".join(str(r) for r in range(world) if r != me) or "none"
        who = f"torch's message does not say which rank did not answer; this rank was waiting on rank(s) {others}"
    ms = re.search(r"(?:waiting |timeout\(ms\)=)(\d+)\s*(?:ms)?", text, re.IGNORECASE)
    if re.search(r"timed out|timeout", text, re.IGNORECASE):
        seconds = f"{int(ms.group(1)) / 1000:g} s" if ms else (f"{_timeout_s:g} s" if _timeout_s else "its timeout")
        return (
            f"rank {me}: {what} timed out after {seconds}: {who}. A rank that stops answering (a stopped or hung "
            f"process, a stuck node, a debugger) blocks all the others; look at that rank's host and log and "
            f"restart the job. If a step legitimately takes longer (a slow disk), raise the timeout: "
            f"Llama.build(..., timeout_s=...) or --timeout_s. torch said: {text}"
        )
    return (
        f"rank {me}: {what} failed: {who}. Most likely a rank exited or was killed; its own error, in its log, "
        f"says why. torch said: {text}"
    )


def model_parallel_rank() -> int:
    return fs_init.get_model_parallel_rank()


def is_main_process() -> bool:
    """True on global rank 0; before a process group exists, on the process the launcher made rank 0."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", 0)) == 0
