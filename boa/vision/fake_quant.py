"""Fake quantization of a CNN's conv and linear layers, in place, without changing the modules' types.

A layer's weight becomes a parametrization (LearnedWeightQuantizer) while it is being learned, and a plain
weight holding the dequantized codes once frozen; its input goes through `layer.input_quantizer` (an ActQuantizer,
a forward pre-hook) when it has one. Keeping the original modules keeps whatever padding or subclass logic they
have (e.g. TensorFlow "same" padding).

Bit widths (the public Genie/BRECQ setting): the first layer W8 on the unquantized image, the second layer's
input A8, the last layer W8A8, every other layer W{w_bits}A{a_bits}.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from boa.core.quantizer import QuantizedWeight
from boa.vision.quantizers import ActQuantizer, LearnedWeightQuantizer

QUANTIZABLE = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class LayerBits:
    weight: int
    input: int | None  # None: the input stays floating point


def quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv and linear layers in module order (the forward order of boa's vision models)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def bit_plan(n_layers: int, w_bits: int, a_bits: int, boundary_bits: int = 8) -> list[LayerBits]:
    plan = [LayerBits(w_bits, a_bits) for _ in range(n_layers)]
    plan[0] = LayerBits(boundary_bits, None)
    if n_layers > 1:
        plan[1] = LayerBits(plan[1].weight, boundary_bits)
        plan[-1] = LayerBits(boundary_bits, boundary_bits)
    return plan


def _quantize_input(layer: nn.Module, args: tuple) -> tuple:
    return (layer.input_quantizer(args[0]), *args[1:])


def _add_input_quantizer(layer: nn.Module, quantizer: ActQuantizer) -> None:
    layer.input_quantizer = quantizer
    layer.register_forward_pre_hook(_quantize_input)


def attach_learned(layer: nn.Module, bits: LayerBits) -> None:
    """Makes the layer's weight a learned quantizer and, if bits.input, quantizes its input."""
    parametrize.register_parametrization(layer, "weight", LearnedWeightQuantizer(layer.weight, bits.weight))
    if bits.input is not None:
        _add_input_quantizer(layer, ActQuantizer(bits.input))


def weight_quantizer(layer: nn.Module) -> LearnedWeightQuantizer:
    return layer.parametrizations.weight[0]


@dataclass
class FrozenLayer:
    """What a quantized layer is, for saving: its weight (codes (out, fan_in), one grid per output channel) and its
    input quantizer's step."""

    weight: QuantizedWeight
    input_bits: int | None = None
    input_step: torch.Tensor | None = None
    input_signed: bool = False


def freeze(layer: nn.Module) -> FrozenLayer:
    """Hardens the learned quantizer into a plain weight (the dequantized codes); returns what defines the layer."""
    quantizer = weight_quantizer(layer)
    quantizer.hard = True
    with torch.no_grad():
        codes = quantizer.codes(layer.parametrizations.weight.original).to(torch.uint8)
        g_idx = torch.zeros(codes.shape[1], dtype=torch.int32)  # one group: the whole row
        frozen = FrozenLayer(QuantizedWeight(codes, quantizer.scale.detach().clone(), quantizer.zero.clone(), g_idx,
                                             quantizer.bits))
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    _set_weight(layer, frozen)
    act = getattr(layer, "input_quantizer", None)
    if act is not None:
        act.drop = 0.0
        act.step.requires_grad_(False)
        frozen.input_bits, frozen.input_step, frozen.input_signed = act.bits, act.step.detach().clone(), bool(act.signed)
    return frozen


def _set_weight(layer: nn.Module, frozen: FrozenLayer) -> None:
    # s · (codes − z) element by element, as the learned quantizer's forward: saved and live outputs are identical.
    weight = frozen.weight.dequantize().reshape(layer.weight.shape)
    layer.weight = nn.Parameter(weight, requires_grad=False)


def apply_frozen(layer: nn.Module, frozen: FrozenLayer) -> None:
    """Rebuilds a frozen quantized layer (from saved tensors) on a fresh float layer."""
    _set_weight(layer, frozen)
    if frozen.input_bits is not None:
        act = ActQuantizer(frozen.input_bits)
        with torch.no_grad():
            act.step.copy_(frozen.input_step)
            act.signed.fill_(frozen.input_signed)
            act.ready.fill_(True)
        act.step.requires_grad_(False)
        _add_input_quantizer(layer, act)
