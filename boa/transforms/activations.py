"""Dynamic per-token quantization of the inputs of every quantized linear (QuaRot's W·A·: ALGORITHMS.md §7).

Each token's input row x gets its own symmetric grid at run time: s = clip · max|x| / (2^(b−1) − 1), codes
round(x / s) clamped to [−2^(b−1), 2^(b−1) − 1]; the layer computes with s · codes (fake quantization here; the
int8 kernels compute on the codes). Applied by forward pre-hooks. With `calibrate` (the default) they run while
the model is quantized, so the statistics see the quantized inputs each layer will see at inference (GPTQ then
minimises ‖(W − Q) X̂‖ for X̂ what it will be fed); without it they are switched on only once every block is done
(QuaRot's order: weights quantized on float activations).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from operator import attrgetter
from typing import ClassVar

import torch
from boa_kernels.int8_matmul import per_token_codes

from boa.core.errors import BoaError
from boa.transforms.base import Transform, check_quantizer, register_transform

A_BITS = (4, 8)


def quantize_per_token(x: torch.Tensor, bits: int, clip_ratio: float) -> torch.Tensor:
    """x fake-quantized with a symmetric grid per row (last axis), computed in float32, returned in x's dtype."""
    codes, scale = per_token_codes(x, bits, clip_ratio)  # the int8 kernels' own codes, so both paths agree
    return (codes.float() * scale).to(x.dtype)


class _QuantizeInputs:
    """A forward pre-hook shared by a block's linears: inputs quantized per token; a tensor fed to several layers
    (q/k/v, gate/up) is quantized once and the same result handed to each, so they still share one input."""

    lossy = True  # not part of the float model: TurboBoA's FP path runs without it

    def __init__(self, bits: int, clip_ratio: float, enabled: bool = True):
        self.bits, self.clip_ratio, self.enabled = bits, clip_ratio, enabled
        self._last: tuple[weakref.ref, torch.Tensor] | None = None

    def __call__(self, module, args):
        if not self.enabled:
            return None
        x = args[0]
        if self._last is not None and self._last[0]() is x:
            return (self._last[1], *args[1:])
        xq = quantize_per_token(x, self.bits, self.clip_ratio)
        # TurboBoA's dX term measures the gap to the float path from the input before this rounding: the layer's own
        # activation rounding is noise its weights would fit on the calibration windows, not an upstream error
        xq.unquantized = x
        self._last = (weakref.ref(x), xq)
        return (xq, *args[1:])


class _FloatInputsAgain:
    """The handle of a packed layer's integer path: remove() gives it float inputs again."""

    def __init__(self, layer):
        self.layer = layer

    def remove(self) -> None:
        self.layer.quantize_inputs(None)


@register_transform
@dataclass
class ActivationQuant(Transform):
    """Every quantized linear of the blocks reads its input quantized per token to `bits` (the head stays float)."""

    name: ClassVar[str] = "activations"
    bits: int = 8
    clip_ratio: float = 0.9
    calibrate: bool = True  # statistics from the quantized inputs (False: from float inputs, as QuaRot's GPTQ does)

    def validate(self) -> None:
        check_quantizer("activation", self.bits, A_BITS, self.clip_ratio, 0.9)
        if not isinstance(self.calibrate, bool):
            raise BoaError(f"activation calibrate={self.calibrate!r} must be true or false")

    def attach(self, model, adapter, enabled: bool = True) -> list:
        """Packed layers (boa.load's QuantLinear) compute in integers on the int8 kernels; float ones (a model
        being quantized) get a fake-quantizing pre-hook. A fused projection is one layer here: split for a run, its
        SplitLinear takes the hook (its parts read the rounded input) and hands it to the joined layer."""
        handles = []
        for block in adapter.blocks(model):
            hook = _QuantizeInputs(self.bits, self.clip_ratio, enabled)
            for name in adapter.stored_linear_names():
                layer = attrgetter(name)(block)
                if hasattr(layer, "quantize_inputs"):
                    layer.quantize_inputs(self.bits, self.clip_ratio)
                    handles.append(_FloatInputsAgain(layer))
                else:
                    handles.append(layer.register_forward_pre_hook(hook))
        return handles

    def attach_for_calibration(self, model, adapter) -> list:
        return self.attach(model, adapter, enabled=self.calibrate)

    def finish(self, model, adapter) -> None:
        for module in model.modules():
            for hook in module._forward_pre_hooks.values():
                if isinstance(hook, _QuantizeInputs):
                    hook.enabled = True
