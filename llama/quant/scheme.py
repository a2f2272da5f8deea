"""How weights are quantized: the mode (``int8`` or ``int4``) and the group size, as a ``Scheme``.

Weights are quantized in groups of ``group_size`` (default 32) consecutive inputs of one output row, each group
with its own scale, stored in bfloat16 (fp32's range, so no group underflows or overflows as fp16 scales can; the
values are quantized against the rounded scale, so the round trip is exact):

- ``int8``: symmetric, q = round(w / s) in [-127, 127] with s = max|w| / 127; ``qweight`` int8 (n, k).
  8.5 bits a weight with the scales.
- ``int4``: symmetric with all 16 levels, as llama.cpp's Q4_0: s = m / -8 for m the group's weight of largest
  magnitude (so m itself is exactly -8 s), q = round(w / s) clamped to [-8, 7]; 15 levels over +-max|w|
  would waste one and give a 14% coarser step. Stored as q + 8 in nibbles, two per byte, ``qweight`` uint8
  (n, k / 2): in each group, byte j holds weight j (low nibble) and weight j + group_size / 2 (high nibble),
  so the C kernel unpacks a run of bytes into two runs of consecutive weights. 4.5 bits a weight.

Why groups of 32: with one scale per output row, a row's largest weight would set the step for all its
others; groups bound that to 32 weights for 0.5 bit of scales a weight (llama.cpp's Q8_0 and Q4_0 make the
same choice). On the demo model's 3,000-token held-out sample (fp32 compute; bf16 checkpoint 91.60), int4
perplexity was +0.53% with groups of 16, +0.46% with 32 and +0.68% with 96; int8 was within 0.02% at 32 and
96 (a model this small says little about larger groups on large models, whose rows hold larger outliers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

MODES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 32
SCALE_DTYPE = torch.bfloat16
# The largest |q| of each mode: a scale s stands for weights up to this many times s.
LARGEST_Q = {"int8": 127, "int4": 8}


@dataclass(frozen=True)
class Scheme:
    """How weights are quantized: mode "int8" or "int4", and the number of inputs that share a scale."""

    mode: str
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown quantization mode {self.mode!r}; use one of {', '.join(map(repr, MODES))}")
        g = self.group_size
        if not isinstance(g, int) or isinstance(g, bool) or g < 1 or (self.mode == "int4" and g % 2):
            what = "a positive even integer" if self.mode == "int4" else "a positive integer"
            raise ValueError(f"group_size must be {what} for {self.mode}, got {g!r}")

    def to_params(self) -> dict[str, Any]:
        return {"mode": self.mode, "group_size": self.group_size}

    @property
    def qweight_dtype(self) -> torch.dtype:
        """int8's values as they are; int4's packed two to a byte."""
        return torch.int8 if self.mode == "int8" else torch.uint8

    def qweight_columns(self, in_features: int) -> int:
        """The columns of the qweight of a layer with in_features inputs."""
        return in_features if self.mode == "int8" else in_features // 2

    def in_features(self, qweight_columns: int) -> int:
        """The inputs of a layer whose qweight has qweight_columns columns."""
        return qweight_columns if self.mode == "int8" else qweight_columns * 2

    def check_fits(self, name: str, in_features: int, world_size: int = 1) -> None:
        """Raise a ValueError unless groups tile `in_features` (one rank's inputs of layer `name`)."""
        if in_features % self.group_size:
            per_rank = f" per rank ({world_size} model-parallel ranks)" if world_size > 1 else ""
            raise ValueError(
                f"group_size {self.group_size} does not divide the {in_features} inputs{per_rank} of {name}: a "
                "group may not straddle a row's end or a rank's slice; choose a group size that divides it"
            )
