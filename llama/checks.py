"""Argument checks and parsing shared by the library and its command-line tools (imports nothing of ours)."""

from __future__ import annotations

import math
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
    """True for finite Python ints and floats (numpy's too); False for bools, NaN, infinities and strs."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_finite(name: str, value: Any) -> float:
    """value as a float if it is a finite real number (not a bool or a str), else a ValueError naming `name`."""
    if not is_finite_number(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """torch dtype for "float32" / "float16" / "bfloat16"; None stays None (the caller's default)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]
