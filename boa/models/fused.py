"""Fused projections (Phi-3's qkv_proj and gate_up_proj): quantized as the layers they fuse, stored fused.

A fused nn.Linear computes several projections of one input in one matrix, their outputs side by side (row ranges
of its weight). While a model is quantized, `split_fused` puts a SplitLinear in its place: one nn.Linear per part,
outputs concatenated, the same function. Every part is then a layer of its own with its own statistics (BoA's
q, k and v have different row factors) under a name of its own (`self_attn.qkv_proj.q`). `join_split` puts the
fused nn.Linear back (the parts' weights stacked) and merges the parts' codes and grids into the fused layer's: the
parts read one input, so their columns share one order (GPTQ's act-order permutation comes from that input's
Hessian) and the stacked codes are one quantized matrix, saved, exported and loaded as the model's own.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from boa.core.errors import BoaError
from boa.core.quantizer import QuantizedWeight


class SplitLinear(nn.Module):
    """A fused nn.Linear as one nn.Linear per part (name, rows), in row order; forward concatenates their outputs."""

    def __init__(self, fused: nn.Linear, parts: tuple[tuple[str, int], ...]):
        super().__init__()
        if sum(rows for _, rows in parts) != fused.out_features:
            raise BoaError(f"the parts {parts} do not add up to the fused layer's {fused.out_features} outputs")
        self.names = [name for name, _ in parts]
        start = 0
        for name, rows in parts:
            part = nn.Linear(fused.in_features, rows, bias=fused.bias is not None, device=fused.weight.device,
                             dtype=fused.weight.dtype)
            with torch.no_grad():
                part.weight.copy_(fused.weight[start:start + rows])
                if fused.bias is not None:
                    part.bias.copy_(fused.bias[start:start + rows])
            part.requires_grad_(fused.weight.requires_grad)
            self.add_module(name, part)
            start += rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, name)(x) for name in self.names], dim=-1)

    def joined(self) -> nn.Linear:
        parts = [getattr(self, name) for name in self.names]
        first = parts[0]
        fused = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                          device=first.weight.device, dtype=first.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            if first.bias is not None:
                fused.bias.copy_(torch.cat([p.bias for p in parts]))
        return fused.requires_grad_(first.weight.requires_grad)


def split_fused(model: nn.Module, adapter) -> None:
    """Every block's fused projections (adapter.fused_projections()) replaced by SplitLinears, in place."""
    for block in adapter.blocks(model):
        _split_block(block, adapter)


def _split_block(block: nn.Module, adapter) -> list[str]:
    """The block's fused projections that were not split yet, split in place; returns their paths."""
    split = []
    for path, parts in adapter.fused_projections().items():
        layer = block.get_submodule(path)
        if not isinstance(layer, SplitLinear):
            block.set_submodule(path, SplitLinear(layer, parts))
            split.append(path)
    return split


def _join_block(block: nn.Module, paths) -> None:
    for path in paths:
        layer = block.get_submodule(path)
        if isinstance(layer, SplitLinear):
            joined = layer.joined()
            for hook in layer._forward_pre_hooks.values():  # run-time transforms (quantized inputs) stay
                joined.register_forward_pre_hook(hook)
            block.set_submodule(path, joined)


@contextlib.contextmanager
def split_for_now(block: nn.Module, adapter):
    """The block with its fused projections split while inside (left as they were where already split): for work
    that acts on the parts, on a block that may hold them joined (a streamed block read for saving)."""
    split = _split_block(block, adapter)
    try:
        yield block
    finally:
        _join_block(block, split)


def stack_rows(parts: list[QuantizedWeight], name: str) -> QuantizedWeight:
    """The quantized matrix whose rows are the parts' rows, in order (they must share bits and column groups)."""
    first = parts[0]
    for q in parts[1:]:
        if q.bits != first.bits or not torch.equal(q.g_idx, first.g_idx):
            raise BoaError(f"the parts of the fused layer {name} were quantized with different bits or column groups "
                           "and cannot be stored as one matrix")
    offsets = [q.offset for q in parts]
    if any((o is None) != (offsets[0] is None) for o in offsets):
        raise BoaError(f"the parts of the fused layer {name} were quantized on grids with and without block minimums "
                       "and cannot be stored as one matrix")
    return QuantizedWeight(torch.cat([q.codes for q in parts]), torch.cat([q.scale for q in parts]),
                           torch.cat([q.zero for q in parts]), first.g_idx, first.bits,
                           None if offsets[0] is None else torch.cat(offsets))


def join_split(model: nn.Module, adapter, layers: dict[str, QuantizedWeight] | None = None) -> None:
    """split_fused undone in place: each SplitLinear replaced by the fused nn.Linear it stands for; in `layers`
    (full names → codes, as boa.quantize returns them) the parts' entries become the fused layer's."""
    for index, block in enumerate(adapter.blocks(model)):
        _join_block(block, adapter.fused_projections())
        if layers is not None:
            join_codes(layers, adapter, f"{adapter.blocks_path}.{index}.")


def join_codes(layers: dict[str, QuantizedWeight], adapter, prefix: str) -> None:
    """In `layers` (names → codes), the parts of each fused projection under `prefix` (a block's, or "" for names
    inside a block) become the fused layer's one entry."""
    for path, parts in adapter.fused_projections().items():
        names = [f"{prefix}{path}.{part}" for part, _ in parts]
        if any(n in layers for n in names):
            layers[prefix + path] = stack_rows([layers.pop(n) for n in names], prefix + path)
