"""What a quantization method is to the pipeline: a typed config that declares the statistics it needs and solves one
layer from them. Methods register by name, so that the CLI, saved manifests and the bench find them; adding one is
a new class with `@register`, never a branch elsewhere.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from boa.core.errors import BoaError
from boa.core.gguf_grids import gguf_type
from boa.core.quantizer import QuantizedWeight, QuantSpec

BITS = (2, 3, 4, 8)
GRIDS = ("minmax", "mse", "hessian", "hessian-fast")
# The H-weighted search BoA, TurboBoA and aespa's inits use unless told: the diag(H) shortlist measured as accurate as
# the exhaustive "hessian" search at W3 and W2 g64 in ~1/7 of its H products (README, issue 24)
H_WEIGHTED_DEFAULT = "hessian-fast"
V_ROW_FACTORS = ("exact", "identity")

REGISTRY: dict[str, type[Method]] = {}


def register(cls):
    """Class decorator: makes a method known by its `name`."""
    REGISTRY[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Needs:
    """The calibration statistics a method's solve reads (boa.stats gathers them).

    hessian: input Hessians H = 2E[XXᵀ]; attention: q/k/v row factors from the attention (BoA's Kronecker
    Hessians), with v_proj's row factor W_o,hᵀW_o,h ("exact") or I ("identity"); dx: the FP path runs beside the
    quantized one for the dX term 2E[(X_fp − X_q)X_qᵀ] (TurboBoA), on the first `dx_windows` calibration windows (0:
    all of them)."""

    hessian: bool = False
    attention: bool = False
    v_row_factor: str = "exact"
    dx: bool = False
    dx_windows: int = 0


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(owner, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if not is_int(value) or value <= 0:
            raise BoaError(f"{name}={value!r} must be a positive integer")


def check_number(owner, name: str, low: float, high: float | None = None, hint: str = "") -> None:
    value = getattr(owner, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or (
        high is not None and value > high
    ):
        span = f"in [{low}, {high}]" if high is not None else f"at least {low}"
        raise BoaError(f"{name}={value!r} must be a number {span}{hint}")


class Method:
    """A quantization method: a typed config (a dataclass) that declares the statistics it needs and solves one layer
    from them. Subclasses set `name` and register."""

    name: ClassVar[str]

    def __post_init__(self):
        self.validate()

    @property
    def spec(self) -> QuantSpec:
        """The grid the codes live on."""
        raise NotImplementedError

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def group_size(self) -> int:
        return self.spec.group_size

    def validate(self) -> None:
        pass

    def needs(self) -> Needs:
        raise NotImplementedError

    def solve(self, W: torch.Tensor, stats, *, qkv: bool = False, progress: str | None = None) -> QuantizedWeight:
        """Codes and grids for the weight W (rows, cols) from its layer's statistics (boa.stats.LayerStats, None when
        the method needs none). qkv: the layer is q/k/v_proj; progress: a label for a per-layer progress bar."""
        raise NotImplementedError

    def with_width(self, bits: int, group_size: int) -> Method:
        """The same method at another width (a layer's mixed-precision setting)."""
        raise BoaError(f"method {self.name!r} has no bit width to change")

    @property
    def label(self) -> str:
        """Short name of the setting, e.g. "gptq w4g128"."""
        return f"{self.name} w{self.bits}" + (f"g{self.group_size}" if self.group_size != -1 else "")

    def to_dict(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Method:
        """The method from its fields; unknown keys and None values (meaning: the default) are ignored, so a flat
        record of every method's knobs (the CLI's flags, a manifest of boa ≤ 0.1) reads as well."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known and v is not None})


@dataclass
class GridMethod(Method):
    """A method that chooses its own uniform grids (ALGORITHMS.md §1): `bits`, one grid per `group_size` input
    columns (-1: per output channel), symmetric or not, chosen by `grid` (min-max, Σ|q−w|^2.4 search, H-weighted
    search)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    grid: str = "minmax"
    gguf: str | None = None  # a GGUF type (Q4_0, ...): its bits, block and symmetry replace bits/group_size/sym, and
                             # every grid is one the type can hold (boa.core.gguf_grids)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, sym=self.sym, group_size=self.group_size, grid=self.grid, gguf=self.gguf)

    @property
    def label(self) -> str:
        return super().label if self.gguf is None else f"{self.name} gguf:{self.gguf}"

    def with_width(self, bits: int, group_size: int) -> GridMethod:
        if self.gguf is not None:
            raise BoaError(f"a GGUF type ({self.gguf}) fixes every layer's width; mixed precision takes plain grids "
                           "(drop --grid gguf:...)")
        return dataclasses.replace(self, bits=bits, group_size=group_size)

    def validate(self) -> None:
        if self.gguf is not None:
            kind = gguf_type(str(self.gguf))
            self.gguf, self.bits, self.group_size, self.sym = kind.name, kind.bits, kind.block, not kind.asymmetric
        if self.gguf is None and (not is_int(self.bits) or self.bits not in BITS):  # a GGUF type sets its own
            raise BoaError(f"bits={self.bits!r} is not supported; choose one of {', '.join(map(str, BITS))}")
        if not is_int(self.group_size) or (self.group_size != -1 and self.group_size <= 0):
            raise BoaError(f"group_size={self.group_size!r} is invalid; use -1 for per-channel grids or a positive "
                           "integer (e.g. 128)")
        if self.grid not in GRIDS:
            raise BoaError(f"grid={self.grid!r} is not supported; choose one of {', '.join(GRIDS)}")


def method_from_dict(data: dict) -> Method:
    """Any registered method from {"method": name, ...its fields}."""
    name = data.get("method")
    if name not in REGISTRY:
        raise BoaError(f"method={name!r} is not supported; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name].from_dict(data)
