"""Quantized checkpoints, and loading a model quantized: from a float checkpoint, quantized as it loads, or from a
checkpoint that ``python -m llama.quantize`` wrote (the formats: ``llama.quant.scheme``).

A quantized checkpoint holds ``P.qweight`` and ``P.scales`` instead of ``P.weight`` for every linear layer P, and
its params.json says how it was made under the key ``"quantization": {"mode": "int4", "group_size": 32}``;
``Llama.build`` loads it directly, and ``python -m llama.reshard`` re-cuts it as it is (each shard must hold whole
groups). Tools that need float weights (``python -m llama.convert to_hf``, quantizing again) refuse it, naming the
scheme (``refuse_quantized``). Loading one refuses, naming the file and the key, what ``quantize_checkpoint`` never
writes: a missing or float P.weight, a qweight or scales that are not 2-D or do not fit each other, other dtypes,
and scales that are inf, NaN, negative (int8; int4's take either sign) or so large that their weights overflow fp32.

``load_weights`` reads a float checkpoint one tensor at a time from the memory-mapped shards and quantizes each
linear weight as it goes, so the full-precision model is never resident: the shards are mapped afresh for every
block, so the pages read for one block leave the process with it. Under model parallelism each rank quantizes its
own slice; a group never straddles two ranks, so group_size must divide every rank's slice of the inputs.

This module builds on ``llama.weights.checkpoint`` (float folders), which knows nothing of it: a folder is
quantized when its params.json has the key ``checkpoint.QUANTIZATION_KEY``, and whoever wants one opened comes here.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from llama.families import family_of_folder
from llama.model import Transformer
from llama.quant.linear import linear_layers, swap_for_empty
from llama.quant.scheme import DEFAULT_GROUP_SIZE, LARGEST_Q, SCALE_DTYPE, Scheme
from llama.quant.tensor import quantize
from llama.weights import checkpoint
from llama.weights.layout import Layout, block_of, layer_count, meta_model, structure_args

PARAMS_KEY = checkpoint.QUANTIZATION_KEY  # in params.json of a quantized checkpoint


def split_params(
    params: Mapping[str, Any], quantize: Optional[str], source: str = "the checkpoint"
) -> tuple[dict[str, Any], Optional[Scheme]]:
    """params.json without its quantization key, and the scheme to load with: the checkpoint's own if it is
    quantized (`quantize` must then be None or the same mode), else `quantize` (None: no quantization).
    source: the checkpoint, as errors name it."""
    params = dict(params)
    recorded = params.pop(PARAMS_KEY, None)
    if recorded is None:
        return params, None if quantize is None else Scheme(quantize)
    if not isinstance(recorded, Mapping) or set(recorded) != {"mode", "group_size"}:
        raise ValueError(
            f"params.json's {PARAMS_KEY!r} must be an object with 'mode' and 'group_size', got {recorded!r}"
        )
    scheme = Scheme(recorded["mode"], recorded["group_size"])
    if quantize is not None and quantize != scheme.mode:
        raise ValueError(
            f"{source} is already quantized as {scheme.mode} (group {scheme.group_size}); load it with "
            f"quantize=None (no --quantize in the example scripts) or {scheme.mode!r}, or quantize the float "
            f"checkpoint it was made from as {quantize!r}"
        )
    return params, scheme


def refuse_quantized(ckpt_dir: str | os.PathLike, params: Mapping[str, Any], fix: str) -> None:
    """Raise a ValueError saying how it was quantized, and `fix`, when params (ckpt_dir's params.json) are a
    quantized checkpoint's: for the tools that read float weights only."""
    if not checkpoint.is_quantized(params):
        return
    _, scheme = split_params(params, None)
    raise ValueError(f"{str(ckpt_dir)!r} is a quantized checkpoint ({scheme.mode}, group {scheme.group_size}); {fix}")


# ------------------------------------------------------------------------------------- layouts and shards


@functools.lru_cache(maxsize=8)
def linear_names(model_cls: type, n_layers: int) -> tuple[str, ...]:
    """The layers that quantization swaps in a model_cls model with n_layers blocks, in the model's order
    ("layers.0.attention.wq", ..., "output"): those that declare themselves split linear layers, read from a small
    model built on the meta device (``structure_args``)."""
    return tuple(linear_layers(meta_model(structure_args(n_layers), model_cls)))


def quantized_layout(layout: Layout, linears: Sequence[str], scheme: Scheme) -> Layout:
    """The layout of a quantized checkpoint of a model of `layout`: P.qweight and P.scales in place of P.weight
    for every linear layer P, split (and repeated over ranks) as the weight they replace, as QuantizedLinear
    declares. Full shapes where `layout` has them; a linear layer that `layout` lacks (shards missing it) is left
    out."""
    shapes, dims, repeats = dict(layout.shapes), dict(layout.split_dims), dict(layout.repeats)
    kv_keys = set(layout.kv_keys)
    for name in linears:
        weight, qweight, scales = f"{name}.weight", f"{name}.qweight", f"{name}.scales"
        if weight not in dims:
            continue
        dims[qweight] = dims[scales] = dims.pop(weight)
        if weight in repeats:
            repeats[qweight] = repeats[scales] = repeats.pop(weight)
        if weight in kv_keys:
            kv_keys ^= {weight, qweight, scales}
        if weight in shapes:
            n, k = shapes.pop(weight)
            shapes[qweight] = (n, scheme.qweight_columns(k))
            shapes[scales] = (n, k // scheme.group_size)
    return Layout(shapes, dims, repeats, frozenset(kv_keys))


def _load_quantized_shard(path: Path) -> dict[str, torch.Tensor]:
    """Open one shard of a quantized checkpoint memory-mapped and safely (weights_only: tensors only)."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"refusing to load {str(path)!r}: it holds objects other than tensors ({e})") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ValueError(f"cannot read checkpoint shard {str(path)!r} (corrupt or truncated?): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} must hold a dict of tensors")
    return state


def _check_quantized_shard(
    path: Path, shard: Mapping[str, torch.Tensor], scheme: Scheme, linears: frozenset[str]
) -> None:
    """Raise a ValueError naming the file and the key where a shard of a quantized checkpoint is not as
    ``quantize_checkpoint`` writes it: each linear layer P (of `linears`) holds P.qweight and P.scales, never a
    float P.weight; both are 2-D and fit each other (int8 (n, k) or int4's packed uint8 (n, k / 2), and bf16 scales
    (n, k / group_size)); every other weight is a float one (``checkpoint.check_weight_dtype``)."""
    where = f"{str(path)!r} (a quantized checkpoint's shard: {scheme.mode}, group {scheme.group_size})"
    dtypes = {"qweight": scheme.qweight_dtype, "scales": SCALE_DTYPE}
    for key, t in shard.items():
        name, _, kind = key.rpartition(".")
        if kind in dtypes and name in linears:
            if t.ndim != 2:
                raise ValueError(
                    f"{where}: {key!r} has shape {tuple(t.shape)}, but a linear layer's {kind} is 2-D (its rows "
                    "are the layer's outputs): the file is damaged; re-download it or quantize the float checkpoint "
                    "again"
                )
            if t.dtype != dtypes[kind]:
                raise ValueError(
                    f"{where}: {key!r} is {t.dtype}, but the {kind} of an {scheme.mode} checkpoint holds "
                    f"{dtypes[kind]} (does params.json's 'quantization' belong to these shards?)"
                )
            other = f"{name}.{'scales' if kind == 'qweight' else 'qweight'}"
            if other not in shard:
                raise ValueError(
                    f"{where} does not fit the model: missing keys: {other} (next to {key}: a quantized "
                    f"checkpoint holds P.qweight and P.scales for every linear layer P)"
                )
        elif kind == "weight" and name in linears:
            raise ValueError(
                f"{where}: {key!r} is a float weight, but params.json says the checkpoint is quantized, where each "
                f"linear layer holds {name}.qweight and {name}.scales instead (was a float shard copied in?)"
            )
        elif key not in checkpoint.IGNORED_KEYS and kind not in dtypes:
            checkpoint.check_weight_dtype(path, key, t)
    for name in _linears_in(shard, linears):
        q, s = shard[f"{name}.qweight"], shard[f"{name}.scales"]
        inputs = scheme.in_features(q.shape[1])
        if s.shape != (q.shape[0], inputs // scheme.group_size) or inputs % scheme.group_size:
            packed = " (two int4 weights a byte)" if scheme.mode == "int4" else ""
            raise ValueError(
                f"{where}: {name}.qweight {tuple(q.shape)} and {name}.scales {tuple(s.shape)} do not fit together: "
                f"{q.shape[0]} rows of {inputs} inputs{packed} in groups of {scheme.group_size} have scales of "
                f"shape ({q.shape[0]}, {inputs / scheme.group_size:g})"
            )


def _linears_in(shard: Mapping[str, torch.Tensor], linears: frozenset[str]) -> list[str]:
    """The linear layers P (of `linears`) whose P.qweight `shard` holds, in file order."""
    names = (key[: -len(".qweight")] for key in shard if key.endswith(".qweight"))
    return [name for name in names if name in linears]


def _float_shaped(
    shard: Mapping[str, torch.Tensor], scheme: Scheme, linears: frozenset[str]
) -> checkpoint.StandInShard:
    """One quantized shard (checked by ``_check_quantized_shard``) as meta tensors of the float weights it stands
    for: P.qweight and P.scales become P.weight for every linear layer P (of `linears`)."""
    held = set(_linears_in(shard, linears))
    shaped = {}
    for key, t in shard.items():
        name, _, kind = key.rpartition(".")
        if name in held and kind == "qweight":
            shaped[f"{name}.weight"] = torch.empty(t.shape[0], scheme.in_features(t.shape[1]), device="meta")
        elif not (name in held and kind == "scales"):
            shaped[key] = torch.empty(t.shape, dtype=t.dtype, device="meta")

    def stored_as(key: str) -> str:
        name, _, kind = key.rpartition(".")
        return f"{name}.qweight and {name}.scales" if kind == "weight" and name in linears else key

    return checkpoint.StandInShard(shaped, stored_as)


def _open_checked(
    paths: Sequence[Path], scheme: Scheme, model_cls: type
) -> tuple[list[dict[str, torch.Tensor]], list[checkpoint.StandInShard], Layout]:
    """The shards of a quantized checkpoint (memory-mapped), their float stand-ins, and the layout they were cut
    in, once each file is checked (``_check_quantized_shard``), and the shards against each other in the names
    they hold (the same keys, shapes that fit, no shard a copy of another)."""
    shards = [_load_quantized_shard(p) for p in paths]
    linears = frozenset(linear_names(model_cls, layer_count(shards[0])))
    for path, shard in zip(paths, shards):
        _check_quantized_shard(path, shard, scheme, linears)
    stand_ins = [_float_shaped(shard, scheme, linears) for shard in shards]
    written = quantized_layout(Layout.for_shards(stand_ins, model_cls), _linears_in(shards[0], linears), scheme)
    written.check_shards_agree(paths, shards)
    return shards, stand_ins, written


def float_shaped_shards(
    paths: Sequence[Path], scheme: Scheme, model_cls: type = Transformer
) -> list[checkpoint.StandInShard]:
    """The shards of a quantized checkpoint as meta tensors of the float weights they stand for (P.qweight and
    P.scales become P.weight), so that ``checkpoint.fit_params_to_shards`` checks them as any checkpoint, with
    errors that name the keys the files hold. Each file is checked first (``_open_checked``)."""
    return _open_checked(paths, scheme, model_cls)[1]


def _open_quantized_shards(
    paths: Sequence[Path], scheme: Scheme, expected: Layout, model_cls: type
) -> tuple[Layout, list[dict[str, torch.Tensor]]]:
    """The layout a quantized checkpoint's shards were cut in, and the shards (memory-mapped), once checked
    (``_open_checked``) and checked against `expected` (the quantized model's layout, with full shapes): every key
    and shape."""
    shards, _, written = _open_checked(paths, scheme, model_cls)
    _check_against(paths, shards, written, expected)
    return written, shards


def _check_against(paths: Sequence[Path], shards: Sequence[Mapping[str, torch.Tensor]], written: Layout,
                   expected: Layout) -> None:  # fmt: skip
    """Every key and full shape of the shards (cut as `written`) against `expected` (the quantized model's)."""
    checkpoint.check_state_dict(written.merged_shapes(shards), expected.shapes, repr(str(paths[0].parent)))


# ------------------------------------------------------------------------------------- loading


def load_weights(
    model: nn.Module,
    shard_paths: Sequence[Path],
    rank: int,
    world_size: int,
    device: torch.device,
    dtype: torch.dtype,
    scheme: Scheme,
    prequantized: bool = False,
) -> None:
    """``checkpoint.load_weights`` for a quantized model: swap the linear layers for QuantizedLinears, then give
    them rank `rank`'s quantized slice, either quantized here from a float checkpoint one tensor at a time, or
    read from a quantized checkpoint (`prequantized`). Every key and shape is checked, as for float loading.

    From a float checkpoint, the shards are mapped afresh for each block and no float tensor outlives its step
    (the unquantized ones are copied), so the pages of the float weights leave the process as it goes: memory
    stays near the quantized model's size. A quantized checkpoint's tensors are the mapped file itself, as
    float checkpoints' are, except where the layers hold their weights in panels (``QuantizedLinear.panels``, on
    CPUs with AVX2): those are copied into panels, and then every tensor is copied, so that the mapping goes once
    loaded (the 0.85B shape in int8: 0.84 s instead of 0.17 s, peak RSS 2091 MB while loading, 1171 MB after a
    forward either way).
    """
    float_layout = Layout.from_model(model, world_size)  # before the swap: what a float checkpoint holds
    checkpoint.release_parameters(model)
    linears = swap_for_empty(model, scheme, world_size)
    weight_of = {f"{name}.weight": name for name in linears}

    if prequantized:
        model_layout = Layout.from_model(model, world_size)  # P.qweight and P.scales, split as QuantizedLinear says
        written, shards = _open_quantized_shards(shard_paths, scheme, model_layout, type(model))
    else:

        def open_shards() -> list[dict[str, torch.Tensor]]:
            return [checkpoint.load_shard(p) for p in shard_paths]

        model_layout, shards = float_layout, open_shards()
        written = Layout.for_shards(shards, type(model))  # how they were cut (the embedding may differ)
        written.check_shards_agree(shard_paths, shards)
        source = repr(str(shard_paths[0].parent))
        checkpoint.check_state_dict(written.merged_shapes(shards), model_layout.shapes, source)

    def rank_slice(shards: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
        return model_layout.slice_from(written, shards, key, rank, world_size)

    # A model whose layers hold panels (QuantizedLinear.panels) copies its quantized weights out of a quantized
    # checkpoint as it loads them; then its other tensors are copied too, so that no view keeps the file's mapping,
    # and with it the pages those copies were read from, alive (a float checkpoint's always are).
    copy_all = not prequantized or any(model.get_submodule(name).panels for name in linears)
    state: dict[str, torch.Tensor] = {}
    block = None
    for key in [k for k in shards[0] if k not in checkpoint.IGNORED_KEYS]:
        if not prequantized and block_of(key) not in (None, block):
            block = block_of(key)
            shards = open_shards()  # fresh mappings: the pages of the blocks done leave with the old ones
        if key in weight_of:  # a float linear weight: quantize this rank's slice
            name, w = weight_of[key], rank_slice(shards, key)
            try:
                q = quantize(w, scheme, repr(key))
            except ValueError:
                checkpoint.check_finite(key, w, shard_paths, shards)  # names the file if it holds inf or NaN
                raise
            state[f"{name}.qweight"], state[f"{name}.scales"] = (t.to(device) for t in q)
        elif prequantized and key.endswith((".qweight", ".scales")):
            state[key] = rank_slice(shards, key).to(device).contiguous()
            if key.endswith(".scales"):
                _check_scales(key, state[key], scheme, shard_paths, shards)
        else:
            t = rank_slice(shards, key)
            out = t.to(device=device, dtype=dtype).contiguous()
            if copy_all and out.device.type == "cpu" and out.data_ptr() == t.data_ptr():
                out = out.clone()  # no view may keep a shard's mapping alive
            checkpoint.check_finite(key, out, shard_paths, shards)
            state[key] = out
    del shards
    model.load_state_dict(state, strict=True, assign=True)


def _scales_ok(scales: torch.Tensor, scheme: Scheme) -> bool:
    """Whether `scales` are as ``quantize`` writes them: finite, not so large that their weights overflow fp32, and
    for int8 (max|w| / 127) not negative; int4's (m / -8 for m the group's extreme weight) take either sign. Read
    from the smallest and largest scales (NaN propagates to both), in one pass."""
    if scales.numel() == 0:
        return True
    lo, hi = (float(x) for x in torch.aminmax(scales))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return False
    largest_weight = max(-lo, hi) * LARGEST_Q[scheme.mode]
    return largest_weight <= torch.finfo(torch.float32).max and (scheme.mode == "int4" or lo >= 0)


def _check_scales(
    key: str, scales: torch.Tensor, scheme: Scheme, paths: Sequence[Path], shards: Sequence[Mapping[str, torch.Tensor]]
) -> None:
    """Raise a ValueError naming the files and the key where `scales` (a rank's slice of `key`, from `shards`, the
    files `paths`) hold a value ``quantize`` never writes (``_scales_ok``): a damaged file would load without a
    word and generate garbage with NaN log-probabilities."""
    if _scales_ok(scales, scheme):
        return
    flat = scales.flatten().float()
    bad = ~(flat.abs() * LARGEST_Q[scheme.mode] <= torch.finfo(torch.float32).max)  # NaN compares False
    value = flat[(bad | (flat < 0)) if scheme.mode == "int8" else bad][0].item()
    files = [str(p) for p, s in zip(paths, shards) if key in s and not _scales_ok(s[key], scheme)]
    what = "inf, NaN, negative or" if scheme.mode == "int8" else "inf, NaN or"
    raise ValueError(
        f"{', '.join(map(repr, files))}: {key!r} holds the scale {value!r}, which {scheme.mode} quantization never "
        f"writes (scales are never {what} so large that their weights overflow): the file is damaged; re-download "
        "it or quantize the float checkpoint again"
    )


# ------------------------------------------------------------------------------------- quantized checkpoints


@dataclass
class QuantizedCheckpoint(checkpoint.Checkpoint):
    """A checkpoint written by ``quantize_checkpoint``, opened and checked: `args` are those of the float model
    it stands for, and `layout` and `written` hold P.qweight and P.scales in place of every linear layer's
    P.weight (`linears`: the layers P)."""

    scheme: Scheme
    linears: Sequence[str]

    def remap(self) -> list[dict[str, torch.Tensor]]:
        return [_load_quantized_shard(p) for p in self.paths]

    def check_split(self, n_shards: int) -> None:
        """As a float checkpoint's, and each shard must hold whole groups of the layers split by their inputs."""
        usable = []
        for n in range(1, self.args.kv_heads + 1):
            with contextlib.suppress(ValueError):
                super().check_split(n)
                usable += [n] if self._cut_layer(n) is None else []
        if n_shards in usable:
            return
        how = f"{str(self.folder)!r} is a quantized checkpoint ({self.scheme.mode}, group {self.scheme.group_size})"
        try:
            super().check_split(n_shards)
        except ValueError as e:
            raise ValueError(f"{e}; {how}, whose shards must also hold whole groups: of those, use {usable}") from None
        cut = self._cut_layer(n_shards)
        each = self._inputs_per_shard(cut, n_shards)
        raise ValueError(
            f"{how}, and {n_shards} shards would cut its groups: each would hold {each} inputs of {cut}; use a "
            f"model-parallel size in {usable}, or reshard the float checkpoint and quantize the result with "
            "python -m llama.quantize"
        )

    def _inputs_per_shard(self, name: str, n_shards: int) -> int:
        inputs = self.layout.shapes[f"{name}.scales"][1] * self.scheme.group_size
        return inputs // n_shards if self.layout.split_dim(f"{name}.scales") == 1 else inputs

    def _cut_layer(self, n_shards: int) -> Optional[str]:
        """The first linear layer whose groups n_shards shards would cut; None if none would."""
        g = self.scheme.group_size
        return next((name for name in self.linears if self._inputs_per_shard(name, n_shards) % g), None)


def open_quantized_checkpoint(ckpt_dir: str | Path, model_cls: type = Transformer) -> QuantizedCheckpoint:
    """``checkpoint.open_checkpoint`` for a checkpoint written by ``quantize_checkpoint``: its params.json, and
    every key, shape and dtype of its shards, checked as ``Llama.build`` checks them."""
    folder = Path(ckpt_dir)
    params = checkpoint.read_params(folder)
    float_params, scheme = split_params(params, None)
    if scheme is None:
        raise ValueError(f"{str(folder)!r} is not a quantized checkpoint: its params.json has no {PARAMS_KEY!r}")
    paths = checkpoint.find_shards(folder)
    shards, as_float, written = _open_checked(paths, scheme, model_cls)  # each file opened and checked once
    args, float_layout = checkpoint.fit_params_to_shards(float_params, paths, as_float, None, model_cls)
    linears = linear_names(model_cls, args.n_layers)
    layout = quantized_layout(float_layout, linears, scheme)
    _check_against(paths, shards, written, layout)
    return QuantizedCheckpoint(folder, params, args, paths, shards, layout, written, model_cls, scheme, linears)


def quantize_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    mode: str,
    group_size: int = DEFAULT_GROUP_SIZE,
    on_shard_saved: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Write a quantized copy of the float checkpoint in ckpt_dir, with the same shards; return out_dir.

    Each shard quantizes its own slices (so group_size must divide every shard's inputs of each layer), one
    shard at a time from fresh memory maps, as ``llama.reshard`` does; params.json gets the scheme under
    ``"quantization"``, tokenizer.model is copied when the folder has one, and the folder is written atomically
    (``checkpoint.save_checkpoint``).
    """
    scheme = Scheme(mode, group_size)
    out_dir = Path(out_dir)
    checkpoint.check_out_dir(out_dir, ckpt_dir)
    if out_dir.exists():  # fail before reading anything; save_checkpoint checks again
        raise FileExistsError(f"{str(out_dir)!r} already exists; choose a new output folder or remove it")
    refuse_quantized(
        ckpt_dir, checkpoint.read_params(ckpt_dir), "quantize the float checkpoint it was made from instead"
    )
    model_cls = family_of_folder(ckpt_dir).model_cls
    ckpt = checkpoint.open_checkpoint(ckpt_dir, model_cls)
    weight_of = {f"{name}.weight": name for name in linear_names(model_cls, ckpt.args.n_layers)}
    n_shards = len(ckpt.paths)
    for key, name in weight_of.items():
        scheme.check_fits(name, ckpt.shards[0][key].shape[1], n_shards)

    def shards() -> Iterator[dict[str, torch.Tensor]]:
        for rank in range(n_shards):
            shard = ckpt.remap()[rank]  # fresh mappings: the pages read for one shard leave memory with it
            out = {}
            for key, tensor in shard.items():
                if key in weight_of:
                    name = f"{key!r} of {str(ckpt.paths[rank])!r}"
                    out[f"{weight_of[key]}.qweight"], out[f"{weight_of[key]}.scales"] = quantize(tensor, scheme, name)
                else:
                    out[key] = tensor
            yield out

    params = {**ckpt.params, PARAMS_KEY: scheme.to_params()}
    tokenizer = ckpt.folder / "tokenizer.model"
    extra = [tokenizer] if tokenizer.is_file() else []
    return checkpoint.save_checkpoint(out_dir, shards(), params, extra, on_shard_saved)
