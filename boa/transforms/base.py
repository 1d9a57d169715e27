"""What a transform is to the pipeline: a typed config that changes the model before (and around) its quantization
and composes with every method — a rotation fused into the weights, quantizers on activations. Transforms register
by name like methods, so that manifests record them and `boa.load` rebuilds the same model.

A transform works on a model in two parts, so that a streamed model can take it one block at a time as each block is
loaded: `fuse_outside` (embeddings, final norm, head) and `fuse_block` (one decoder block, in place, weights on any
device); a streamed model calls `fuse_loaded` on each module it reads from the shards. `attach` adds what runs at inference time (online rotations, activation quantizers) to a model whose
weights are already transformed — a freshly fused one, or one rebuilt by `boa.load` — and returns the hook handles;
a transform may calibrate with its run-time parts in another state (`attach_for_calibration`, then `finish`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from torch import nn
from torch.utils.hooks import RemovableHandle

from boa.core.errors import BoaError

TRANSFORMS: dict[str, type["Transform"]] = {}


def register_transform(cls):
    TRANSFORMS[cls.name] = cls
    return cls


@dataclass
class Transform:
    name: ClassVar[str]

    def validate(self) -> None:
        pass

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}

    def fuse_outside(self, model: nn.Module, adapter) -> None:
        """Changes the weights outside the blocks (embeddings, final norm, head), in place."""

    def fuse_block(self, block: nn.Module, adapter) -> None:
        """Changes one decoder block's weights, in place."""

    def fuse_loaded(self, model: nn.Module, adapter, module: nn.Module, raw) -> None:
        """A streamed model's `module` just read from the shards (a block, or a module outside the blocks), changed
        in place as `fuse_block` / `fuse_outside` would; `raw(name)` reads any other tensor as the checkpoint holds
        it (e.g. a norm weight to fold into a head loaded alone)."""
        if any(module is block for block in adapter.blocks(model)):
            self.fuse_block(module, adapter)

    def attach(self, model: nn.Module, adapter) -> list[RemovableHandle]:
        """Adds the run-time parts (hooks) to a model whose weights this transform already changed."""
        return []

    def attach_for_calibration(self, model: nn.Module, adapter) -> list[RemovableHandle]:
        """The run-time parts as the calibration should see them (by default as at inference)."""
        return self.attach(model, adapter)

    def finish(self, model: nn.Module, adapter) -> None:
        """After the last block is quantized: the run-time parts switched to what inference runs."""

    def apply(self, model: nn.Module, adapter) -> list[RemovableHandle]:
        """The whole transform on a model in memory, before quantizing it: fuse everything, then attach what the
        calibration runs (`finish` completes it afterwards)."""
        self.fuse_outside(model, adapter)
        for block in adapter.blocks(model):
            self.fuse_block(block, adapter)
        return self.attach_for_calibration(model, adapter)


def check_quantizer(what: str, bits, allowed: tuple[int, ...], clip_ratio, usual_clip: float) -> None:
    """A run-time quantizer's settings: bits one of `allowed`, clip_ratio in (0, 1]."""
    if isinstance(bits, bool) or bits not in allowed:
        raise BoaError(f"{what} bits={bits!r}: choose one of {', '.join(map(str, allowed))} (16 means not "
                       "quantized: leave the transform out)")
    if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, (int, float)) or not 0 < clip_ratio <= 1:
        raise BoaError(f"{what} clip_ratio={clip_ratio!r} must be in (0, 1]; QuaRot uses {usual_clip}")


def transform_from_dict(data: dict) -> Transform:
    data = dict(data)
    name = data.pop("name", None)
    if name not in TRANSFORMS:
        raise BoaError(f"unknown transform {name!r}; boa knows {', '.join(sorted(TRANSFORMS))} (a newer boa wrote "
                       "this file?)")
    fields = {f.name for f in dataclasses.fields(TRANSFORMS[name])}
    unknown = set(data) - fields
    if unknown:
        raise BoaError(f"transform {name!r} has no settings {sorted(unknown)}")
    transform = TRANSFORMS[name](**data)
    transform.validate()
    return transform
