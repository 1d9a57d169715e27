"""The CNN driver: a BatchNorm network and a source of calibration images (Genie-D's synthetic ones, real ones or
Gaussian noise) → Genie-M block reconstruction (or RTN) → a frozen quantized network and its report.

    import boa
    model, spec = boa.load_vision_model("fmnist-resnet")
    result = boa.quantize_vision(model, spec, boa.VisionQuantConfig(w_bits=4, a_bits=4, data="genie"),
                                 out="out/fmnist-w4a4")
    boa.save_vision(result, "out/fmnist-w4a4")
    qmodel, spec, manifest = boa.load_vision("out/fmnist-w4a4")
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from boa.core.errors import BoaError
from boa.core.output import check_output, checkpoint_folder
from boa.vision.config import VisionQuantConfig
from boa.vision.distillation import distill
from boa.vision.fake_quant import FrozenLayer
from boa.vision.format import MANIFEST, WRITER
from boa.vision.reconstruction import reconstruct


@dataclass
class VisionResult:
    model: nn.Sequential                 # frozen quantized copy (the float model is left as it was)
    layers: dict[str, FrozenLayer]
    model_name: str
    config: VisionQuantConfig
    seconds: dict[str, float]            # "data" (distillation, when Genie-D) and "quantize"
    unit_loss: list[dict]                # per unit: RTN's output error and the learned one


def calibration_images(model: nn.Module, spec, config: VisionQuantConfig, progress: bool = True,
                       checkpoint_dir=None) -> torch.Tensor:
    """config.n_images images in the model's input space, from config.data (distilled batches are checkpointed in
    checkpoint_dir when given, and a run that finds them there resumes)."""
    from boa.vision.images import gaussian_noise, real_images

    if config.data == "noise":
        return gaussian_noise(config.n_images, spec, config.seed)
    if config.data == "real":
        return real_images(spec, config.n_images, config.seed)
    return distill(model, spec.in_channels, spec.image_size, config.distill_config(), progress, checkpoint_dir).images


def quantize_vision(model: nn.Sequential, spec, config: VisionQuantConfig | None = None,
                    images: torch.Tensor | None = None, progress: bool = True, *, out: str | Path | None = None,
                    resume: bool = False, restart: bool = False) -> VisionResult:
    """A quantized copy of `model`; `images` (model inputs) replace config.data's when given.

    out: the folder the result will be saved to (boa.save_vision): checked before any work; its checkpoint
    OUT.partial keeps Genie-D's finished batches (the long part): resume=True continues from them, restart=True
    discards them, and without either they are refused rather than thrown away."""
    config = config or VisionQuantConfig()
    config.validate()
    checkpoint_dir = None
    if out is not None:
        check_output(out, MANIFEST, writer=WRITER)
        checkpoint_dir = checkpoint_folder(out, resume, restart)
    elif resume:
        raise BoaError("resume continues the run saved under its output folder; give the same --out (out=) as the "
                       "interrupted run")
    seconds = {}
    if images is None:
        start = time.perf_counter()
        images = calibration_images(model, spec, config, progress, checkpoint_dir)
        seconds["data"] = time.perf_counter() - start
    expected = (spec.in_channels, spec.image_size, spec.image_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise BoaError(f"calibration images must be (N, {', '.join(map(str, expected))}); got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise BoaError("calibration images hold NaN or Inf values")
    result = reconstruct(model, images, config.reconstruct_config(), progress=progress)
    seconds["quantize"] = result.seconds
    return VisionResult(result.model, result.layers, spec.name, config, seconds, result.unit_loss)
