"""`QuantConfig`: a quantization run's settings — the method (a typed config from boa.algorithms) and how the pipeline
runs it. Read back from manifests of every boa version."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from boa.algorithms import GPTQ, Method, method_from_dict
from boa.core.errors import BoaError
from boa.transforms import Transform, transform_from_dict

DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass
class QuantConfig:
    method: Method = field(default_factory=GPTQ)
    hessian_dtype: str = "float32"   # statistics: "float32" or "float64", whatever the model's dtype
    cache_dtype: str = "float32"     # cached block activations ("float16" halves their memory)
    true_sequential: bool = True     # collect a layer's statistics after the layers feeding it are quantized
    transforms: tuple[Transform, ...] = ()  # applied to the model, in order, before it is quantized (boa.transforms)
    widths: dict[str, tuple[int, int]] = field(default_factory=dict)  # full layer name -> (bits, group_size) where it
                                     # differs from the method's: mixed precision (boa.pipeline.mixed chooses them)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.method, Method):
            raise BoaError(f"method={self.method!r} must be a method config, e.g. boa.GPTQ(bits=4) or boa.TurboBoA()")
        self.method.validate()
        if self.hessian_dtype not in ("float32", "float64"):
            raise BoaError(f"hessian_dtype={self.hessian_dtype!r}: use 'float32' or 'float64'")
        if self.cache_dtype not in ("float32", "float16", "bfloat16"):
            raise BoaError(f"cache_dtype={self.cache_dtype!r}: use 'float32', 'float16' or 'bfloat16'")
        self.transforms = tuple(self.transforms)
        for transform in self.transforms:
            if not isinstance(transform, Transform):
                raise BoaError(f"transforms holds {transform!r}; each must be a transform config, e.g. "
                               "boa.transforms.QuaRot()")
            transform.validate()
        self.widths = {name: tuple(width) for name, width in self.widths.items()}
        for name, (bits, group_size) in self.widths.items():
            self.method.with_width(bits, group_size)  # validates

    def method_for(self, layer: str) -> Method:
        """The method that solves `layer` (its full module name): the run's, at the layer's own width if it has one."""
        width = self.widths.get(layer)
        return self.method if width is None else self.method.with_width(*width)

    def to_dict(self) -> dict:
        record = {**self.method.to_dict(), "hessian_dtype": self.hessian_dtype, "cache_dtype": self.cache_dtype,
                  "true_sequential": self.true_sequential}
        if self.transforms:  # absent when there are none: earlier runs' fingerprints stay what they were
            record["transforms"] = [t.to_dict() for t in self.transforms]
        if self.widths:  # likewise
            record["widths"] = {name: list(width) for name, width in sorted(self.widths.items())}
        return record

    @classmethod
    def from_dict(cls, data: dict) -> QuantConfig:
        """From to_dict's record, or from the flat record of boa ≤ 0.1 (every method's knobs side by side)."""
        options = {k: data[k] for k in ("hessian_dtype", "cache_dtype", "true_sequential") if k in data}
        transforms = tuple(transform_from_dict(t) for t in data.get("transforms", ()))
        widths = {name: tuple(width) for name, width in data.get("widths", {}).items()}
        return cls(method_from_dict(data), transforms=transforms, widths=widths, **options)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
