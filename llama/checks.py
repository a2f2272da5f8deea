"""Argument checks and parsing shared by the library and its command-line tools (imports nothing of ours)."""

from __future__ import annotations

import math
import numbers
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
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype ({', '.join(f'torch.{n}' for n in DTYPES)}), got {dtype!r}")
    if dtype not in DTYPES.values():
        raise ValueError(
            f"dtype {dtype} is not supported: the model computes in {', '.join(f'torch.{n}' for n in DTYPES)} only"
        )
    return dtype


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """torch dtype for "float32" / "float16" / "bfloat16"; None stays None (the caller's default)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]
