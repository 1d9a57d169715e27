"""The CNN path's settings: Genie-D's (DistillConfig), Genie-M's (ReconstructConfig) and a whole run's
(VisionQuantConfig). Plain dataclasses that import none of the CNN modules (the CLI builds its defaults from them)."""
from __future__ import annotations

from dataclasses import dataclass, field

from boa.core.errors import BoaError
from boa_kernels.packed_matmul import KERNEL_BITS

VISION_METHODS = ("genie-m", "rtn")
DATA_SOURCES = ("genie", "real", "noise")


@dataclass
class DistillConfig:
    """Genie-D (boa.vision.distillation): the public code's defaults."""

    n_images: int = 1024
    batch_size: int = 128
    iters: int = 4000
    latent_dim: int = 256
    lr_latent: float = 0.1
    lr_generator: float = 0.01
    swing: bool = True
    seed: int = 0


@dataclass
class ReconstructConfig:
    """Genie-M (boa.vision.reconstruction); iters = 0 is RTN."""

    w_bits: int = 4
    a_bits: int = 4
    iters: int = 20000          # per unit; 0 = RTN
    batch_size: int = 32
    lr_weight_step: float = 1e-4
    lr_act_step: float = 4e-5
    lr_rounding: float = 1e-3
    round_weight: float = 0.01  # λ
    qdrop: float = 0.5
    boundary_bits: int = 8      # first and last layers
    init_images: int = 256      # activation steps are initialised on this many quantized inputs
    seed: int = 0

    def validate(self) -> None:
        for name, bits in (("w_bits", self.w_bits), ("boundary_bits", self.boundary_bits)):
            if bits not in KERNEL_BITS:  # the widths the packed kernels read (5/6 exist only for GGUF's types)
                raise BoaError(f"{name}={bits}: weights are saved packed, at {', '.join(map(str, KERNEL_BITS))} bits")
        if not 2 <= self.a_bits <= 8:
            raise BoaError(f"a_bits={self.a_bits}: activations are quantized at 2 to 8 bits")
        if self.iters < 0 or self.batch_size < 1:
            raise BoaError("iters must be ≥ 0 (0 = RTN) and batch_size ≥ 1")
        if not 0 <= self.qdrop < 1:
            raise BoaError(f"qdrop={self.qdrop}: the probability of keeping an activation in float is in [0, 1)")


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

    def distill_config(self) -> DistillConfig:
        """Genie-D's settings for this run: its image count and seed follow the run's."""
        return DistillConfig(**{**self.distill.__dict__, "n_images": self.n_images, "seed": self.seed})

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("distill", "reconstruct")}
        out["reconstruct"] = self.reconstruct_config().__dict__
        if self.data == "genie":
            out["distill"] = self.distill_config().__dict__
        return out
