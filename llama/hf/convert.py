"""``to_hf`` and ``from_hf``: a Meta checkpoint folder as a Hugging Face Llama folder, and back.

Each driver checks everything it can before it writes a byte, then writes into a temporary folder that is renamed
at the end (``checkpoint.atomic_output_dir``), so an interrupted run leaves nothing behind. The pieces are in
``llama.hf.config`` (config.json <-> params.json), ``llama.hf.tokenizers`` (the tokenizer files),
``llama.hf.weights`` (the safetensors files) and ``llama.weights.layout`` (names, q/k permutation, rank slices).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from llama.checks import check_positive_int, is_finite_number, parse_dtype
from llama.families import FAMILIES, family_of, load_tokenizer
from llama.hf.config import default_context_length, hf_config, llama3_params, params_from_hf_config, read_json
from llama.hf.tokenizers import read_hf_tokenizer, write_hf_tokenizer_files
from llama.hf.weights import HFWeights, LazyWeight, embeddings_tied, hf_names, plan_files, save_weights
from llama.model import ModelArgs
from llama.weights import checkpoint, quantized
from llama.weights.layout import Layout, check_model_parallel_fit, qk_to_hf


def to_hf(
    ckpt_dir: str,
    tokenizer_path: str,
    out_dir: str,
    max_position_embeddings: Optional[int] = None,
    dtype: Optional[str] = None,
    max_file_gb: float = 5.0,
) -> Path:
    """Write a Meta checkpoint (Llama 2 or 3.x, any number of shards) as a Hugging Face folder that
    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` and ``AutoTokenizer`` load.

    Args:
        ckpt_dir: Meta checkpoint folder (params.json, consolidated.NN.pth).
        tokenizer_path: its tokenizer.model (Llama 2: one folder up; Llama 3: inside it). The file tells the
            generation: SentencePiece for Llama 2, a tiktoken ranks file for Llama 3.
        out_dir: new folder (must not exist): config.json, model*.safetensors, tokenizer files.
        max_position_embeddings: context length written to config.json; default the version's own: Llama 2
            4096, Llama 3 8192, Llama 3.1 and later (scaled RoPE) 131072.
        dtype: float32, float16 or bfloat16; default: the checkpoint's own (bfloat16 for Meta's).
        max_file_gb: largest safetensors file; bigger models get several files and an index. Memory holds
            about one file's worth of weights at a time.
    """
    if not is_finite_number(max_file_gb) or max_file_gb <= 0:
        raise ValueError(f"max_file_gb must be a finite positive number of gigabytes, got {max_file_gb!r}")
    checkpoint.check_out_dir(out_dir, ckpt_dir)
    quantized.refuse_quantized(
        ckpt_dir,
        checkpoint.read_params(ckpt_dir),
        "Hugging Face's Llama folders hold float weights: convert the float checkpoint it was quantized from",
    )
    tokenizer = load_tokenizer(tokenizer_path)
    family = family_of(tokenizer)
    ckpt = checkpoint.open_checkpoint(ckpt_dir, family.model_cls)
    args = ckpt.args
    if tokenizer.n_words != args.vocab_size:
        raise ValueError(
            f"{tokenizer_path!r} has {tokenizer.n_words} pieces but the checkpoint's vocabulary has "
            f"{args.vocab_size} rows; is it the tokenizer of this model?"
        )
    if max_position_embeddings is None:
        max_position_embeddings = default_context_length(family, args)
    max_position_embeddings = check_positive_int("max_position_embeddings", max_position_embeddings)
    keys = [k for k in ckpt.keys if k not in checkpoint.IGNORED_KEYS]
    tied = embeddings_tied(ckpt)
    names = hf_names(keys, tied)
    if tied:  # Llama 3.2 1B/3B: HF keeps one matrix for both, written from the embedding
        keys.remove("output.weight")
    out_dtype = parse_dtype(dtype) or ckpt.shards[0][keys[0]].dtype
    files = plan_files(keys, ckpt.layout.shapes, out_dtype.itemsize, max_file_gb)

    def hf_tensors(file_keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """The weights file_keys whole, in HF's names, q/k layout and the output dtype."""
        inputs = ckpt.remap()  # so the input pages read for one file leave memory with it
        return {
            names[key]: qk_to_hf(key, ckpt.slice_for_rank(inputs, key, 0, 1), args).to(out_dtype).contiguous()
            for key in file_keys
        }

    with checkpoint.atomic_output_dir(out_dir) as tmp:
        save_weights(tmp, files, hf_tensors, checkpoint.ProgressLine("to_hf", len(files)))
        write_hf_tokenizer_files(tokenizer, tokenizer_path, tmp, max_position_embeddings)
        # Llama 3: every stop id (end of text, end of message, end of turn), as HF's Llama 3.1 configs list them,
        # so that HF's generate stops where ours does, for base and instruct models alike.
        eos = tokenizer.stop_ids if len(tokenizer.stop_ids) > 1 else tokenizer.eos_id
        config = hf_config(args, tokenizer.bos_id, eos, out_dtype, max_position_embeddings, tied)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)


def from_hf(hf_dir: str, out_dir: str, model_parallel_size: int = 1, dtype: Optional[str] = None) -> Path:
    """Write a Hugging Face Llama folder (config.json, *.safetensors) as a Meta checkpoint folder.

    A Llama 3.x folder (a byte-level BPE tokenizer.json, or a Llama 3 tokenizer.model) is written in Meta's
    Llama 3 layout: params.json with vocab_size and use_scaled_rope as Meta writes them, the embedding split by
    vocabulary rows, output.weight copied from the embedding when the two are tied, and tokenizer.model (copied,
    or rebuilt from tokenizer.json).

    Args:
        hf_dir: folder with config.json and model.safetensors (or model-*.safetensors and their index).
        out_dir: new folder (must not exist): params.json, consolidated.NN.pth, and tokenizer.model when
            hf_dir has one (or, for Llama 3, a tokenizer.json to make it from).
        model_parallel_size: number of shards to write (Meta's: 1 for 7B and 8B, 2 for 13B, 8 for 70B).
        dtype: float32, float16 or bfloat16; default: the weights' own.
    """
    hf = Path(hf_dir)
    checkpoint.check_out_dir(out_dir, hf)
    config_path = hf / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(config_path)!r} not found: a Hugging Face model folder holds config.json")
    config = read_json(config_path)
    params = params_from_hf_config(config, str(config_path))
    family, ranks_file = read_hf_tokenizer(hf, params)
    weights = HFWeights(hf)
    weights.check_float()  # first: a quantized folder has unexpected names too
    tied = bool(config.get("tie_word_embeddings")) and "lm_head.weight" not in weights.file_of
    try:
        args = ModelArgs.from_params({**params, "vocab_size": 1})  # vocab_size: read from the weights below
    except ValueError as e:
        raise ValueError(f"{str(config_path)!r} is not a valid Llama configuration: {e}") from e
    names = hf_names(Layout.for_args(args, family.model_cls).shapes, tied)
    weights.check_names(names.values())
    vocab_size = weights.shape(names["output.weight"])[0]
    args.vocab_size = vocab_size
    layout = Layout.for_args(args, family.model_cls)
    shapes = {key: weights.shape(name) for key, name in names.items()}
    checkpoint.check_state_dict(shapes, layout.shapes, repr(str(hf)))
    if ranks_file is not None and ranks_file[1] != vocab_size:
        raise ValueError(
            f"{str(hf / 'tokenizer.json')!r} has {ranks_file[1]} tokens but the weights have {vocab_size} "
            "vocabulary rows; is it the tokenizer of this model?"
        )
    if family.model_cls is FAMILIES[1].model_cls:
        params = llama3_params(params, vocab_size)
    model_parallel_size = check_positive_int("model_parallel_size", model_parallel_size)
    check_model_parallel_fit(args, model_parallel_size, model_cls=family.model_cls)
    out_dtype = parse_dtype(dtype)
    n = model_parallel_size

    def meta_slice(shard: dict[str, LazyWeight], key: str, rank: int) -> torch.Tensor:
        # The layout reads only the rank's rows or columns; a weight that every rank holds whole comes back as
        # it is in the shard, unread. Ranks split q/k by whole heads, and the permutation stays inside each
        # head, so a rank's rows can be read in HF's layout and permuted on their own.
        part = layout.slice_for_rank([shard], key, rank, n)
        part = part.read() if isinstance(part, LazyWeight) else part
        tensor = qk_to_hf(key, part, args, parts=n, inverse=True)
        return tensor.to(out_dtype) if out_dtype is not None else tensor

    def shards() -> Iterator[dict[str, torch.Tensor]]:
        for rank in range(n):
            shard = HFWeights(hf).shard(names)  # opened afresh, so the pages read for one shard leave memory with it
            yield {key: meta_slice(shard, key, rank) for key in names}

    tokenizer = hf / "tokenizer.model"
    extra = [tokenizer] if tokenizer.is_file() else []
    # A rebuilt tokenizer.model is written straight into the temporary output folder: a copy anywhere else
    # (the system's temporary folder) would be left behind by a killed run.
    made = {"tokenizer.model": ranks_file[0]} if ranks_file is not None else None
    progress = checkpoint.ProgressLine("from_hf", n)
    return checkpoint.save_checkpoint(out_dir, shards(), params, extra, progress, extra_contents=made)
