"""One source for the weight layout, read by loading (``checkpoint``, ``quantized``), resharding (``reshard``) and
conversion (``llama.hf``).

- **Split dimensions** are declared where the weights are defined: each parallel layer of ``llama.model.layers``
  states in ``split_dims`` which of its tensors model-parallel ranks split, and along which dimension
  (ColumnParallelLinear its output rows, RowParallelLinear its input columns, Llama 2's ParallelEmbedding the
  embedding columns, Llama 3's VocabParallelEmbedding the vocabulary rows; a QuantizedLinear the dimension of the
  layer it replaces). A module that declares nothing (the norms) is held whole by every rank. This module only
  reads the declarations, from a model, built on the meta device when there is none yet: a new kind of layer
  declares its own split and needs nothing here (docs/layout.md).
- **Full shapes**: from the model itself, built whole on the meta device (no memory); a model built for one of n
  ranks gives them too, with its split dimensions scaled back up by n.
- **Which model-parallel sizes fit** (``check_model_parallel_fit``): what the layout splits must divide.
- **Meta <-> Hugging Face**: the parameter name table and the q/k row permutation between RoPE pair layouts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Sequence
from unittest import mock

import fairscale.nn.model_parallel.initialize as fs_init
import torch
from fairscale.nn.model_parallel import layers as fs_layers
from torch import nn

from llama.model import ModelArgs, Transformer, ffn_hidden_dim
from llama.model import transformer as model_module
from llama.model.layers import split_dim_of


def block_of(key: str) -> Optional[str]:
    """The transformer block that weight `key` belongs to ("layers.3" for "layers.3.attention.wq.weight"), or None
    for a weight outside the blocks: the model keeps its blocks in the list ``Transformer.layers``, so block i's
    weights are named "layers.i.…"."""
    parts = key.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[0] == "layers" else None


def layer_count(keys: Iterable[str]) -> int:
    """How many transformer blocks the weights named `keys` belong to."""
    return len({block_of(key) for key in keys} - {None})


def structure_args(n_layers: int) -> ModelArgs:
    """The smallest configuration with n_layers blocks: a model built from it has every module, name and split
    dimension of a full-sized one (none of them depends on the sizes), for reading them before the sizes are known."""
    return ModelArgs(
        dim=4, n_layers=max(n_layers, 1), n_heads=1, multiple_of=1, vocab_size=1, max_batch_size=1, max_seq_len=1
    )


@dataclass(frozen=True)
class Layout:
    """Every weight of a model: its full (all-ranks) shape and the dimension ranks split it on."""

    shapes: Mapping[str, tuple[int, ...]]
    split_dims: Mapping[str, Optional[int]]
    # key -> how many consecutive ranks share each slice of it (KV heads on more ranks than there are heads)
    repeats: Mapping[str, int] = dataclasses.field(default_factory=dict)
    # the weights that hold the KV heads (attention's wk and wv): ranks split them by whole heads, and with more
    # ranks than KV heads they share them (``repeats``)
    kv_keys: frozenset[str] = frozenset()

    @classmethod
    def from_model(cls, model: nn.Module, mp_size: Optional[int] = None) -> Layout:
        """The layout of `model` as built for mp_size ranks (default: this process's model-parallel size): every
        tensor of its state dict, with the split its module declares; shapes are one rank's, scaled up along split
        dims (and down by any repeat of KV heads)."""
        if mp_size is None:
            mp_size = fs_init.get_model_parallel_world_size() if fs_init.model_parallel_is_initialized() else 1
        modules = dict(model.named_modules())
        kv_repeats = {}  # the modules that hold KV heads -> on how many ranks each head is repeated
        for module_name, module in modules.items():
            if hasattr(module, "kv_repeats"):  # an Attention, whose wk and wv project to the KV heads
                for proj in ("wk", "wv"):
                    kv_repeats[f"{module_name}.{proj}"] = module.kv_repeats
        shapes, split_dims, repeats = {}, {}, {}
        for key, tensor in model.state_dict(keep_vars=True).items():
            owner, _, name = key.rpartition(".")
            dim = split_dim_of(modules[owner], name)
            repeat = kv_repeats.get(owner, 1)
            shape = list(tensor.shape)
            if dim is not None:
                shape[dim] = shape[dim] * mp_size // repeat
            shapes[key], split_dims[key] = tuple(shape), dim
            if repeat > 1:
                repeats[key] = repeat
        kv_keys = frozenset(key for key in shapes if key.rpartition(".")[0] in kv_repeats)
        return cls(shapes, split_dims, repeats, kv_keys)

    @classmethod
    def for_args(cls, args: ModelArgs, model_cls: type = Transformer) -> Layout:
        """The layout of `model_cls(args)`, from a model built on the meta device (cached per configuration)."""
        # The KV cache's size does not change any weight: build the smallest one.
        small = dataclasses.replace(args, max_batch_size=1, max_seq_len=1)
        return _layout_for(model_cls, tuple(sorted(dataclasses.asdict(small).items())))

    @classmethod
    def for_keys(cls, keys: Iterable[str], model_cls: type = Transformer) -> Layout:
        """The split dims of weights named `keys` (no shapes), for reading shards before their configuration is
        known: those of a model_cls model with as many blocks as the keys name (``structure_args``). A key that
        no such model holds has none."""
        keys = list(keys)
        split_dims = cls.for_args(structure_args(layer_count(keys)), model_cls).split_dims
        return cls({}, {key: split_dims.get(key) for key in keys})

    @classmethod
    def for_shards(cls, shards: Sequence[Mapping[str, torch.Tensor]], model_cls: type = Transformer) -> Layout:
        """The split dims of `shards` as they were written: model_cls's, except for an embedding whose shards
        show the other split (Llama 2 splits it by columns, Llama 3 by vocabulary rows; other tools may not
        follow the generation). The output layer is split by vocabulary rows in both, which tells the two apart.
        """
        layout = cls.for_keys(shards[0], model_cls)
        first = shards[0]
        emb = first.get("tok_embeddings.weight")
        out = first.get("output.weight")
        if len(shards) > 1 and emb is not None and out is not None and emb.ndim == 2:
            layout = cls({}, {**layout.split_dims, "tok_embeddings.weight": 0 if emb.shape == out.shape else 1})
        return layout

    def split_dim(self, key: str) -> Optional[int]:
        """The dimension along which weight `key` is split across model-parallel ranks; None if replicated."""
        return self.split_dims.get(key)

    def check_shards_agree(self, paths: Sequence[Path], shards: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Raise a ValueError naming the file and the key where shards do not fit together.

        Every shard must hold the same keys, each split weight must have its split dimension, and shapes must
        be equal except along that dimension (replicated weights: equal everywhere); no shard may be a copy of
        another (``check_no_copies``).
        """
        first, first_name = shards[0], paths[0].name
        for path, shard in zip(paths, shards):
            if set(shard) != set(first):
                diff = sorted(set(shard) ^ set(first))
                raise ValueError(
                    f"shard {str(path)!r} does not hold the same keys as {first_name}; "
                    f"keys in only one of them: {', '.join(diff)}"
                )
            for key, tensor in shard.items():
                dim = self.split_dim(key)
                if dim is not None and tensor.ndim <= dim:
                    raise ValueError(
                        f"shard {str(path)!r}: {key!r} has shape {tuple(tensor.shape)}, but it must have a "
                        f"dimension {dim} to be split across model-parallel ranks"
                    )
                ref = first[key].shape
                if tensor.ndim != len(ref) or any(
                    a != b for i, (a, b) in enumerate(zip(tensor.shape, ref)) if i != dim
                ):
                    raise ValueError(
                        f"shard {str(path)!r}: {key!r} has shape {tuple(tensor.shape)}, which does not fit "
                        f"{tuple(ref)} in {first_name}"
                    )
        self.check_no_copies(paths, shards)

    def check_no_copies(self, paths: Sequence[Path], shards: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Raise a ValueError naming both files where two shards hold the same slice of a split weight: one is a
        copy of the other (consolidated.00.pth copied over consolidated.01.pth, or added as it), which would load
        as another model or be blamed on the tokenizer.

        Files never hold a slice twice (KV heads repeated over ranks are repeated on loading), so one split weight
        tells: the output layer's where there is one (vocabulary rows, distinct in any trained model). Its first
        row is compared, and the whole slice only where those are equal, so this reads little.
        """
        split = [key for key in shards[0] if self.split_dim(key) is not None and shards[0][key].ndim > 0]
        key = next((k for k in split if k.startswith("output.")), split[0] if split else None)
        if key is None or len(shards) < 2 or any(s[key].device.type == "meta" for s in shards):
            return  # nothing split, one shard, or stand-ins without data (quantized.float_shaped_shards)
        for j in range(1, len(shards)):
            for i in range(j):
                a, b = shards[i][key], shards[j][key]
                same = a.shape == b.shape and a.dtype == b.dtype and a.numel() > 0 and torch.equal(a[0], b[0])
                if same and torch.equal(a, b):
                    raise ValueError(
                        f"{paths[i].name} and {paths[j].name} in {str(paths[j].parent)!r} are copies of each "
                        f"other (both hold the same slice of {key!r}), but each shard must hold its own rank's "
                        "slice: re-download them, or re-create the checkpoint"
                    )

    def merged_shapes(self, shards: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, tuple[int, ...]]:
        """The shape each weight has once the shards are joined (no data is read). Shards must agree."""
        shapes = {}
        for key, tensor in shards[0].items():
            shape = list(tensor.shape)
            dim = self.split_dim(key)
            if dim is not None:
                shape[dim] = sum(s[key].shape[dim] for s in shards)
            shapes[key] = tuple(shape)
        return shapes

    def rank_bounds(self, key: str, size: int, rank: int, world_size: int) -> tuple[int, int]:
        """[lo, hi): the part of the `size` rows/columns of weight `key` that rank `rank` of `world_size` holds."""
        if size % world_size:
            raise ValueError(
                f"weight {key!r} of size {size} along dim {self.split_dim(key)} cannot be split into "
                f"{world_size} parts"
            )
        width = size // world_size
        return rank * width, (rank + 1) * width

    def slice_for_rank(
        self, shards: Sequence[Mapping[str, torch.Tensor]], key: str, rank: int, world_size: int
    ) -> torch.Tensor:
        """Rank `rank`'s slice (of `world_size`) of weight `key`, cut from a checkpoint in len(shards) parts.

        Only the parts of the shards that overlap the slice are read, so with memory-mapped shards a rank
        touches little more than its own slice. The result may be a view of a shard. Where `repeats` says that
        r ranks share a slice (a KV head), rank k gets slice k // r of world_size // r.
        """
        dim = self.split_dim(key)
        if dim is None:
            return shards[0][key]
        repeat = self.repeats.get(key, 1)
        rank, world_size = rank // repeat, world_size // repeat
        sizes = [s[key].shape[dim] for s in shards]
        lo, hi = self.rank_bounds(key, sum(sizes), rank, world_size)
        pieces, offset = [], 0
        for shard, size in zip(shards, sizes):
            a, b = max(lo, offset), min(hi, offset + size)
            if a < b:
                pieces.append(shard[key].narrow(dim, a - offset, b - a))
            offset += size
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)

    def slice_from(
        self, written: Layout, shards: Sequence[Mapping[str, torch.Tensor]], key: str, rank: int, world_size: int
    ) -> torch.Tensor:
        """Rank `rank`'s slice of weight `key` as this layout cuts it, from shards cut as `written` says.

        Where both split the weight alike, only the overlapping parts are read; otherwise (an embedding split
        the other way) the weight is joined whole as written, then cut.
        """
        if written.split_dim(key) == self.split_dim(key):
            return self.slice_for_rank(shards, key, rank, world_size)
        whole = written.slice_for_rank(shards, key, 0, 1)
        return self.slice_for_rank([{key: whole}], key, rank, world_size)

    def split_state_dict(self, state: Mapping[str, torch.Tensor], world_size: int) -> list[dict[str, torch.Tensor]]:
        """Cut a full (one-shard) state dict into world_size model-parallel shards."""
        return [
            {k: self.slice_for_rank([state], k, rank, world_size).clone() for k in state}
            for rank in range(world_size)
        ]

    def merge_shards(self, shards: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Join model-parallel shards back into one full state dict."""
        return {k: self.slice_for_rank(shards, k, 0, 1) for k in shards[0]}


def check_model_parallel_fit(
    args: ModelArgs, mp_size: int, repeat_kv_heads: bool = False, model_cls: type = Transformer
) -> None:
    """Raise a ValueError naming the usable sizes when a model_cls(args) cannot be split over mp_size ranks.

    What must divide follows from the layout: the split dimension of every weight that ranks split (so a new kind of
    layer brings its own), and attention's heads, which ranks split whole. The KV heads' weights follow the KV heads'
    rule instead: repeat_kv_heads lets a running model use more ranks than KV heads (a multiple of them), each KV
    head repeated on several ranks; a checkpoint file cannot (its shards hold each head once).
    """
    layout = Layout.for_args(args, model_cls)
    split = {}  # size -> what errors call it, in the model's order; a size divides or not, whichever weight has it
    for key, dim in layout.split_dims.items():
        if dim is not None and key not in layout.kv_keys:
            size = layout.shapes[key][dim]
            split.setdefault(size, _size_name(args, key, dim, size))

    def fits(n: int) -> bool:
        kv_ok = args.kv_heads % n == 0 or (repeat_kv_heads and n % args.kv_heads == 0)
        return kv_ok and args.n_heads % n == 0 and all(size % n == 0 for size in split)

    if fits(mp_size):
        return
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.kv_heads, **{name: size for size, name in split.items()}}
    bad = [f"{name}={size}" for name, size in sizes.items() if size % mp_size != 0]
    most = args.n_heads if repeat_kv_heads else args.kv_heads
    usable = [n for n in range(1, most + 1) if fits(n)]
    raise ValueError(
        f"the model cannot be split over {mp_size} model-parallel processes ({', '.join(bad)} not divisible); "
        f"use a model-parallel size in {usable}"
    )


def _size_name(args: ModelArgs, key: str, dim: int, size: int) -> str:
    """What an error calls the size of weight `key`'s split dimension `dim`: the width of params.json it equals
    (dim, vocab_size), the FFN hidden size, else the weight's own ("layers.0.attention.wq.weight dim 0")."""
    widths = {"dim": args.dim, "vocab_size": args.vocab_size,
              "ffn hidden size": ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)}  # fmt: skip
    return next((name for name, width in widths.items() if width == size), f"{key} dim {dim}")


_one_rank_lock = threading.Lock()


@contextlib.contextmanager
def _built_as_one_rank() -> Iterator[None]:
    """While active, fairscale's layers (and our model) are built as for one model-parallel rank.

    They read the model-parallel size as they are built, and with more ranks fairscale copies a full master
    weight into each slice, which cannot be done on the meta device. A layout model is a whole model that holds
    no data, so it is built as if this process were the only rank, whatever its group (the command-line tools have
    none). Its RoPE table is left empty: computing one on the meta device runs torch's Python reference ops, whose
    first use imports torch._dynamo (2.6 s of every ``Llama.build``, measured).
    """

    def empty_rotations(dim: int, end: int, *args: object, **kwargs: object) -> torch.Tensor:
        return torch.empty(end, dim // 2, dtype=torch.complex64)

    with _one_rank_lock, mock.patch.object(fs_init, "get_model_parallel_world_size", lambda: 1), \
            mock.patch.object(fs_init, "model_parallel_is_initialized", lambda: True), \
            mock.patch.object(model_module, "precompute_freqs_cis", empty_rotations), \
            mock.patch.object(fs_init, "get_model_parallel_rank", lambda: 0), \
            mock.patch.object(fs_layers, "get_model_parallel_world_size", lambda: 1), \
            mock.patch.object(fs_layers, "get_model_parallel_rank", lambda: 0):  # fmt: skip
        yield


def meta_model(args: ModelArgs, model_cls: type = Transformer) -> nn.Module:
    """A model_cls(args) on the meta device, built as for one rank with the smallest KV cache: the model's
    modules, names and shapes, without memory or data."""
    small = dataclasses.replace(args, max_batch_size=1, max_seq_len=1)
    with _built_as_one_rank(), torch.device("meta"):
        return model_cls(small)


@functools.lru_cache(maxsize=32)
def _layout_for(model_cls: type, args_items: tuple) -> Layout:
    return Layout.from_model(meta_model(ModelArgs(**dict(args_items)), model_cls), mp_size=1)


# ------------------------------------------------------------------------------------- Meta <-> Hugging Face

# Meta name -> Hugging Face name; "{i}" is the layer index.
META_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
HF_TO_META = {hf: meta for meta, hf in META_TO_HF.items()}


def _translate(name: str, table: Mapping[str, str]) -> str:
    layer = re.search(r"layers\.(\d+)\.", name)
    pattern = name.replace(f"layers.{layer.group(1)}.", "layers.{i}.") if layer else name
    if pattern not in table:
        raise KeyError(f"no mapping for parameter {name!r}")
    return table[pattern].format(i=layer.group(1)) if layer else table[pattern]


def meta_to_hf_name(name: str) -> str:
    return _translate(name, META_TO_HF)


def hf_to_meta_name(name: str) -> str:
    return _translate(name, HF_TO_META)


def permute_qk(w: torch.Tensor, n_heads: int, inverse: bool = False) -> torch.Tensor:
    """Reorder the rows of a q or k projection (n_heads * head_dim, dim) between RoPE pair layouts.

    Meta's RoPE rotates adjacent pairs (x[2k], x[2k+1]); Hugging Face rotates the two halves of each head
    (x[k], x[k + head_dim/2]). Forward (Meta -> HF): within each head, rows (0, 1), (2, 3), ... holding pairs
    become rows k and k + head_dim/2. ``inverse=True`` undoes it (HF -> Meta).
    """
    rows, cols = w.shape
    half = rows // n_heads // 2
    if inverse:
        return w.view(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)
    return w.view(n_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)


def qk_to_hf(key: str, tensor: torch.Tensor, args: ModelArgs, parts: int = 1, inverse: bool = False) -> torch.Tensor:
    """Weight `key` (Meta name) in HF's q/k layout (``inverse``: back to Meta's); other weights as they are.

    parts: the tensor is one of `parts` equal slices of whole heads (a rank's rows); the permutation stays
    inside each head, so a slice can be permuted on its own.
    """
    if key.endswith("attention.wq.weight"):
        return permute_qk(tensor, args.n_heads // parts, inverse)
    if key.endswith("attention.wk.weight"):
        return permute_qk(tensor, args.kv_heads // parts, inverse)
    return tensor


def meta_to_hf_state_dict(state: Mapping[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """A full (one-shard) Meta state dict in Hugging Face names and q/k layout (``rope.freqs`` dropped)."""
    return {meta_to_hf_name(k): qk_to_hf(k, t, args) for k, t in state.items() if k != "rope.freqs"}


def hf_to_meta_state_dict(state: Mapping[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """A Hugging Face Llama state dict in Meta names and q/k layout (rotary buffers are dropped)."""
    out = {}
    for name, tensor in state.items():
        if not name.endswith("rotary_emb.inv_freq"):
            key = hf_to_meta_name(name)
            out[key] = qk_to_hf(key, tensor, args, inverse=True)
    return out
