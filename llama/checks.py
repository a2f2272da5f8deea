"""Argument checks and parsing shared by the library and its command-line tools (imports nothing of ours)."""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Optional

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_int(value: Any) -> bool:
    """True for Python and numpy integers; False for bools, which are ints to Python but never a size here."""
    return not isinstance(value, bool) and hasattr(value, "__index__") and not isinstance(value, torch.Tensor)


def check_positive_int(name: str, value: Any) -> int:
    """value as an int if it is an integer >= 1, else a ValueError naming `name`."""
    if not is_int(value) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def is_finite_number(value: Any) -> bool:
    """True for finite real numbers: Python's ints and floats and numpy's (np.float32 is no Python float, but it
    is a ``numbers.Real``); False for bools (numpy's too), NaN, infinities, strs and tensors."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def check_finite(name: str, value: Any) -> float:
    """value as a float if it is a finite real number (not a bool or a str), else a ValueError naming `name`."""
    if not is_finite_number(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


# What torch.manual_seed takes (a negative seed s stands for 2**64 + s); outside it, torch fails with a bare
# "Overflow when unpacking long long".
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_seed(seed: Any) -> int:
    """seed as an int if torch.manual_seed takes it, else a ValueError naming the range."""
    low, high = SEED_RANGE
    if not is_int(seed) or not low <= int(seed) <= high:
        raise ValueError(f"seed must be an integer in [-2**63, 2**64 - 1] (what torch.manual_seed takes), got {seed!r}")
    return int(seed)


def check_dtype(dtype: Any) -> torch.dtype:
    """dtype if it is one of DTYPES' torch dtypes (the ones the model computes in), else a clear error."""
    names = ", ".join(f"torch.{n}" for n in DTYPES)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype ({names}), got {dtype!r}")
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype} is not supported: the model computes in {names} only")
    return dtype


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """torch dtype for "float32" / "float16" / "bfloat16"; None stays None (the caller's default)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_path(name: str, value: Any) -> None:
    """TypeError unless value is a path (str or os.PathLike): None would fail deep in pathlib."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"{name} must be a path (str or os.PathLike), got {value!r}; for the built-in demo model pass "
            "llama.demo.DEMO_CKPT_DIR and llama.demo.DEMO_TOKENIZER_PATH"
        )


# ---------------------------------------------------------------- the arguments of a generation call


def check_sampling(temperature: Any, top_p: Any, max_gen_len: Any, stream: bool = False) -> None:
    """ValueError unless temperature >= 0 and top_p in [0, 1] are finite numbers and max_gen_len is an integer >= 0
    (>= 1 for a stream: max_gen_len=0 only scores prompts, which a stream cannot return)."""
    if not is_finite_number(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if not is_finite_number(top_p) or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p!r}")
    if stream and is_int(max_gen_len) and max_gen_len == 0:
        raise ValueError(
            "max_gen_len must be a positive integer for a stream, got 0; max_gen_len=0 only scores the prompt: "
            "call text_completion or generate with logprobs=True, echo=True for that"
        )
    if not is_int(max_gen_len) or max_gen_len < 0:
        raise ValueError(f"max_gen_len must be an integer >= 0 (0: only score the prompts), got {max_gen_len!r}")


def check_stop(stop: Any) -> list[str]:
    """The stop strings as a list, with a clear error for anything but a list of non-empty str (or None)."""
    if stop is None:
        return []
    if isinstance(stop, str) or not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise TypeError(f"stop must be a list of str or None, got {stop!r} (wrap a single stop string in a list)")
    if any(s == "" for s in stop):
        raise ValueError("stop strings must not be empty")
    return list(stop)


def check_prompt_strings(prompts: Any) -> None:
    """TypeError unless prompts is a list (or tuple) of str."""
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of str (wrap a single prompt in a list)")


def check_prompts(prompt_tokens: Any, max_batch_size: int, max_seq_len: int, vocab_size: int) -> list[list[int]]:
    """The prompts as lists of Python ints, after checking them against a model's limits."""
    if not isinstance(prompt_tokens, (list, tuple)) or not prompt_tokens:
        raise ValueError("prompt_tokens must be a non-empty list of token-id lists")
    if len(prompt_tokens) > max_batch_size:
        raise ValueError(
            f"{len(prompt_tokens)} prompts exceed max_batch_size={max_batch_size}; "
            "pass fewer prompts per call or build with a larger max_batch_size"
        )
    checked = []
    for i, t in enumerate(prompt_tokens):
        if not isinstance(t, (list, tuple)) or not t:
            raise ValueError(f"prompt {i} must be a non-empty list of token ids")
        if len(t) > max_seq_len:
            raise ValueError(
                f"prompt {i} has {len(t)} tokens, more than max_seq_len={max_seq_len}; "
                "shorten it or build with a larger max_seq_len"
            )
        bad = next((x for x in t if not is_int(x)), None)
        if bad is not None:
            raise TypeError(f"prompt {i} holds {bad!r} ({type(bad).__name__}); token ids must be integers")
        ids = [int(x) for x in t]
        outside = next((x for x in ids if not 0 <= x < vocab_size), None)
        if outside is not None:
            raise ValueError(f"prompt {i} holds token id {outside}, outside the vocabulary [0, {vocab_size})")
        checked.append(ids)
    return checked
