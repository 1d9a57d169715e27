"""QuantLinear: a linear layer that holds its weight packed (boa/core/packed.py) and runs on the packed kernels
(boa_kernels.packed_matmul: C++ on a CPU, CUDA/Triton on a GPU, torch's dequantize-then-matmul anywhere else).

The weight stays packed for the module's whole life; nothing is unpacked or cached on first use.
"""
from __future__ import annotations

import torch
from torch import nn

from boa.core.errors import BoaError
from boa.core.packed import PackedWeight, pack
from boa.core.quantizer import QuantizedWeight
from boa_kernels.int8_matmul import int8_matmul
from boa_kernels.packed_matmul import packed_matmul


class QuantLinear(nn.Module):
    def __init__(self, weight: QuantizedWeight | PackedWeight, bias: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None):
        """`weight` packed or not; `dtype` is the grids' dtype `quantized_weight` gives back (default: the
        QuantizedWeight's scale dtype, float32 for a PackedWeight)."""
        super().__init__()
        if isinstance(weight, QuantizedWeight):
            dtype = dtype or weight.scale.dtype
            weight = pack(weight)
        self.bits, self.group_size = weight.bits, weight.group_size
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.grid_dtype = dtype or torch.float32
        for name, tensor in weight.tensors().items():
            self.register_buffer(name, tensor)
        if weight.perm is None:
            self.perm = None
        if weight.offsets is None:
            self.offsets = None
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.activations: tuple[int, float] | None = None  # (bits, clip ratio): inputs quantized per token
        self._refresh()

    def _refresh(self) -> None:
        """The PackedWeight view of the buffers, made once (not per forward: decoding calls this layer per token)."""
        self.packed = PackedWeight(self.qweight, self.scales, self.zeros, self.perm, self.bits, self.in_features,
                                   self.group_size, self.offsets)

    def quantized_weight(self) -> QuantizedWeight:
        """Codes, grids and g_idx in input column order (unpacked: a copy, for export and inspection)."""
        return self.packed.to_quantized(self.grid_dtype)

    def quantize_inputs(self, bits: int | None, clip_ratio: float = 1.0) -> None:
        """From now on the input is quantized per token to `bits` and multiplied in integers (the int8 kernels:
        boa_kernels.int8_matmul; 4-bit codes widened); None: float inputs again."""
        if bits is not None and self.offsets is not None:
            raise BoaError("a layer on GGUF grids with block minimums (Q2_K/Q4_K/Q5_K) cannot take quantized inputs; "
                           "quantize its weights on another grid")
        self.activations = None if bits is None else (bits, clip_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations is not None:
            bits, clip_ratio = self.activations
            return int8_matmul(x, self.packed, self.bias, a_bits=bits, clip_ratio=clip_ratio)
        return packed_matmul(x, self.packed, self.bias)

    def _apply(self, fn, recurse=True):
        """model.to(dtype) / .half() cast float buffers; the grids stay float32, the layout's (and kernels') dtype."""
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float32:
            self.scales = self.scales.float()
        if self.offsets is not None and self.offsets.dtype != torch.float32:
            self.offsets = self.offsets.float()
        self._refresh()
        return self

    def extra_repr(self) -> str:
        groups = "per-channel" if self.scales.shape[1] == 1 else f"group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {groups}"


def pack_model(model: nn.Module, layers: dict, dtype: torch.dtype | None = None) -> nn.Module:
    """Replaces each named nn.Linear of `model` by a QuantLinear holding `layers[name]` (a QuantizedWeight or a
    PackedWeight) and the layer's bias; the float weight is dropped. Returns the model."""
    for name, weight in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        bias = None if getattr(old, "bias", None) is None else old.bias.detach()
        setattr(parent, child, QuantLinear(weight, bias, dtype))
    return model


def check_not_quantized(model: nn.Module) -> None:
    """BoaError if `model` already holds QuantLinear layers (a model boa.load returned): quantizing it again would
    find no float weights to quantize."""
    if any(isinstance(module, QuantLinear) for module in model.modules()):
        raise BoaError("this model is already quantized (it holds packed QuantLinear layers, as boa.load returns); "
                       "quantize the float model (boa.load_model) instead")
