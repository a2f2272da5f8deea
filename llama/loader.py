"""Loading a checkpoint folder into a model ready to decode: the body of ``Llama.build``.

Loading flows down one way: the arguments are checked (``llama.checks``, ``llama.distributed``); the tokenizer
file names the generation (``llama.families``); params.json and the shards are read (``llama.weights``, or the
quantized format when the folder is one or ``quantize`` asks for it); the process group starts
(``llama.distributed``); the model is built on its device after its KV cache is known to fit (``llama.model``),
its weights loaded into it, and the fast path wrapped around it if asked for (``llama.engine.fast``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from llama.chat_format import ChatFormat
from llama.checks import check_dtype, check_path, check_positive_int, check_seed
from llama.distributed import (
    available_memory,
    check_device,
    default_device,
    default_dtype,
    default_dtype_scope,
    is_main_process,
    model_parallel_rank,
    setup_model_parallel,
)
from llama.families import Family, family_of, load_tokenizer
from llama.model import ModelArgs, Transformer, kv_cache_bytes, kv_cache_shape
from llama.tokenizer import TokenizerLike
from llama.weights import checkpoint
from llama.weights.layout import check_model_parallel_fit

if TYPE_CHECKING:
    from llama.engine.fast import FastDecoder
    from llama.quant.scheme import Scheme

logger = logging.getLogger(__name__)


@dataclass
class Loaded:
    """What ``Llama`` is made of: the model with its weights, its tokenizer and chat format, the fast path if any."""

    model: Transformer
    tokenizer: TokenizerLike
    formatter: ChatFormat
    fast: Optional[FastDecoder] = None


@dataclass
class Folder:
    """A checkpoint folder and its tokenizer, read and checked before anything of the model's size exists."""

    params: dict[str, Any]  # params.json, less its quantization entry
    shard_paths: list[Path]
    tokenizer: TokenizerLike
    family: Family
    scheme: Optional[Scheme] = None  # the quantization scheme, if the weights are or become quantized
    prequantized: bool = False  # written by ``python -m llama.quantize``


def load(
    ckpt_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    max_seq_len: int,
    max_batch_size: int,
    model_parallel_size: Optional[int] = None,
    seed: int = 1,
    *,
    device: Optional[str | torch.device] = None,
    dtype: Optional[torch.dtype] = None,
    compile: bool = False,
    rope_scaling_factor: Optional[float] = None,
    timeout_s: Optional[float] = None,
    quantize: Optional[str] = None,
) -> Loaded:
    """Load a Meta checkpoint folder and its tokenizer (the arguments are ``Llama.build``'s; see there)."""
    check_path("ckpt_dir", ckpt_dir)
    check_path("tokenizer_path", tokenizer_path)
    max_seq_len = check_positive_int("max_seq_len", max_seq_len)
    max_batch_size = check_positive_int("max_batch_size", max_batch_size)
    seed = check_seed(seed)
    device = check_device(device) if device is not None else default_device()
    dtype = default_dtype(device) if dtype is None else check_dtype(dtype)
    # The files before any process group, so a typo fails fast and clearly.
    folder = read_folder(ckpt_dir, tokenizer_path, quantize)

    mp_size = setup_model_parallel(model_parallel_size, device, timeout_s)
    torch.manual_seed(seed)  # same seed on every rank: they must sample the same tokens

    start = time.time()
    overrides = {"max_seq_len": max_seq_len, "max_batch_size": max_batch_size}
    if rope_scaling_factor is not None:
        overrides["rope_scaling_factor"] = rope_scaling_factor
    args = dataclasses.replace(model_args(folder), **overrides)
    check_model_parallel_fit(args, mp_size, repeat_kv_heads=True, model_cls=folder.family.model_cls)
    check_kv_cache_fits(args, mp_size, device, dtype)
    model = build_model(folder.family, args, mp_size, device, dtype)
    load_weights(model, folder, mp_size, device, dtype)
    if is_main_process():
        logger.info(
            "loaded %s (%s, %d shard(s) on %d rank(s), %s, %s) in %.2f s",
            ckpt_dir, folder.family.name, len(folder.shard_paths), mp_size, device, dtype, time.time() - start,
        )
    fast = None
    if compile:
        from llama.engine.fast import FastDecoder  # only when asked for: it registers the C kernel's operator

        fast = FastDecoder(model)
    return Loaded(model, folder.tokenizer, folder.family.chat_format(folder.tokenizer), fast)


def read_folder(ckpt_dir: str | os.PathLike, tokenizer_path: str | os.PathLike, quantize: Optional[str]) -> Folder:
    """Read params.json, find the shards and open the tokenizer, which names the family; with ``quantize``, or in a
    folder that ``python -m llama.quantize`` wrote, also the quantization scheme."""
    params = checkpoint.read_params(ckpt_dir)
    shard_paths = checkpoint.find_shards(ckpt_dir)
    tokenizer = load_tokenizer(tokenizer_path)
    folder = Folder(params, shard_paths, tokenizer, family_of(tokenizer))
    folder.prequantized = checkpoint.is_quantized(params)
    if quantize is not None or folder.prequantized:
        from llama.weights import quantized as quantization  # only when asked for: it registers its kernels' operators

        folder.params, folder.scheme = quantization.split_params(params, quantize, repr(str(ckpt_dir)))
    return folder


def model_args(folder: Folder) -> ModelArgs:
    """The folder's ModelArgs, its shapes checked against the memory-mapped shards' (no weight is read)."""
    if folder.prequantized:
        from llama.weights import quantized as quantization

        shards = quantization.float_shaped_shards(folder.shard_paths, folder.scheme)
    else:
        shards = [checkpoint.load_shard(p) for p in folder.shard_paths]
    args, _ = checkpoint.fit_params_to_shards(
        folder.params, folder.shard_paths, shards, folder.tokenizer.n_words, folder.family.model_cls
    )
    return args


def load_weights(model: Transformer, folder: Folder, mp_size: int, device: torch.device, dtype: torch.dtype) -> None:
    """Load this rank's slice of the folder's weights into model: float, or quantized (while loading, or as
    written)."""
    if folder.scheme is None:
        checkpoint.load_weights(model, folder.shard_paths, model_parallel_rank(), mp_size, device, dtype)
        return
    from llama.weights import quantized as quantization

    quantization.load_weights(
        model, folder.shard_paths, model_parallel_rank(), mp_size, device, dtype, folder.scheme, folder.prequantized
    )


def build_model(
    family: Family, args: ModelArgs, mp_size: int, device: torch.device, dtype: torch.dtype
) -> Transformer:
    """The family's model for args on device, in dtype (its weights still to be loaded), with its KV cache; a
    MemoryError naming the KV cache's size when the allocator runs out."""
    try:
        with torch.device(device), default_dtype_scope(dtype):
            return family.model_cls(args)
    except RuntimeError as e:  # torch.OutOfMemoryError (CUDA) is one; the CPU allocator's is a plain one
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        raise MemoryError(
            f"{kv_cache_text(args, mp_size, dtype)}; building the model ran out of memory on {device}: "
            f"lower max_seq_len or max_batch_size. torch said: {e}"
        ) from e


def kv_cache_text(args: ModelArgs, mp_size: int, dtype: torch.dtype) -> str:
    """The size of the KV cache that args ask for, and where it comes from."""
    rows, positions, kv_heads, head_dim = kv_cache_shape(args, mp_size)
    ranks = f" on each of the {mp_size} model-parallel ranks" if mp_size > 1 else ""
    return (
        f"max_seq_len={positions} with max_batch_size={rows} needs a KV cache of "
        f"{kv_cache_bytes(args, mp_size, dtype) / 1e9:.3g} GB{ranks} (keys and values: 2 x {args.n_layers} layers "
        f"x {rows} rows x {positions} positions x {kv_heads} KV heads x {head_dim} x {dtype.itemsize} bytes)"
    )


def check_kv_cache_fits(args: ModelArgs, mp_size: int, device: torch.device, dtype: torch.dtype) -> None:
    """ValueError, with the size, when the KV cache that args ask for exceeds what `device` has
    (``llama.distributed.available_memory``): better than the allocator's raw error, or swapping for minutes."""
    have = available_memory(device)
    if have is not None and kv_cache_bytes(args, mp_size, dtype) > have:
        where = "free on this GPU" if device.type == "cuda" else "of physical memory on this host"
        raise ValueError(
            f"{kv_cache_text(args, mp_size, dtype)}, more than the {have / 1e9:.3g} GB {where}; lower max_seq_len "
            "(the longest prompt plus generation you need) or max_batch_size"
        )
