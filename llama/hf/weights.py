"""The safetensors weights of a Hugging Face folder: read lazily and checked, or written in files of a bounded size.

Which weight goes where is the layout's (``llama.weights.layout``): its name table and q/k permutation name and
reorder the weights, and its ``Layout.slice_for_rank`` cuts a rank's slice from a Hugging Face folder as it does
from a Meta shard (``HFWeights.shard`` gives it lazy weights to cut). What is Hugging Face's own is here: a folder
stores tied embeddings once (``hf_names``), and its files and their index.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import safetensors
import safetensors.torch
import torch

from llama.hf.config import read_json
from llama.weights import checkpoint
from llama.weights.layout import meta_to_hf_name

SAFETENSORS_INDEX = "model.safetensors.index.json"

# safetensors' names of the float dtypes, which a Meta checkpoint holds as they are.
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}

# An integer dtype of each float's size, to compare floats by their bits.
_BITS_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def hf_names(keys: Iterable[str], tied: bool) -> dict[str, str]:
    """Meta key -> the name of the weight that a Hugging Face folder stores for it.

    With tied embeddings (``tie_word_embeddings``, Llama 3.2 1B and 3B) the folder stores one matrix for the
    embedding and the output layer, under the embedding's name, so output.weight names it too.
    """
    embedding = meta_to_hf_name("tok_embeddings.weight")
    return {key: embedding if tied and key == "output.weight" else meta_to_hf_name(key) for key in keys}


def embeddings_tied(ckpt: checkpoint.Checkpoint) -> bool:
    """Whether output.weight is bit for bit tok_embeddings.weight (Meta's 3.2 1B and 3B store both, equal).

    Compared as raw bits: torch.equal counts -0.0 equal to +0.0, and a tied folder would then lose the sign.
    """
    shapes = ckpt.layout.shapes
    if shapes.get("output.weight") != shapes.get("tok_embeddings.weight"):
        return False
    inputs = ckpt.remap()  # read through a mapping of its own, released on return
    embedding = ckpt.slice_for_rank(inputs, "tok_embeddings.weight", 0, 1)
    output = ckpt.slice_for_rank(inputs, "output.weight", 0, 1)
    if embedding.dtype != output.dtype:
        return False
    bits = _BITS_OF_SIZE[embedding.element_size()]
    return torch.equal(embedding.view(bits), output.view(bits))


# ---------------------------------------------------------------------------------------------------- reading


class LazyWeight:
    """One weight of a safetensors file, read only in the parts asked for: what ``Layout.slice_for_rank`` uses of
    a shard's tensor (``shape``, ``narrow``), so that the layout cuts a rank's slice from it and only that slice
    is read.

    Each part is checked for NaN and inf as it is read, not in a pass of its own (which would read the whole
    model twice): a bad value stops the run, naming the file and the weight.
    """

    def __init__(self, handle: Any, name: str, path: Path):
        self.handle, self.name, self.path = handle, name, path
        self.shape = tuple(handle.get_slice(name).get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        """Elements [start, start + length) along dim, as ``torch.Tensor.narrow``."""
        part = self.handle.get_slice(self.name)[(slice(None),) * dim + (slice(start, start + length),)]
        return self._checked(part)

    def read(self) -> torch.Tensor:
        """The whole weight."""
        return self._checked(self.handle.get_tensor(self.name))

    def _checked(self, tensor: torch.Tensor) -> torch.Tensor:
        if not checkpoint.is_finite(tensor):
            raise ValueError(
                f"{str(self.path)!r}: {self.name!r} holds NaN or inf values, with which the model computes NaN; "
                "the file is damaged, or was saved from a diverged model"
            )
        return tensor


class HFWeights:
    """The weights of a Hugging Face folder, opened lazily (safetensors reads only the slices asked for)."""

    def __init__(self, hf_dir: Path):
        self.folder = hf_dir
        self.handles, self.file_of = {}, {}
        for name in _weight_files(hf_dir):
            path = hf_dir / name
            try:
                handle = safetensors.safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise ValueError(f"cannot read {str(path)!r} (corrupt or truncated?): {e}") from e
            self.handles[name] = handle
            for key in handle.keys():
                if key in self.file_of:  # one of the two would win silently
                    raise ValueError(
                        f"{key!r} is in both {self.file_of[key]!r} and {name!r} in {str(hf_dir)!r}; remove the "
                        "stale file (a folder holds each weight once)"
                    )
                self.file_of[key] = name

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handles[self.file_of[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """safetensors' name of the dtype of weight `name` ("BF16", "F32", "I8", ...), read from the header."""
        return self.handles[self.file_of[name]].get_slice(name).get_dtype()

    def shard(self, names: Mapping[str, str]) -> dict[str, LazyWeight]:
        """The folder as one Meta shard that nothing has been read from: Meta key -> its weight, stored as names
        says (``hf_names``)."""
        return {key: LazyWeight(self.handles[self.file_of[name]], name, self.folder / self.file_of[name])
                for key, name in names.items()}  # fmt: skip

    def check_float(self) -> None:
        """A ValueError naming the file and weight when a weight is not floating point (read from the headers)."""
        for name in sorted(self.file_of):
            dtype = self.dtype(name)
            if dtype in _FLOAT_DTYPES:
                continue
            where = f"{str(self.folder / self.file_of[name])!r}: {name!r} holds {dtype} values"
            if dtype.startswith("F8"):
                raise ValueError(
                    f"{where}: FP8 checkpoints are not supported (their scales would be lost); convert the bf16 "
                    "release of the model"
                )
            raise ValueError(
                f"{where}; weights must be floating point (bfloat16, float16 or float32). A quantized folder (GPTQ, "
                "AWQ, bitsandbytes...) cannot be converted: convert the float release"
            )

    def check_names(self, expected: Iterable[str]) -> None:
        """A ValueError listing the weights missing from the folder and those it holds beyond `expected`."""
        expected = set(expected)
        missing = sorted(n for n in expected if n not in self.file_of)
        unknown = sorted(n for n in self.file_of if n not in expected and not n.endswith("rotary_emb.inv_freq"))
        if missing or unknown:
            raise ValueError(
                f"the weights in {str(self.folder)!r} do not fit its config.json: missing "
                f"{', '.join(missing) or 'none'}; unexpected {', '.join(unknown) or 'none'}"
            )


def _weight_files(hf_dir: Path) -> list[str]:
    """The names of a folder's safetensors files: those its index names (each checked to be a file next to it),
    or without an index, every *.safetensors file."""
    index = hf_dir / SAFETENSORS_INDEX
    if not index.is_file():
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
        if not files:
            found = ", ".join(sorted(p.name for p in hf_dir.glob("*.bin"))) or "none"
            raise FileNotFoundError(
                f"no *.safetensors weights in {str(hf_dir)!r} (pickled *.bin files: {found}); only the "
                "safetensors format is read, as it cannot run code"
            )
        return files
    contents = read_json(index)
    if not isinstance(contents, dict) or not isinstance(contents.get("weight_map"), dict):
        raise ValueError(f"{str(index)!r} must hold a JSON object with a 'weight_map' of weight name -> file name")
    weight_map = contents["weight_map"]
    # Plain names of files next to the index: nothing is read from elsewhere.
    if not all(isinstance(v, str) and v and Path(v).name == v for v in weight_map.values()):
        raise ValueError(f"{str(index)!r}: 'weight_map' must map weight names to file names in its folder")
    files = sorted(set(weight_map.values()))
    for name in files:
        if not (hf_dir / name).is_file():
            raise ValueError(f"{str(index)!r} names {name!r}, which is not in {str(hf_dir)!r}")
    return files


# ---------------------------------------------------------------------------------------------------- writing


def plan_files(
    keys: Sequence[str], shapes: Mapping[str, Sequence[int]], itemsize: int, max_file_gb: float
) -> dict[str, list[str]]:
    """Group keys, in order, into safetensors files of at most max_file_gb each: file name -> keys."""
    limit, groups, size = max_file_gb * 1e9, [[]], 0
    for key in keys:
        nbytes = math.prod(shapes[key]) * itemsize
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": group for i, group in enumerate(groups)}


def save_weights(
    folder: Path,
    files: Mapping[str, Sequence[str]],
    tensors_of: Callable[[Sequence[str]], dict[str, torch.Tensor]],
    progress: Optional[Callable[[str], None]] = None,
) -> None:
    """Write each of `files` (file name -> keys, from ``plan_files``) into folder, holding tensors_of(its keys)
    (Hugging Face name -> tensor), one file at a time; and where there are several, the index naming each
    weight's file."""
    umask = os.umask(0)
    os.umask(umask)
    file_mode = 0o666 & ~umask
    weight_map, total_size = {}, 0
    for name, keys in files.items():
        tensors = tensors_of(keys)
        safetensors.torch.save_file(tensors, folder / name, metadata={"format": "pt"})
        os.chmod(folder / name, file_mode)  # safetensors creates its files private (0600)
        weight_map.update(dict.fromkeys(tensors, name))
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors  # before the next file's are read: they may hold the input's pages
        if progress is not None:
            progress(name)
    if len(files) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
