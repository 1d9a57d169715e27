"""`QuantConfig`: every knob of a quantization run, validated on construction."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from boa.errors import BoaError

METHODS = ("rtn", "gptq", "boa", "turboboa", "aespa")
ATTENTION_AWARE = ("boa", "turboboa", "aespa")
INITS = ("rtn", "gptq", "boa", "turboboa")  # what aespa's learned rounding starts from
V_ROW_FACTORS = ("exact", "identity")
# What `method` sets for the knobs left at None: GPTQ's paper defaults, the public BoA / TurboBoA code's
# (ALGORITHMS.md §4-5: Hessian-weighted grids; TurboBoA N = 16, α = 0.25, one refinement sweep).
METHOD_DEFAULTS = {
    "rtn": {"grid": "minmax", "rows_per_step": 1, "dx_alpha": 0.0, "refine_iters": 0},
    "gptq": {"grid": "minmax", "rows_per_step": 1, "dx_alpha": 0.0, "refine_iters": 0},
    "boa": {"grid": "hessian", "rows_per_step": 1, "dx_alpha": 0.0, "refine_iters": 0},
    "turboboa": {"grid": "hessian", "rows_per_step": 16, "dx_alpha": 0.25, "refine_iters": 1},
}
# aespa takes its init method's defaults, with the public aespa code's H-weighted grid whatever the init.
AESPA_DEFAULTS = {"init": "turboboa", "grid": "hessian"}
BITS = (2, 3, 4, 8)
GRIDS = ("minmax", "mse", "hessian")


@dataclass
class QuantConfig:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128          # -1: one grid per output channel
    sym: bool = False
    grid: str | None = None        # how (scale, zero) are chosen: min-max, Σ|q−w|^2.4 search, H-weighted search
    act_order: bool = False        # GPTQ: quantize columns by decreasing diag(H)
    static_groups: bool = False    # GPTQ: group grids fixed from the original weights before any update
    block_size: int = 128          # GPTQ lazy-batch width
    percdamp: float = 0.01         # H += percdamp · mean(diag H) · I
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    true_sequential: bool = True   # collect a layer's statistics after the layers feeding it are quantized
    # BoA / TurboBoA (None: the method's default, see METHOD_DEFAULTS)
    rows_per_step: int | None = None   # N rows of a head quantized jointly (1 = BoA)
    dx_alpha: float | None = None      # weight α of the earlier layers' error term D = α·2E[(X_fp − X_q)X_qᵀ]
    refine_iters: int | None = None    # coordinate-descent sweeps refining the scales after rounding
    v_row_factor: str = "exact"        # v_proj row factor: W_o,hᵀW_o,h ("exact") or I (the public code)
    row_order: bool = False            # BoA: rows of each head by decreasing diag(H_out)
    # aespa: AdaRound-style learned rounding on the attention-aware objectives (ALGORITHMS.md §6)
    init: str | None = None            # the method whose rounding it starts from (aespa's default: turboboa)
    rounding_iters: int = 500          # Adam steps per layer
    rounding_lr: float = 0.1
    round_weight: float = 1.0          # weight of the rounding regulariser Σ(1 − |2h − 1|^β)
    round_weight_qkv: float = 1.5      # ... for q/k/v
    hessian_dtype: str = "float32"  # or "float64"
    cache_dtype: str = "float32"   # dtype of the cached block activations ("float16" halves their memory)

    def __post_init__(self):
        if self.method == "aespa":
            self.init = self.init or AESPA_DEFAULTS["init"]
            defaults = {**METHOD_DEFAULTS.get(self.init, {}), **AESPA_DEFAULTS}
        else:
            defaults = METHOD_DEFAULTS.get(self.method, {})
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.validate()

    @property
    def attention_aware(self) -> bool:
        """Whether q/k/v get Kronecker (row-factor) Hessians from the attention statistics."""
        return self.method in ATTENTION_AWARE

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
        if self.method == "aespa":
            if self.init not in INITS:
                raise BoaError(f"init={self.init!r} is not supported; aespa starts from one of {', '.join(INITS)}")
            if self.init == "rtn" and self.dx_alpha > 0:
                raise BoaError("dx_alpha > 0 needs an init that compensates (gptq, boa or turboboa), not rtn")
            for name in ("rounding_lr", "round_weight", "round_weight_qkv"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise BoaError(f"{name}={value!r} must be a non-negative number")
        elif self.init is not None:
            raise BoaError(f"init={self.init!r} applies only to method='aespa' (it names where learned rounding starts)")
        if self.grid not in GRIDS:
            raise BoaError(f"grid={self.grid!r} is not supported; choose one of {', '.join(GRIDS)}")
        for name in ("block_size", "nsamples", "seqlen", "rows_per_step", "rounding_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise BoaError(f"{name}={value!r} must be a positive integer")
        if not 0 <= self.percdamp < 1:
            raise BoaError(f"percdamp={self.percdamp!r} must be in [0, 1); 0.01 is the usual choice")
        if isinstance(self.refine_iters, bool) or not isinstance(self.refine_iters, int) or self.refine_iters < 0:
            raise BoaError(f"refine_iters={self.refine_iters!r} must be a non-negative integer (0: no refinement)")
        if not isinstance(self.dx_alpha, (int, float)) or isinstance(self.dx_alpha, bool) or not (
            0 <= self.dx_alpha <= 1
        ):
            raise BoaError(f"dx_alpha={self.dx_alpha!r} must be in [0, 1]; 0 turns the dX correction off, 0.25 is usual")
        if self.v_row_factor not in V_ROW_FACTORS:
            raise BoaError(f"v_row_factor={self.v_row_factor!r}: use one of {', '.join(V_ROW_FACTORS)}")
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
