"""The model's configuration: ``ModelArgs`` (read from ``params.json``) and the sizes that follow from it."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

from llama.checks import check_positive_int, is_int


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # filled in from the tokenizer by Llama.build
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False  # Llama 3.1 and later: Meta's frequency scaling for long contexts
    rope_scaling_factor: Optional[float] = None  # None: Meta's reference value, 8 (see scale_rope_frequencies)

    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "multiple_of", "max_batch_size", "max_seq_len"):
            check_positive_int(f"ModelArgs.{name}", getattr(self, name))
        if self.n_kv_heads is not None:
            check_positive_int("ModelArgs.n_kv_heads", self.n_kv_heads)
        if not is_int(self.vocab_size):
            raise ValueError(f"ModelArgs.vocab_size must be an integer, got {self.vocab_size!r}")
        # NaN compares false with everything, so without the finiteness test a NaN norm_eps would pass.
        if not isinstance(self.use_scaled_rope, bool):
            raise ValueError(f"ModelArgs.use_scaled_rope must be true or false, got {self.use_scaled_rope!r}")
        for name in ("norm_eps", "rope_theta", "ffn_dim_multiplier", "rope_scaling_factor"):
            value = getattr(self, name)
            if name in ("ffn_dim_multiplier", "rope_scaling_factor") and value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 < value < math.inf):
                allowed = " or None" if name in ("ffn_dim_multiplier", "rope_scaling_factor") else ""
                raise ValueError(f"ModelArgs.{name} must be a finite positive number{allowed}, got {value!r}")
        # Meta's code reads no factor without use_scaled_rope (none of its params.json files has one), so a factor
        # given alone would be silently ignored: the model computed would not be the one asked for.
        if self.rope_scaling_factor is not None and not self.use_scaled_rope:
            raise ValueError(
                f"rope_scaling_factor={self.rope_scaling_factor!r} is given but use_scaled_rope is false: the factor "
                "only scales Llama 3.1's RoPE, so it would be ignored; set \"use_scaled_rope\": true in params.json "
                "(ModelArgs.use_scaled_rope=True) to scale the frequencies, or drop rope_scaling_factor"
            )
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(
                f"head dim dim/n_heads = {self.dim // self.n_heads} must be even for rotary embeddings"
            )
        if self.n_heads % self.kv_heads != 0:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_params(cls, params: Mapping[str, Any], **overrides: Any) -> ModelArgs:
        """Build from a ``params.json`` dict. A key this class does not know is refused: it may change the math
        (Llama 3.1's use_scaled_rope did), and ignoring it would silently compute another model."""
        # Without these the 7B model's defaults would be used, and the error would be about something else.
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params and k not in overrides]
        if missing:
            raise ValueError(f"params.json lacks {', '.join(map(repr, missing))}, which the model needs")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(
                f"params.json holds keys this version of the library does not know: {', '.join(unknown)}; "
                f"it supports {', '.join(known)}"
            )
        return cls(**{**params, **overrides})



def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """The reference's SwiGLU hidden size: 2/3 of 4*dim, optionally scaled, rounded up to multiple_of."""
    hidden_dim = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)

