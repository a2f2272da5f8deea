"""Reading and writing Meta-layout checkpoints: ``params.json`` plus ``consolidated.NN.pth`` shards.

Each shard holds one model-parallel rank's slice of every weight. The slice is taken along one dimension per
weight kind (see ``shard_dim``), so any checkpoint can be re-cut for any number of ranks the heads allow.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

# Keys of Meta's checkpoints that carry no parameter of ours (the 7B shards hold precomputed RoPE frequencies).
IGNORED_KEYS = frozenset({"rope.freqs"})

SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth")

# Model-parallel split dimension of each weight kind, by the last part of its name before ".weight".
# ColumnParallelLinear splits its output rows (dim 0); RowParallelLinear and ParallelEmbedding split columns.
_SPLIT_DIMS = {
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
    "wo": 1, "w2": 1, "tok_embeddings": 1,
}  # fmt: skip


def shard_dim(key: str) -> Optional[int]:
    """The dimension along which weight `key` is split across model-parallel ranks; None if replicated."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-1] == "weight":
        return _SPLIT_DIMS.get(parts[-2])
    return None


def read_params(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The contents of ckpt_dir/params.json, with errors that name the file."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {str(ckpt_dir)!r}")
    path = ckpt_dir / "params.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} not found: a Meta checkpoint folder holds params.json next to its shards"
        )
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(params, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(params).__name__}")
    return params


def find_shards(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The shard files consolidated.00.pth, consolidated.01.pth, ... of ckpt_dir, in rank order."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {str(ckpt_dir)!r}")
    found = {}
    for path in ckpt_dir.glob("consolidated.*.pth"):
        match = SHARD_PATTERN.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    if not found:
        raise FileNotFoundError(f"no checkpoint shards (consolidated.NN.pth) in {str(ckpt_dir)!r}")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        names = ", ".join(f"consolidated.{i:02d}.pth" for i in missing)
        raise FileNotFoundError(f"checkpoint {str(ckpt_dir)!r} is incomplete: missing {names}")
    return [found[i] for i in sorted(found)]


def load_shard(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Open one shard lazily (memory-mapped) and safely (tensors only, nothing in the file is executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint shard not found: {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {str(path)!r}: it holds objects other than tensors, which could run code ({e})"
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ValueError(f"cannot read checkpoint shard {str(path)!r} (corrupt or truncated?): {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} must hold a dict of tensors, got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{str(path)!r}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return state


def slice_for_rank(
    shards: Sequence[Mapping[str, torch.Tensor]], key: str, rank: int, world_size: int
) -> torch.Tensor:
    """Rank `rank`'s slice (of `world_size`) of weight `key`, cut from a checkpoint split into len(shards) parts.

    Only the parts of the shards that overlap the slice are read, so with memory-mapped shards a rank touches
    little more than its own slice.
    """
    dim = shard_dim(key)
    if dim is None:
        return shards[0][key]
    sizes = [s[key].shape[dim] for s in shards]
    total = sum(sizes)
    if total % world_size:
        raise ValueError(f"weight {key!r} of size {total} along dim {dim} cannot be split into {world_size} parts")
    width = total // world_size
    lo, hi = rank * width, (rank + 1) * width
    pieces, offset = [], 0
    for shard, size in zip(shards, sizes):
        a, b = max(lo, offset), min(hi, offset + size)
        if a < b:
            pieces.append(shard[key].narrow(dim, a - offset, b - a))
        offset += size
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def check_state_dict(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], source: str
) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped key of `state`."""
    keys = set(state) - IGNORED_KEYS
    missing = sorted(set(expected) - keys)
    unexpected = sorted(keys - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(keys & set(expected))
        if tuple(state[k].shape) != tuple(expected[k])
    ]
    if wrong:
        problems.append("shape mismatches (does params.json match the weights?): " + "; ".join(wrong))
    if problems:
        raise ValueError(f"checkpoint {source} does not fit the model: " + " | ".join(problems))


def load_weights(
    model: torch.nn.Module,
    shard_paths: Sequence[Path],
    rank: int,
    world_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Assign rank `rank`'s slice of the checkpoint's weights to `model`, checking every key and shape.

    Shards are memory-mapped, so only the slices this rank needs are read from disk; tensors are cast and
    moved only where their dtype or device differs.
    """
    shards = [load_shard(p) for p in shard_paths]
    source = str(shard_paths[0].parent)
    for path, shard in zip(shard_paths, shards):
        if set(shard) != set(shards[0]):
            diff = sorted(set(shard) ^ set(shards[0]))
            raise ValueError(f"shard {str(path)!r} does not hold the same keys as the others: {', '.join(diff)}")
    keys = [k for k in shards[0] if k not in IGNORED_KEYS]
    state = {k: slice_for_rank(shards, k, rank, world_size) for k in keys}
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(state, expected, repr(source))
    state = {k: v.to(device=device, dtype=dtype).contiguous() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)


def split_state_dict(state: Mapping[str, torch.Tensor], world_size: int) -> list[dict[str, torch.Tensor]]:
    """Cut a full (one-shard) state dict into world_size model-parallel shards."""
    return [
        {k: slice_for_rank([state], k, rank, world_size).clone() for k in state} for rank in range(world_size)
    ]


def merge_shards(shards: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Join model-parallel shards back into one full state dict."""
    return {k: slice_for_rank(shards, k, 0, 1) for k in shards[0]}


def save_checkpoint(
    out_dir: str | os.PathLike,
    shards: Iterable[Mapping[str, torch.Tensor]],
    params: Mapping[str, Any],
    extra_files: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write shards and params.json as a Meta checkpoint folder.

    Everything goes to a temporary folder next to out_dir that is renamed at the end, so an interrupted write
    leaves no half checkpoint behind. out_dir must not exist yet.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{str(out_dir)!r} already exists; choose a new output folder or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for rank, shard in enumerate(shards):
            torch.save({k: v.contiguous() for k, v in shard.items()}, tmp / f"consolidated.{rank:02d}.pth")
        (tmp / "params.json").write_text(json.dumps(dict(params), indent=2) + "\n")
        for extra in extra_files:
            shutil.copy2(extra, tmp / Path(extra).name)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
