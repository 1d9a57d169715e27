"""`QuantConfig`: every knob of a quantization run, validated on construction."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from boa.errors import BoaError

METHODS = ("rtn", "gptq")
BITS = (2, 3, 4, 8)
GRIDS = ("minmax", "mse", "hessian")


@dataclass
class QuantConfig:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128          # -1: one grid per output channel
    sym: bool = False
    grid: str = "minmax"           # how (scale, zero) are chosen: min-max, Σ|q−w|^2.4 search, H-weighted search
    act_order: bool = False        # GPTQ: quantize columns by decreasing diag(H)
    static_groups: bool = False    # GPTQ: group grids fixed from the original weights before any update
    block_size: int = 128          # GPTQ lazy-batch width
    percdamp: float = 0.01         # H += percdamp · mean(diag H) · I
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    true_sequential: bool = True   # collect a layer's statistics after the layers feeding it are quantized
    hessian_dtype: str = "float32"  # or "float64"
    cache_dtype: str = "float32"   # dtype of the cached block activations ("float16" halves their memory)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.method not in METHODS:
            raise BoaError(f"method={self.method!r} is not supported; choose one of {', '.join(METHODS)}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in BITS:
            raise BoaError(f"bits={self.bits!r} is not supported; choose one of {', '.join(map(str, BITS))}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or (
            self.group_size != -1 and self.group_size <= 0
        ):
            raise BoaError(
                f"group_size={self.group_size!r} is invalid; use -1 for per-channel grids or a positive integer "
                "(e.g. 128)"
            )
        if self.grid not in GRIDS:
            raise BoaError(f"grid={self.grid!r} is not supported; choose one of {', '.join(GRIDS)}")
        for name in ("block_size", "nsamples", "seqlen"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise BoaError(f"{name}={value!r} must be a positive integer")
        if not 0 <= self.percdamp < 1:
            raise BoaError(f"percdamp={self.percdamp!r} must be in [0, 1); 0.01 is the usual choice")
        if self.hessian_dtype not in ("float32", "float64"):
            raise BoaError(f"hessian_dtype={self.hessian_dtype!r}: use 'float32' or 'float64'")
        if self.cache_dtype not in ("float32", "float16", "bfloat16"):
            raise BoaError(f"cache_dtype={self.cache_dtype!r}: use 'float32', 'float16' or 'bfloat16'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
