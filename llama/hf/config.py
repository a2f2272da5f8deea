"""Hugging Face's config.json <-> Meta's params.json, and the JSON files of a Hugging Face folder.

A config.json states sizes; params.json states how to compute them (``multiple_of`` and ``ffn_dim_multiplier``
give the FFN size), so the way back searches for parameters that give the same size. Llama 3.1's scaled RoPE is
``rope_scaling`` (transformers 4.x) or ``rope_parameters`` (5.x) on HF's side, with the values Meta's code fixes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from llama.families import FAMILIES, Family
from llama.model import ModelArgs, ffn_hidden_dim

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


def llama3_params(params: Mapping[str, Any], vocab_size: int) -> dict[str, Any]:
    """params.json in the order and form of Meta's Llama 3.x files: vocab_size written (128256), not -1."""
    order = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
             "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor"]  # fmt: skip
    full = {**params, "vocab_size": vocab_size}
    return {key: full[key] for key in order if key in full}


def read_json(path: Path) -> Any:
    """The parsed contents of a JSON file; a ValueError naming the file when it is not valid UTF-8 JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e
