"""Conversion between Meta's checkpoint folders and Hugging Face ``transformers``' Llama folders.

The whole difference in the weights is data, kept in ``llama.weights.layout``: a table of parameter names, and one
permutation of the q/k projection rows. This module reads and writes the folders (config.json, safetensors,
tokenizer files) around them.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import safetensors
import safetensors.torch
import torch

from llama.checks import check_positive_int, is_finite_number, parse_dtype
from llama.families import FAMILIES, Family, family_of, load_tokenizer
from llama.model import ModelArgs, check_model_parallel_fit, ffn_hidden_dim
from llama.reshard import ProgressLine
from llama.tokenizer import Llama3Tokenizer, Tokenizer, TokenizerLike, parse_ranks, read_ranks
from llama.weights import checkpoint
from llama.weights.layout import Layout, meta_to_hf_name, qk_to_hf

# `python -m llama.convert` executes this file as __main__: hand over to the one llama.convert module before
# this copy defines anything, so nothing is defined twice (see commandline.run_module).
if __name__ == "__main__":
    from llama.commandline import run_module

    run_module("llama.convert", "to_hf", "from_hf")

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- whole folders

SAFETENSORS_INDEX = "model.safetensors.index.json"


# Llama 3.1's RoPE scaling as Meta's code fixes it (llama.model.scale_rope_frequencies); only the factor varies.
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def default_context_length(family: Family, args: ModelArgs) -> int:
    """The context length Meta gives each version: Llama 2 4096, Llama 3 8192, 3.1 and later (scaled RoPE)
    131072."""
    if args.use_scaled_rope:
        return 131072
    return 8192 if family.model_cls is FAMILIES[1].model_cls else 4096


def hf_config(
    args: ModelArgs,
    bos_id: int,
    eos_id: int | Sequence[int],
    dtype: torch.dtype,
    max_position_embeddings: int,
    tie_word_embeddings: bool = False,
) -> dict:
    """The config.json of Hugging Face's LlamaForCausalLM for a model of `args` (vocab_size must be set).

    Only the fields that transformers 4.x and 5.x both read are written (rope_theta, rope_scaling, torch_dtype),
    so either loads it. eos_id may be a list: every id that ends a generated answer.
    """
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier),
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
    }
    if args.use_scaled_rope:  # without it HF would compute another model
        factor = 8.0 if args.rope_scaling_factor is None else float(args.rope_scaling_factor)
        config["rope_scaling"] = {"rope_type": "llama3", "factor": factor, **LLAMA3_ROPE_FIXED}
    config.update({
        "vocab_size": args.vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id if isinstance(eos_id, int) else list(eos_id),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    })  # fmt: skip
    return config


# (multiple_of, ffn_dim_multiplier) of Meta's released models, tried first when recovering params.json.
KNOWN_FFN_PARAMS = [(256, None), (4096, 1.3), (1024, 1.3), (4096, 1.2), (256, 1.5), (256, 1.0)]


def ffn_params_for(dim: int, intermediate_size: int) -> tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) with which ``ffn_hidden_dim`` gives exactly intermediate_size.

    Tried in order: the values of Meta's released models; the smallest power of two as multiple_of; multiple_of
    = intermediate_size (which works when it is at least the unscaled 8*dim/3); and for a smaller size, a
    multiplier with multiple_of 1. Many pairs give the same size, so a Meta -> HF -> Meta round trip returns
    the original pair only when it is the first one found here; the model is the same either way.
    """
    candidates = list(KNOWN_FFN_PARAMS)
    candidates += [(2**k, None) for k in range(intermediate_size.bit_length())]
    candidates.append((intermediate_size, None))
    base = int(2 * (4 * dim) / 3)
    ratio = intermediate_size / base
    candidates += [(1, round(ratio, digits)) for digits in range(1, 8)] + [(1, (intermediate_size + 0.5) / base)]
    for multiple_of, multiplier in candidates:
        if ffn_hidden_dim(dim, multiple_of, multiplier) == intermediate_size:
            return multiple_of, multiplier
    raise ValueError(f"no (multiple_of, ffn_dim_multiplier) gives intermediate_size={intermediate_size} for dim={dim}")


def _config_int(config: Mapping[str, Any], field: str, source: str) -> int:
    value = config[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{source}: {field!r} must be a positive integer, got {value!r}")
    return value


def _config_float(config: Mapping[str, Any], field: str, source: str) -> float:
    value = config[field]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
        raise ValueError(f"{source}: {field!r} must be a finite positive number, got {value!r}")
    return float(value)


def params_from_hf_config(config: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """Meta's params.json for a Hugging Face Llama config.json; a ValueError for features Llama 2 lacks."""
    if not isinstance(config, Mapping):
        raise ValueError(f"{source} must hold a JSON object, got {type(config).__name__}")
    rope_parameters = config.get("rope_parameters")
    rope_parameters = {} if rope_parameters is None else rope_parameters
    if not isinstance(rope_parameters, Mapping):
        raise ValueError(f"{source}: 'rope_parameters' must be an object, got {type(rope_parameters).__name__}")
    if config.get("model_type") != "llama":
        raise ValueError(f"{source}: model_type is {config.get('model_type')!r}; only 'llama' can be converted")
    unsupported = {
        "attention_bias": bool(config.get("attention_bias")),
        "mlp_bias": bool(config.get("mlp_bias")),
        "hidden_act": config.get("hidden_act", "silu") != "silu",
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(f"{source}: {', '.join(bad)} not supported by Meta's Llama layout")
    scaling_factor = llama3_rope_factor(config, rope_parameters, source)
    try:
        dim, n_heads = _config_int(config, "hidden_size", source), _config_int(config, "num_attention_heads", source)
        n_layers = _config_int(config, "num_hidden_layers", source)
        intermediate = _config_int(config, "intermediate_size", source)
    except KeyError as e:
        raise ValueError(f"{source} lacks {e.args[0]!r}") from e
    if config.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"{source}: head_dim {config['head_dim']!r} != hidden_size / num_attention_heads")
    # Absent or null: as LlamaConfig, one KV head per head, its default epsilon, RoPE base 10000.
    n_kv_heads = n_heads
    if config.get("num_key_value_heads") is not None:
        n_kv_heads = _config_int(config, "num_key_value_heads", source)
    norm_eps = _config_float(config, "rms_norm_eps", source) if "rms_norm_eps" in config else 1e-6
    if "rope_theta" in config:
        rope_theta = _config_float(config, "rope_theta", source)
    elif "rope_theta" in rope_parameters:
        rope_theta = _config_float(rope_parameters, "rope_theta", f"{source}: rope_parameters")
    else:
        rope_theta = 10000.0
    multiple_of, multiplier = ffn_params_for(dim, intermediate)
    params: dict[str, Any] = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads}
    if n_kv_heads != n_heads:
        params["n_kv_heads"] = n_kv_heads
    params["multiple_of"] = multiple_of
    if multiplier is not None:
        params["ffn_dim_multiplier"] = multiplier
    params["norm_eps"] = norm_eps
    params["rope_theta"] = rope_theta
    params["vocab_size"] = -1  # as Meta writes Llama 2's: the tokenizer decides (from_hf writes Llama 3's size)
    if scaling_factor is not None:
        params["use_scaled_rope"] = True
        if scaling_factor != 8.0:  # Meta's code hard-codes 8; another factor needs our optional key
            params["rope_scaling_factor"] = scaling_factor
    return params


def llama3_rope_factor(config: Mapping[str, Any], rope_parameters: Mapping[str, Any], source: str) -> Optional[float]:
    """The factor of a config's Llama 3.1 RoPE scaling (``rope_scaling`` of transformers 4.x, ``rope_parameters``
    of 5.x); None without scaling. Other kinds of scaling, or other values of the parameters that Meta's code
    fixes, are refused: Meta's model cannot compute them."""
    def kind_of(scaling: Mapping[str, Any]) -> Any:
        return scaling.get("rope_type", scaling.get("type", "default"))  # "type": older transformers' name

    scaling = config.get("rope_scaling")
    if scaling is None and kind_of(rope_parameters) != "default":
        scaling = rope_parameters
    if not scaling:
        return None
    if not isinstance(scaling, Mapping):
        raise ValueError(f"{source}: 'rope_scaling' must be an object, got {type(scaling).__name__}")
    kind = kind_of(scaling)
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(
            f"{source}: RoPE scaling of type {kind!r} is not supported; Meta's Llama layout has only Llama 3.1's "
            "('llama3') scaling, or none"
        )
    for field, value in LLAMA3_ROPE_FIXED.items():
        if field in scaling and scaling[field] != value:
            raise ValueError(
                f"{source}: llama3 RoPE scaling with {field}={scaling[field]!r} is not supported; Meta's model "
                f"fixes it at {value!r}"
            )
    if "factor" not in scaling:
        raise ValueError(f"{source}: llama3 RoPE scaling lacks 'factor'")
    return _config_float(scaling, "factor", f"{source}: rope scaling")


def sentencepiece_model_type(serialized: bytes) -> int:
    """trainer_spec.model_type of a serialized SentencePiece ModelProto: 1 unigram, 2 BPE, 3 word, 4 char.

    A few lines of protobuf wire format (ModelProto field 2 is trainer_spec, TrainerSpec field 3 is model_type),
    so that no protobuf package is needed.
    """

    def varint(buf: bytes, pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = buf[pos]
            value |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if byte < 0x80:
                return value, pos

    def fields(buf: bytes) -> Iterator[tuple[int, Any]]:
        pos = 0
        while pos < len(buf):
            key, pos = varint(buf, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, pos = varint(buf, pos)
            elif wire == 2:
                size, pos = varint(buf, pos)
                value, pos = buf[pos : pos + size], pos + size
            elif wire in (1, 5):
                size = 8 if wire == 1 else 4
                value, pos = buf[pos : pos + size], pos + size
            else:
                raise ValueError(f"unexpected protobuf wire type {wire}")
            yield number, value

    for number, value in fields(serialized):
        if number == 2:
            return next((v for n, v in fields(value) if n == 3), 1)  # model_type defaults to UNIGRAM
    return 1


def _bos_post_processor(bos: str, bos_id: int) -> dict[str, Any]:
    """tokenizers' post-processor that puts the BOS token `bos` (id bos_id) before each sequence, as Llama does."""
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
        ],  # fmt: skip
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def tokenizer_json(tokenizer: Tokenizer) -> Optional[dict[str, Any]]:
    """A ``tokenizers`` tokenizer.json for a SentencePiece BPE model such as Llama's; None for other models.

    transformers 5 turns a bare tokenizer.model into its fast tokenizer only with protobuf installed; with this
    file next to it, AutoTokenizer needs neither. SentencePiece's BPE joins, at each step, the adjacent pair whose
    joined piece scores highest; a merge list ordered by the joined piece's score does the same.
    """
    sp = tokenizer.sp_model
    if sentencepiece_model_type(sp.serialized_model_proto()) != 2:
        return None
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    special = [i for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i)]
    normal = [i for i in range(len(pieces)) if not (i in special or sp.is_byte(i) or sp.is_unused(i))]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    mergeable = {pieces[i] for i in normal}
    merges = []
    for i in sorted(normal, key=lambda i: -sp.get_score(i)):  # best first; sorted() keeps id order for ties
        piece = pieces[i]
        merges += [[piece[:j], piece[j:]] for j in range(1, len(piece)) if {piece[:j], piece[j:]} <= mergeable]
    bos, unk = pieces[tokenizer.bos_id], pieces[sp.unk_id()]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": pieces[i], "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i in special
        ],  # fmt: skip
        # As SentencePiece with Llama's settings: "▁" before the text (add_dummy_prefix), and for every space.
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": _bos_post_processor(bos, tokenizer.bos_id),
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": vocab, "merges": merges,
        },  # fmt: skip
    }


def write_hf_tokenizer(tokenizer: Tokenizer, tokenizer_path: str | os.PathLike, out_dir: Path, max_length: int) -> None:
    """Copy tokenizer.model into out_dir with the tokenizer_config.json (and tokenizer.json) that HF reads."""
    sp = tokenizer.sp_model
    shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": sp.id_to_piece(tokenizer.bos_id),
        "eos_token": sp.id_to_piece(tokenizer.eos_id),
        "unk_token": sp.id_to_piece(sp.unk_id()),
        "pad_token": None,  # Llama has no padding piece
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    fast = tokenizer_json(tokenizer)
    if fast is None:
        logger.warning("%s is not a BPE model: wrote no tokenizer.json (HF then needs protobuf)", tokenizer_path)
    else:
        (out_dir / "tokenizer.json").write_text(json.dumps(fast, ensure_ascii=False) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------ Llama 3 tokenizer files


def byte_level_alphabet() -> list[str]:
    """The character that stands for each byte value in a byte-level BPE vocabulary (GPT-2's convention, which
    ``tokenizers``' ByteLevel uses): printable Latin-1 bytes stand for themselves; the other 68 byte values take
    the characters from U+0100 on, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    alphabet, extra = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + extra))
            extra += 1
    return alphabet


def bpe_split(token: bytes, ranks: Mapping[bytes, int]) -> Optional[tuple[bytes, bytes]]:
    """The two tokens that tiktoken joins last when it encodes the bytes of `token` by merging alone; None when
    that does not end in `token` (tiktoken then gives it only for a whole pre-tokenized piece).

    Merging inside a span never depends on the text around it, so wherever tiktoken forms `token`, it forms it
    from this pair. (The pair whose larger rank is smallest is not always this pair.)
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, where = None, -1
        for i in range(len(parts) - 1):  # the lowest-ranked joined pair, leftmost on ties, as tiktoken
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best is None or rank < best):
                best, where = rank, i
        if best is None:
            return None
        parts[where : where + 2] = [parts[where] + parts[where + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 and parts[0] + parts[1] in ranks else None


def llama3_tokenizer_json(tokenizer: Llama3Tokenizer, ranks: Mapping[bytes, int]) -> dict[str, Any]:
    """A ``tokenizers`` tokenizer.json that gives the ids of `tokenizer`, whose BPE ranks (its tokenizer.model)
    are `ranks`.

    Vocabulary: each token's bytes in the byte-level alphabet, its rank as id. Merges: for each token, the pair
    tiktoken joins into it (``bpe_split``), in rank order, so the merge with the lowest rank goes first as in
    tiktoken. ``ignore_merges`` takes a whole pre-tokenized piece that is a token as it is, as tiktoken does.
    Special-token text is an added token here, whereas Llama3Tokenizer encodes it as plain text.
    """
    alphabet = byte_level_alphabet()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    vocab = {text(token): rank for token, rank in by_rank}
    merges = []
    for token, _ in by_rank:
        pair = bpe_split(token, ranks) if len(token) > 1 else None
        if pair is not None:
            merges.append([text(pair[0]), text(pair[1])])
    bos = "<|begin_of_text|>"
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for name, i in sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
        ],  # fmt: skip
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tokenizer.pat_str}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": _bos_post_processor(bos, tokenizer.bos_id),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
            "vocab": vocab, "merges": merges,
        },  # fmt: skip
    }


# Llama3ChatFormat.encode_dialog_prompt for text messages: the header, content as given (no strip, as
# llama_models), end of turn; "tool" is written "ipython". Whitespace control ({{- -%}}) keeps the template's own
# line breaks out of the prompt.
LLAMA3_CHAT_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}\n"
    "{%- for message in messages -%}\n"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}\n"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}\n"
    "{%- endif -%}\n"
)


def write_llama3_hf_tokenizer(
    tokenizer: Llama3Tokenizer, tokenizer_path: str | os.PathLike, out_dir: Path, max_length: int
) -> None:
    """Copy tokenizer.model into out_dir with the tokenizer.json and tokenizer_config.json that HF reads."""
    shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model")
    names = {i: name for name, i in tokenizer.special_tokens.items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names[tokenizer.bos_id],
        "eos_token": names[tokenizer.eos_id],  # what encode(eos=True) appends; config.json lists every stop id
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # True would change decoded text (" ." -> ".")
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": max_length,
        "chat_template": LLAMA3_CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    fast = llama3_tokenizer_json(tokenizer, read_ranks(os.fspath(tokenizer_path)))
    (out_dir / "tokenizer.json").write_text(json.dumps(fast, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf_tokenizer_files(
    tokenizer: TokenizerLike, tokenizer_path: str | os.PathLike, out_dir: Path, max_length: int
) -> None:
    if isinstance(tokenizer, Llama3Tokenizer):
        write_llama3_hf_tokenizer(tokenizer, tokenizer_path, out_dir, max_length)
    else:
        write_hf_tokenizer(tokenizer, tokenizer_path, out_dir, max_length)


def is_byte_level_bpe(contents: Any) -> bool:
    """Whether a parsed tokenizer.json is a byte-level BPE (tiktoken-style, as Llama 3's), not SentencePiece's."""
    if not isinstance(contents, dict) or not isinstance(contents.get("model"), dict):
        return False
    pre = contents.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    return contents["model"].get("type") == "BPE" and any(
        isinstance(step, dict) and step.get("type") == "ByteLevel" for step in steps
    )


def llama3_ranks_file(contents: Mapping[str, Any], source: str) -> bytes:
    """Meta's Llama 3 tokenizer.model (``<base64 token> <rank>`` a line) for a parsed byte-level tokenizer.json.

    The ranks are the vocabulary ids, the added (special) tokens left out. A ValueError when the file would
    tokenize otherwise than Meta's tokenizer: another split pattern, merges out of rank order, or special
    tokens other than Llama 3's at their ids (checked by the caller).
    """
    model = contents["model"]
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise ValueError(f"{source}: the BPE model has no 'vocab' object")
    patterns = [
        step.get("pattern", {}).get("Regex")
        for step in (contents.get("pre_tokenizer") or {}).get("pretokenizers", [])
        if isinstance(step, dict) and step.get("type") == "Split"
    ]
    if patterns != [Llama3Tokenizer.pat_str]:
        raise ValueError(
            f"{source}: its pre-tokenizer does not split text with Llama 3's pattern (found {patterns!r}), so "
            "a Llama 3 tokenizer.model made from it would give other ids"
        )
    added = {t["content"] for t in _added_tokens(contents, source)}
    alphabet = byte_level_alphabet()
    byte_of = {char: byte for byte, char in enumerate(alphabet)}
    ranks: dict[bytes, int] = {}
    for token, rank in vocab.items():
        if token in added:
            continue
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise ValueError(f"{source}: the id of token {token!r} must be an integer, got {rank!r}")
        try:
            ranks[bytes(byte_of[c] for c in token)] = rank
        except KeyError as e:
            raise ValueError(f"{source}: token {token!r} is not in the byte-level alphabet") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{source}: the ids of the ordinary tokens must be 0..{len(ranks) - 1}, each once")
    # tiktoken joins first the pair whose joined token has the lowest rank: the merges must be in that order.
    merges = _merge_pairs(model.get("merges"), source)
    last = -1
    for left, right in merges:
        rank = vocab.get(left + right)
        if rank is None or rank < last:
            raise ValueError(
                f"{source}: merge {left!r} + {right!r} is out of the order of the ids, so tiktoken ranks made "
                "from the ids would tokenize differently"
            )
        last = rank
    by_rank = sorted(ranks.items(), key=lambda item: item[1])

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    # And every pair that tiktoken joins must be a merge, or Hugging Face's tokenizer would give other ids than
    # the tokenizer.model made from the ids ("merges": [] would leave it only the whole tokens of ignore_merges).
    merge_set, lacking = set(merges), []
    for token, rank in by_rank:
        pair = bpe_split(token, ranks) if len(token) > 1 else None
        if pair is not None and (text(pair[0]), text(pair[1])) not in merge_set:
            lacking.append((text(token), rank, text(pair[0]), text(pair[1])))
    if lacking:
        token, rank, left, right = lacking[0]
        raise ValueError(
            f"{source}: its merges lack {left!r} + {right!r}, the pair tiktoken joins into token {token!r} (id "
            f"{rank}), and {len(lacking) - 1} more such pairs; Hugging Face's tokenizer would tokenize otherwise "
            "than a tokenizer.model made from the ids"
        )
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in by_rank)


def _merge_pairs(merges: Any, source: str) -> list[tuple[str, str]]:
    """The merges of a tokenizer.json's BPE model as (left, right); tokenizers writes each one as a list
    [left, right], or in older files as a string "left right"."""
    if not isinstance(merges, list):
        raise ValueError(f"{source}: the BPE model's 'merges' must be a list, got {type(merges).__name__}")
    pairs = []
    for i, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) and p for p in pair)):
            raise ValueError(
                f"{source}: merge {i} is {merge!r}; each merge must be two tokens, as [left, right] or \"left right\""
            )
        pairs.append((pair[0], pair[1]))
    return pairs


def _added_tokens(contents: Mapping[str, Any], source: str) -> list[dict[str, Any]]:
    """A tokenizer.json's 'added_tokens': a list of objects, each with a str 'content' and an int 'id'."""
    added = contents.get("added_tokens", [])
    if not isinstance(added, list) or not all(
        isinstance(t, dict) and isinstance(t.get("content"), str) and type(t.get("id")) is int for t in added
    ):
        raise ValueError(f"{source}: 'added_tokens' must be a list of objects with a str 'content' and an int 'id'")
    return added


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
    checkpoint.refuse_quantized(
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
    if tied:  # Llama 3.2 1B/3B: HF keeps one matrix for both
        keys.remove("output.weight")
    out_dtype = parse_dtype(dtype) or ckpt.shards[0][keys[0]].dtype
    shapes = ckpt.layout.shapes
    files = _plan_files(keys, shapes, out_dtype.itemsize, max_file_gb)

    def hf_tensor(inputs: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
        """The whole weight, in HF's layout and the output dtype."""
        tensor = qk_to_hf(key, ckpt.slice_for_rank(inputs, key, 0, 1), args)
        return tensor.to(out_dtype).contiguous()

    progress = ProgressLine("to_hf", len(files))
    umask = os.umask(0)
    os.umask(umask)
    file_mode = 0o666 & ~umask
    with checkpoint.atomic_output_dir(out_dir) as tmp:
        weight_map = {}
        for name, file_keys in files.items():
            inputs = ckpt.remap()  # so the input pages read for one file leave memory with it
            tensors = {meta_to_hf_name(k): hf_tensor(inputs, k) for k in file_keys}
            safetensors.torch.save_file(tensors, tmp / name, metadata={"format": "pt"})
            os.chmod(tmp / name, file_mode)  # safetensors creates its files private (0600)
            weight_map.update(dict.fromkeys(tensors, name))
            del tensors, inputs
            progress(name)
        if len(files) > 1:
            total = sum(math.prod(shapes[k]) for k in keys) * out_dtype.itemsize
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        write_hf_tokenizer_files(tokenizer, tokenizer_path, tmp, max_position_embeddings)
        # Llama 3: every stop id (end of text, end of message, end of turn), as HF's Llama 3.1 configs list them,
        # so that HF's generate stops where ours does, for base and instruct models alike.
        eos = tokenizer.stop_ids if len(tokenizer.stop_ids) > 1 else tokenizer.eos_id
        config = hf_config(args, tokenizer.bos_id, eos, out_dtype, max_position_embeddings, tied)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)


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


# An integer dtype of each float's size, to compare floats by their bits.
_BITS_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _plan_files(
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


class _HFWeights:
    """The weights of a Hugging Face folder, opened lazily (safetensors reads only the slices asked for)."""

    def __init__(self, hf_dir: Path):
        index = hf_dir / SAFETENSORS_INDEX
        if index.is_file():
            try:
                contents = json.loads(index.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{str(index)!r} is not valid JSON: {e}") from e
            if not isinstance(contents, dict) or not isinstance(contents.get("weight_map"), dict):
                raise ValueError(
                    f"{str(index)!r} must hold a JSON object with a 'weight_map' of weight name -> file name"
                )
            weight_map = contents["weight_map"]
            # Plain names of files next to the index: nothing is read from elsewhere.
            if not all(isinstance(v, str) and v and Path(v).name == v for v in weight_map.values()):
                raise ValueError(f"{str(index)!r}: 'weight_map' must map weight names to file names in its folder")
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (hf_dir / name).is_file():
                    raise ValueError(f"{str(index)!r} names {name!r}, which is not in {str(hf_dir)!r}")
        else:
            files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
            if not files:
                found = ", ".join(sorted(p.name for p in hf_dir.glob("*.bin"))) or "none"
                raise FileNotFoundError(
                    f"no *.safetensors weights in {str(hf_dir)!r} (pickled *.bin files: {found}); only the "
                    "safetensors format is read, as it cannot run code"
                )
        self.handles, self.file_of = {}, {}
        for name in files:
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

    def read(self, name: str, dim: Optional[int] = None, lo: int = 0, hi: int = 0) -> torch.Tensor:
        """Weight `name`, or only [lo, hi) along dim."""
        handle = self.handles[self.file_of[name]]
        if dim is None:
            return handle.get_tensor(name)
        part = handle.get_slice(name)
        return part[lo:hi] if dim == 0 else part[:, lo:hi]


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
    config = _read_json(config_path)
    params = params_from_hf_config(config, str(config_path))
    family, ranks_file = _hf_tokenizer(hf, params)
    weights = _HFWeights(hf)
    check_float_weights(weights, hf, sorted(weights.file_of))  # first: a quantized folder has unexpected names too
    tied = bool(config.get("tie_word_embeddings")) and "lm_head.weight" not in weights.file_of

    def hf_name(key: str) -> str:
        return "model.embed_tokens.weight" if tied and key == "output.weight" else meta_to_hf_name(key)

    try:
        args = ModelArgs.from_params({**params, "vocab_size": 1})  # vocab_size: read from the weights below
    except ValueError as e:
        raise ValueError(f"{str(config_path)!r} is not a valid Llama configuration: {e}") from e
    names = {k: hf_name(k) for k in Layout.for_args(args, family.model_cls).shapes}
    missing = sorted(n for n in names.values() if n not in weights.file_of)
    unknown = sorted(n for n in weights.file_of if n not in names.values() and not n.endswith("rotary_emb.inv_freq"))
    if missing or unknown:
        raise ValueError(
            f"the weights in {str(hf)!r} do not fit its config.json: missing {', '.join(missing) or 'none'}; "
            f"unexpected {', '.join(unknown) or 'none'}"
        )
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
    check_model_parallel_fit(args, model_parallel_size)
    out_dtype = parse_dtype(dtype)
    n = model_parallel_size

    def meta_slice(weights: _HFWeights, key: str, rank: int) -> torch.Tensor:
        # Ranks split q/k by whole heads, and the permutation stays inside each head, so a rank's rows can be
        # read in HF's layout and permuted on their own.
        dim = layout.split_dim(key)
        lo, hi = layout.rank_bounds(key, shapes[key][dim], rank, n) if dim is not None else (0, 0)
        part = weights.read(names[key], dim, lo, hi)
        # Checked as each part is read, not in a pass of its own (which would read the whole model twice): a bad
        # value stops the run, and the temporary output folder is removed.
        check_finite_weight(part, names[key], str(hf / weights.file_of[names[key]]))
        tensor = qk_to_hf(key, part, args, parts=n, inverse=True)
        return tensor.to(out_dtype) if out_dtype is not None else tensor

    def shards() -> Iterator[dict[str, torch.Tensor]]:
        for rank in range(n):
            weights = _HFWeights(hf)  # opened afresh, so the pages read for one shard leave memory with it
            yield {key: meta_slice(weights, key, rank) for key in names}

    tokenizer = hf / "tokenizer.model"
    extra = [tokenizer] if tokenizer.is_file() else []
    # A rebuilt tokenizer.model is written straight into the temporary output folder: a copy anywhere else
    # (the system's temporary folder) would be left behind by a killed run.
    made = {"tokenizer.model": ranks_file[0]} if ranks_file is not None else None
    progress = ProgressLine("from_hf", n)
    return checkpoint.save_checkpoint(out_dir, shards(), params, extra, progress, extra_contents=made)


# safetensors' names of the float dtypes, which a Meta checkpoint holds as they are.
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}

# Elements checked for NaN and inf at a time, so that the mask stays small next to a large weight.
_FINITE_CHUNK = 2**24


def check_float_weights(weights: _HFWeights, hf: Path, names: Sequence[str]) -> None:
    """A ValueError naming the file and weight when one of `names` is not floating point (from the headers)."""
    for name in names:
        dtype = weights.dtype(name)
        if dtype in _FLOAT_DTYPES:
            continue
        where = f"{str(hf / weights.file_of[name])!r}: {name!r} holds {dtype} values"
        if dtype.startswith("F8"):
            raise ValueError(
                f"{where}: FP8 checkpoints are not supported (their scales would be lost); convert the bf16 "
                "release of the model"
            )
        raise ValueError(
            f"{where}; weights must be floating point (bfloat16, float16 or float32). A quantized folder (GPTQ, "
            "AWQ, bitsandbytes...) cannot be converted: convert the float release"
        )


def check_finite_weight(tensor: torch.Tensor, name: str, source: str) -> None:
    """A ValueError naming `source` (the file) and `name` when tensor holds NaN or inf."""
    flat = tensor.reshape(-1)
    for lo in range(0, flat.numel(), _FINITE_CHUNK):
        if not torch.isfinite(flat[lo : lo + _FINITE_CHUNK]).all():
            raise ValueError(
                f"{source!r}: {name!r} holds NaN or inf values, with which the model computes NaN; the file is "
                "damaged, or was saved from a diverged model"
            )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e


def llama3_params(params: Mapping[str, Any], vocab_size: int) -> dict[str, Any]:
    """params.json in the order and form of Meta's Llama 3.x files: vocab_size written (128256), not -1."""
    order = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
             "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor"]  # fmt: skip
    full = {**params, "vocab_size": vocab_size}
    return {key: full[key] for key in order if key in full}


def _hf_tokenizer(hf: Path, params: Mapping[str, Any]) -> tuple[Family, Optional[tuple[bytes, int]]]:
    """The family of a Hugging Face folder, and for Llama 3 without a tokenizer.model, the one rebuilt from its
    tokenizer.json with its number of tokens (ordinary and special).

    The tokenizer tells: a Llama 3 tokenizer.model, or a byte-level BPE tokenizer.json, is Llama 3. Without
    either, Llama 3.1's scaled RoPE says Llama 3 too; anything else is written in Llama 2's layout.
    """
    model_file, json_file = hf / "tokenizer.model", hf / "tokenizer.json"
    if model_file.is_file():
        return family_of(load_tokenizer(model_file)), None
    if json_file.is_file():
        contents = _read_json(json_file)
        if not isinstance(contents, dict) or not isinstance(contents.get("model"), dict):
            # Skipped, it would leave the Meta folder without a tokenizer.model, or in the wrong generation.
            raise ValueError(
                f"{str(json_file)!r} is not a tokenizer.json of Hugging Face's tokenizers (a JSON object whose "
                "'model' is an object); replace it with the model's own tokenizer.json"
            )
        if is_byte_level_bpe(contents):
            ranks_file = llama3_ranks_file(contents, str(json_file))
            # Checked as Llama3Tokenizer will read it, in memory: a file written elsewhere could be left behind.
            rebuilt = Llama3Tokenizer.from_ranks(parse_ranks(ranks_file, str(json_file)), "tokenizer.model")
            added = {t["content"]: t["id"] for t in _added_tokens(contents, str(json_file))}
            if added != rebuilt.special_tokens:
                wrong = sorted(set(added.items()) ^ set(rebuilt.special_tokens.items()), key=str)[:3]
                raise ValueError(
                    f"{str(json_file)!r}: its added tokens are not Llama 3's 256 special tokens at their ids "
                    f"(e.g. {wrong}); Meta's tokenizer.model cannot hold other ones"
                )
            return FAMILIES[1], (ranks_file, rebuilt.n_words)
    return (FAMILIES[1] if params.get("use_scaled_rope") else FAMILIES[0]), None

