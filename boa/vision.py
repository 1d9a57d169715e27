"""The CNN driver: a BatchNorm network and a source of calibration images (Genie-D's synthetic ones, real ones or
Gaussian noise) → Genie-M block reconstruction (or RTN) → a frozen quantized network and its report.

    import boa
    model, spec = boa.load_vision_model("fmnist-resnet")
    result = boa.quantize_vision(model, spec, boa.VisionQuantConfig(w_bits=4, a_bits=4, data="genie"))
    boa.save_vision(result, "out/fmnist-w4a4")
    qmodel, spec, manifest = boa.load_vision("out/fmnist-w4a4")
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from boa.algorithms.genie import DistillConfig, ReconstructConfig, distill, reconstruct
from boa.errors import BoaError
from boa.nn.fake_quant import FrozenLayer

VISION_METHODS = ("genie-m", "rtn")
DATA_SOURCES = ("genie", "real", "noise")


@dataclass
class VisionQuantConfig:
    method: str = "genie-m"     # "genie-m": block reconstruction; "rtn": round to nearest, no learning
    data: str = "genie"         # calibration images: "genie" (zero-shot), "real" (few-shot) or "noise"
    n_images: int = 1024
    w_bits: int = 4
    a_bits: int = 4
    seed: int = 0
    distill: DistillConfig = field(default_factory=DistillConfig)            # used when data == "genie"
    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)  # its bits and seed follow the above

    def validate(self) -> None:
        if self.method not in VISION_METHODS:
            raise BoaError(f"method {self.method!r}: CNNs are quantized with {', '.join(VISION_METHODS)}")
        if self.data not in DATA_SOURCES:
            raise BoaError(f"data {self.data!r}: choose one of {', '.join(DATA_SOURCES)}")
        if self.n_images < 1:
            raise BoaError("n_images must be at least 1")
        self.reconstruct_config()  # validates bits, steps and QDrop

    def reconstruct_config(self) -> ReconstructConfig:
        config = ReconstructConfig(**{**self.reconstruct.__dict__, "w_bits": self.w_bits, "a_bits": self.a_bits,
                                      "seed": self.seed})
        if self.method == "rtn":
            config.iters = 0
        config.validate()
        return config

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("distill", "reconstruct")}
        out["reconstruct"] = self.reconstruct_config().__dict__
        if self.data == "genie":
            out["distill"] = {**self.distill.__dict__, "n_images": self.n_images, "seed": self.seed}
        return out


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
    from boa.data.images import gaussian_noise, real_images

    if config.data == "noise":
        return gaussian_noise(config.n_images, spec, config.seed)
    if config.data == "real":
        return real_images(spec, config.n_images, config.seed)
    distill_config = DistillConfig(**{**config.distill.__dict__, "n_images": config.n_images, "seed": config.seed})
    return distill(model, spec.in_channels, spec.image_size, distill_config, progress, checkpoint_dir).images


def quantize_vision(model: nn.Sequential, spec, config: VisionQuantConfig | None = None,
                    images: torch.Tensor | None = None, progress: bool = True, checkpoint_dir=None) -> VisionResult:
    """A quantized copy of `model`; `images` (model inputs) replace config.data's when given. checkpoint_dir keeps
    Genie-D's finished batches (the long part), so an interrupted run resumes from them."""
    config = config or VisionQuantConfig()
    config.validate()
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

