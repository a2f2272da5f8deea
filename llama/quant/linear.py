"""``QuantizedLinear``, and the swap of a model's linear layers for it.

Every linear layer whose weight model-parallel ranks split (``wq wk wv wo w1 w2 w3`` and ``output``: each declares
its split, ``llama.model.layers``) is swapped for a ``QuantizedLinear`` by walking the model's modules, as gpt-fast
does; the model knows nothing of it. Activations, the embedding, the norms and the KV cache stay in the model's
dtype. A ``QuantizedLinear`` declares the split of the layer it replaces, for its ``qweight`` and ``scales``.
"""

from __future__ import annotations

import ctypes
from typing import Optional, Sequence

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import mappings
from torch import nn

from llama.model.layers import LinearOperands, StackedLinear, split_dim_of, stack_rows
from llama.quant.kernels import available, cpu_linear, kernels, product_kernel, vector_panel_loops
from llama.quant.scheme import SCALE_DTYPE, Scheme
from llama.quant.tensor import (
    PANEL_ROWS,
    dequantize_rows,
    fits_panels,
    quantize,
    weights_from_panels,
    weights_to_panels,
)


class QuantizedLinear(nn.Module):
    """A parallel linear layer (column- or row-parallel, no bias) with quantized weights held as buffers.

    qweight and scales are this rank's slice, cut as the weight of the layer replaced: split_dim 0 (column-parallel:
    the output rows) or 1 (row-parallel: the inputs). Under model parallelism the layer talks to the other ranks as
    fairscale's layer it replaces does (copy/gather for column-parallel, reduce for row-parallel).

    panels: whether qweight and scales are held in the panel layout that the CPU kernels read as it is
    (``llama.quant.tensor.to_panels``); by default wherever they fit it (output rows a multiple of 16: every real
    model's layers) and the kernels have vector loops for it (``vector_panel_loops``). ``state_dict()`` gives them
    as rows and loading takes rows (checkpoints hold rows): the layout is this module's business
    (``weights_as_rows``).
    Give a layer new weights through ``load_state_dict`` or ``layer.qweight, layer.scales = layer.held(q, s)``:
    rows assigned straight to the buffers of a layer that holds panels would be read as panels.
    """

    def __init__(
        self, in_features: int, out_features: int, scheme: Scheme, split_dim: int = 0,
        gather_output: bool = False, device: Optional[torch.device | str] = None, panels: Optional[bool] = None,
    ):  # fmt: skip
        super().__init__()
        scheme.check_fits("QuantizedLinear", in_features)
        fits = fits_panels(out_features, scheme)
        if panels and not fits:
            raise ValueError(f"a QuantizedLinear of {out_features} outputs and {in_features} inputs cannot hold its "
                             f"weights in panels of {PANEL_ROWS} rows; leave panels unset")  # fmt: skip
        self.panels = fits and vector_panel_loops() if panels is None else panels
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.split_dims = {"qweight": split_dim, "scales": split_dim}  # both have the weight's rows and inputs
        self.input_is_parallel, self.gather_output = split_dim == 1, gather_output
        self.int8_x = True  # CPU products with int8 inputs (llama.cpp's way); False: exact (use_int8_inputs)
        self.one_rank = fs_init.get_model_parallel_world_size() == 1
        qweight = torch.zeros(out_features, scheme.qweight_columns(in_features), dtype=scheme.qweight_dtype,
                              device=device)  # fmt: skip
        self.register_buffer("qweight", qweight)
        groups = in_features // scheme.group_size
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=SCALE_DTYPE, device=device))

    @classmethod
    def empty_like(cls, linear: nn.Module, scheme: Scheme, device: Optional[torch.device | str] = None
                   ) -> QuantizedLinear:  # fmt: skip
        """A QuantizedLinear of the sizes and split of parallel linear layer `linear` (``is_parallel_linear``),
        its qweight and scales zero (on `device`)."""
        out_features, in_features = linear.weight.shape
        split_dim = split_dim_of(linear, "weight")
        return cls(in_features, out_features, scheme, split_dim, getattr(linear, "gather_output", False), device)

    @classmethod
    def from_linear(cls, linear: nn.Module, scheme: Scheme, name: str = "a linear layer") -> QuantizedLinear:
        """The quantized version of a parallel linear layer (``is_parallel_linear``; its weight is this rank's
        slice)."""
        if getattr(linear, "bias", None) is not None:
            raise ValueError(f"{name} has a bias; QuantizedLinear quantizes bias-free layers only")
        scheme.check_fits(name, linear.weight.shape[1], fs_init.get_model_parallel_world_size())
        layer = cls.empty_like(linear, scheme, "meta")
        layer.qweight, layer.scales = layer.held(*quantize(linear.weight.detach(), scheme, name))
        return layer

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, {self.scheme.mode}, group_size={self.scheme.group_size}, "
                f"panels={self.panels}")  # fmt: skip

    def held(self, qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """qweight and scales given as rows, as this layer holds them (in panels where it does)."""
        return weights_to_panels(qweight, scales) if self.panels else (qweight, scales)

    def weights_as_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """qweight and scales as rows (the checkpoints' layout; copies where the layer holds panels)."""
        return weights_from_panels(self.qweight, self.scales) if self.panels else (self.qweight, self.scales)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.panels:
            destination[prefix + "qweight"], destination[prefix + "scales"] = self.weights_as_rows()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        # state_dict holds rows (load_state_dict gives the modules a copy of the caller's dict): into panels where
        # they fit this layer; anything else is left as it is for the usual checks to report
        q, s = state_dict.get(prefix + "qweight"), state_dict.get(prefix + "scales")
        fit = q is not None and s is not None and q.shape == self.qweight.shape and s.shape == self.scales.shape
        if fit and q.device.type != "cpu":  # panels serve the CPU kernels; elsewhere rows dequantize without a copy
            self.panels = False
        if self.panels and fit:
            state_dict[prefix + "qweight"], state_dict[prefix + "scales"] = self.held(q, s)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_rows(self.qweight, self.scales, self.scheme, self.panels, dtype)

    def cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's product on a CPU whose kernels are built (``available()``, which the caller checks: the
        fast path checks it once, outside its compiled step)."""
        return cpu_linear(x, self.qweight, self.scales, self.scheme, self.int8_x, self.panels)

    def kernel_operands(self) -> LinearOperands:
        """qweight and scales with their sizes, for a C kernel that reads them by address (the C step of
        ``llama.engine.cpu_decode``); ``cpu_kernel`` is the function to call."""
        return LinearOperands(self.qweight, self.scales, self.out_features, self.in_features, self.scheme.group_size)

    def cpu_kernel(self) -> Optional[ctypes._CFuncPtr]:
        """The C function of this layer's product on a CPU (``product_kernel``: by its format and int8-input
        switch); None where the kernels are not built or cannot read its scales."""
        fns = kernels()
        if fns is None or self.scales.dtype != SCALE_DTYPE:
            return None
        return product_kernel(fns, self.scheme.mode, self.scheme.group_size, self.int8_x, self.panels)

    @classmethod
    def stack(cls, parts: Sequence[nn.Module]) -> Optional[StackedLinear]:
        """QuantizedLinears that read one input, as one whose qweight and scales are theirs stacked along the
        outputs (one product instead of several); None unless they share scheme, int8-input switch, layout (panels
        stack as rows do: each part's are whole panels) and input size. For one model-parallel rank. The parts'
        tensors become views of the stacked ones (nothing is held twice; values and ``state_dict()`` unchanged).
        The stacked layer takes the int8-input switch the parts have now: after ``use_int8_inputs``, stack them
        again (it makes no copy then)."""
        first = parts[0]
        alike = all(isinstance(p, cls) and p.scheme == first.scheme and p.int8_x == first.int8_x
                    and p.panels == first.panels and p.in_features == first.in_features for p in parts)  # fmt: skip
        if not alike:
            return None
        with torch.no_grad():
            qweight, scales = stack_rows([p.qweight for p in parts]), stack_rows([p.scales for p in parts])
        sizes = tuple(p.out_features for p in parts)
        for p, q, s in zip(parts, qweight.split(sizes), scales.split(sizes)):
            p.qweight, p.scales = q, s
        layer = cls(first.in_features, sum(sizes), first.scheme, device="meta", panels=first.panels)
        layer.qweight, layer.scales, layer.int8_x = qweight, scales, first.int8_x
        return StackedLinear(layer, tuple(parts), sizes)

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and available():
            return self.cpu_forward(x)
        return F.linear(x, self.dequantized_weight(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_rank:
            return self.local_forward(x)
        if self.input_is_parallel:  # row-parallel: the input is already this rank's slice
            return mappings.reduce_from_model_parallel_region(self.local_forward(x))
        out = self.local_forward(mappings.copy_to_model_parallel_region(x))
        return mappings.gather_from_model_parallel_region(out) if self.gather_output else out


def is_parallel_linear(module: nn.Module) -> bool:
    """Whether `module` is a linear layer (it has ``in_features``) whose weight ranks split, as it declares: the
    layers quantization swaps. Embeddings declare a split too, but are no linear layers."""
    return split_dim_of(module, "weight") is not None and hasattr(module, "in_features")


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> module, for every parallel linear layer of the model (the ones quantization swaps)."""
    return {name: m for name, m in model.named_modules() if is_parallel_linear(m)}


def use_int8_inputs(model: nn.Module, on: bool = True) -> nn.Module:
    """Whether the model's quantized layers round their inputs to int8 in the CPU kernels (on by default:
    llama.cpp's way, fast) or compute the exact products with the dequantized weights (off: slower). Returns
    the model."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.int8_x = on
    return model


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` in `model` as its submodule `name` ("layers.0.attention.wq"), in place of the one there."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, scheme: Scheme) -> nn.Module:
    """Swap every parallel linear layer of a loaded model for a QuantizedLinear, in place; returns the model.

    Each float weight is dropped once its layer is quantized. (Llama.build quantizes while loading instead.)
    """
    world_size = fs_init.get_model_parallel_world_size()
    layers = linear_layers(model)
    for name, linear in layers.items():
        scheme.check_fits(name, linear.weight.shape[1], world_size)
    for name, linear in layers.items():
        set_module(model, name, QuantizedLinear.from_linear(linear, scheme, name))
    return model


def swap_for_empty(model: nn.Module, scheme: Scheme, world_size: int) -> list[str]:
    """Replace the parallel linear layers by data-less QuantizedLinears (meta buffers), for loading to fill in;
    their names."""
    layers = linear_layers(model)
    for name, linear in layers.items():
        scheme.check_fits(name, linear.weight.shape[1], world_size)
        set_module(model, name, QuantizedLinear.empty_like(linear, scheme, "meta"))
    return list(layers)
