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

    def to_dict(self) -> dict:
        record = {**self.method.to_dict(), "hessian_dtype": self.hessian_dtype, "cache_dtype": self.cache_dtype,
                  "true_sequential": self.true_sequential}
        if self.transforms:  # absent when there are none: earlier runs' fingerprints stay what they were
            record["transforms"] = [t.to_dict() for t in self.transforms]
        return record

    @classmethod
    def from_dict(cls, data: dict) -> QuantConfig:
        """From to_dict's record, or from the flat record of boa ≤ 0.1 (every method's knobs side by side)."""
        options = {k: data[k] for k in ("hessian_dtype", "cache_dtype", "true_sequential") if k in data}
        transforms = tuple(transform_from_dict(t) for t in data.get("transforms", ()))
        return cls(method_from_dict(data), transforms=transforms, **options)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
