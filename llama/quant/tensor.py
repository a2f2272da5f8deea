"""Quantizing a float weight to (qweight, scales), and back, in torch (the formats: ``llama.quant.scheme``)."""

from __future__ import annotations

import torch

from llama.quant.scheme import SCALE_DTYPE, Scheme

_ROWS_PER_CHUNK = 1024  # rows quantized at once: bounds the fp32 scratch to 1024 x in_features


def quantize(w: torch.Tensor, scheme: Scheme, name: str = "a weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, scales) of a float weight w (n, k): int8 (n, k) or packed uint8 (n, k / 2), and bf16 scales
    (n, k / group_size). Computed in fp32, `_ROWS_PER_CHUNK` rows at a time. name: w, as errors name it (the
    key and the file it comes from)."""
    if w.ndim != 2 or not w.is_floating_point():
        raise ValueError(f"quantize takes a 2-D float weight, got {w.dtype} of shape {tuple(w.shape)}")
    n, k = w.shape
    scheme.check_fits("this weight", k)
    g = scheme.group_size
    qweight = torch.empty(n, scheme.qweight_columns(k), dtype=scheme.qweight_dtype, device=w.device)
    scales = torch.empty(n, k // g, dtype=SCALE_DTYPE, device=w.device)
    for lo in range(0, n, _ROWS_PER_CHUNK):
        groups = w[lo : lo + _ROWS_PER_CHUNK].to(torch.float32, copy=True).reshape(-1, k // g, g)  # changed below
        magnitude = groups.abs().amax(-1)  # (rows, k / g); NaN and inf carry through
        if not torch.isfinite(magnitude).all():
            raise ValueError(f"cannot quantize {name}: it holds inf or NaN values (a damaged file? re-download it)")
        if scheme.mode == "int8":
            scale = (magnitude / 127).to(SCALE_DTYPE)
            lowest, highest = -127, 127
        else:
            # The signed weight of largest magnitude in each group maps to -8 exactly.
            extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
            scale = (extreme / -8).to(SCALE_DTYPE)
            lowest, highest = -8, 7
        divisor = scale.float().masked_fill(scale == 0, 1.0)[..., None]  # an all-zero group: q = 0
        q = groups.div_(divisor).round_().clamp_(lowest, highest).to(torch.int8).reshape(-1, k)
        scales[lo : lo + _ROWS_PER_CHUNK] = scale
        qweight[lo : lo + _ROWS_PER_CHUNK] = q if scheme.mode == "int8" else pack_int4(q, g)
    return qweight, scales


def pack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """int values in [-8, 7] (n, k) -> uint8 (n, k / 2): each group's first half in the low nibbles."""
    n, k = q.shape
    u = (q.to(torch.int16) + 8).to(torch.uint8).reshape(n, k // group_size, 2, group_size // 2)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """uint8 (n, k / 2) -> int8 (n, k) in [-8, 7]; the inverse of pack_int4."""
    n = packed.shape[0]
    p = packed.reshape(n, -1, group_size // 2)
    u = torch.stack([p & 15, p >> 4], dim=2)  # (n, k / g, 2, g / 2)
    return (u.to(torch.int8) - 8).reshape(n, -1)


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, scheme: Scheme, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The float weight (n, k) that (qweight, scales) stand for: q * s, computed in fp32 (exactly), cast to dtype."""
    q = qweight if scheme.mode == "int8" else unpack_int4(qweight, scheme.group_size)
    n, k = q.shape
    w = q.float().reshape(n, k // scheme.group_size, scheme.group_size) * scales.float()[..., None]
    return w.reshape(n, k).to(dtype)


# The panel layout (gemv_quant.c's panel product reads it as it is): each PANEL_ROWS consecutive rows of a layer's
# qweight hold their 4-byte words side by side, word 0 of each row, then word 1...; its scales likewise, scale by
# scale. Same shape and bytes as the rows, reordered within each panel. Layers whose output rows are a multiple of
# PANEL_ROWS keep their weights so in memory (``QuantizedLinear.panels``); checkpoints and state_dict() hold rows.
PANEL_ROWS = 16
QWEIGHT_WORD = 4  # bytes of qweight a lane of the C kernels holds; each scale is a word of its own


def fits_panels(out_features: int, scheme: Scheme) -> bool:
    """Whether a layer's weights can be laid out in panels: whole panels of rows, and groups of whole words (int8:
    a multiple of 4 weights; int4, whose bytes hold weights w and w + g / 2: of 8)."""
    words_of = 4 if scheme.mode == "int8" else 8
    return out_features % PANEL_ROWS == 0 and out_features > 0 and scheme.group_size % words_of == 0


def to_panels(t: torch.Tensor, word: int) -> torch.Tensor:
    """A (n, c) tensor held as rows, in the panel layout (a new tensor of the same shape): per panel of PANEL_ROWS
    rows, word (`word` elements) w of every row, for w = 0, 1, ..."""
    n, c = t.shape
    return t.reshape(n // PANEL_ROWS, PANEL_ROWS, c // word, word).transpose(1, 2).contiguous().view(n, c)


def from_panels(t: torch.Tensor, word: int) -> torch.Tensor:
    """The rows of a (n, c) tensor held in the panel layout; the inverse of to_panels."""
    n, c = t.shape
    return t.reshape(n // PANEL_ROWS, c // word, PANEL_ROWS, word).transpose(1, 2).contiguous().view(n, c)


def weights_to_panels(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's qweight and scales held as rows, in the panel layout (each scale a word of its own)."""
    return to_panels(qweight, QWEIGHT_WORD), to_panels(scales, 1)


def weights_from_panels(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a layer's qweight and scales held in the panel layout; the inverse of weights_to_panels."""
    return from_panels(qweight, QWEIGHT_WORD), from_panels(scales, 1)


def dequantize_rows(
    qweight: torch.Tensor, scales: torch.Tensor, scheme: Scheme, panels: bool, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``dequantize`` of weights held as rows, or in the panel layout where `panels` says so."""
    if panels:
        qweight, scales = weights_from_panels(qweight, scales)
    return dequantize(qweight, scales, scheme, dtype)
