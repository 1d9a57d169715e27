"""The uniform quantizer: grids (scale s, zero point z), integer codes and fake-quantization.

    q = s · (clamp(round(w / s) + z, 0, 2^b − 1) − z)

Shapes: weights are (..., rows, n); a grid holds one (s, z) per row, shaped (..., rows, 1) so it broadcasts over
the n columns it covers (a whole row per-channel, or one group of columns).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from boa.core.errors import BoaError
from boa.core.gguf_grids import SUPER_BLOCK, GGUFType, gguf_type, offset_candidates, snap_grid, super_units

# Clip-ratio search: candidates p = 1 − i/100 for i = 0..CLIP_STEPS−1 (ALGORITHMS.md §3).
CLIP_STEPS = 100
# The H-weighted search scores every COARSE-th clip ratio, then the ratios around each row's best (31 of 100).
COARSE = 4
# The "MMSE" grid search scores candidates by Σ|q − w|^NORM.
MSE_NORM = 2.4
# "hessian-fast": each stage of the H-weighted search scores its candidates by the diagonal of H first (n
# multiply-adds a weight instead of n²) and gives the exact score to each row's SHORTLIST best of them.
SHORTLIST = 4
H_WEIGHTED = ("hessian", "hessian-fast")


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    sym: bool = False
    group_size: int = -1      # -1: per-channel
    grid: str = "minmax"      # "minmax" | "mse" | "hessian" | "hessian-fast": how a grid is searched
    gguf: str | None = None   # a GGUF type whose grids the search keeps to (boa.core.gguf_grids)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def h_weighted(self) -> bool:
        """Whether the grid search scores candidates with the input Hessian."""
        return self.grid in H_WEIGHTED

    @property
    def gguf_type(self) -> GGUFType | None:
        return None if self.gguf is None else gguf_type(self.gguf)

    def n_groups(self, cols: int) -> int:
        return 1 if self.group_size == -1 else -(-cols // self.group_size)

    def group_width(self, cols: int) -> int:
        return cols if self.group_size == -1 else self.group_size


class Grid(NamedTuple):
    """Grids (..., rows, groups): w ≈ scale · (c − zero) − offset. `offset` holds GGUF's block minimums (Q2_K, Q4_K,
    Q5_K: zero is then 0); None for every other grid, whose zero points are integers."""

    scale: torch.Tensor
    zero: torch.Tensor
    offset: torch.Tensor | None = None


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
             offset: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes in [0, maxq], as floats of w's dtype."""
    if offset is not None:
        w = w + offset
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               offset: torch.Tensor | None = None) -> torch.Tensor:
    q = scale * (codes - zero)
    return q if offset is None else q - offset


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
                  offset: torch.Tensor | None = None) -> torch.Tensor:
    return dequantize(quantize(w, scale, zero, maxq, offset), scale, zero, offset)


def _minmax_grid(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) covering [xmin, xmax] (which always contains 0)."""
    if spec.sym and spec.gguf:
        # GGUF's symmetric grids hold codes −2^(b−1) … 2^(b−1) − 1 around their middle: like llama.cpp, put the weight
        # of largest magnitude on the longer side, −2^(b−1) (a negative scale when that weight is positive), for a
        # step of amax / 2^(b−1), finer than the 2·amax / (2^b − 1) that covers ±amax
        signed_max = torch.where(xmax >= -xmin, xmax, xmin)
        signed_max = torch.where(signed_max == 0, torch.ones_like(signed_max), signed_max)  # an all-zero group
        half = (spec.maxq + 1) / 2
        return -signed_max / half, torch.full_like(signed_max, half)
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        # GPTQ's reference keeps xmin = 0 for a group without negative weights, whose grid then covers only half its
        # range
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)  # an all-zero row: any grid works, keep the scale finite
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / spec.maxq
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


# The candidate search scores grids in chunks of at most this many weights (candidates × the weights of w).
SEARCH_CHUNK = 1 << 20


def find_grid(w: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None = None,
              unit: torch.Tensor | None = None) -> Grid:
    """One grid per row of w (..., rows, n), each tensor shaped (..., rows, 1).

    grid "minmax" covers each row's range; "mse" and "hessian" search clip ratios p = 1 − i/100 (and, asymmetric,
    the zero point rounded down or up) for the lowest Σ|q − w|^2.4, or the lowest (q − w) H (q − w)ᵀ with H the
    (n × n) input-Hessian block of these columns. The H-weighted search, whose scores cost a matrix product each,
    is coarse-to-fine: every COARSE-th ratio, then the ratios between each row's best and its coarse neighbours;
    "hessian-fast" ranks each stage's candidates by the diagonal of H and scores only each row's SHORTLIST best
    exactly. Candidates are scored many at a time (one batched product per chunk); ties go to the earlier candidate
    (in "hessian-fast", the earlier in the diagonal ranking), the min-max grid first. With spec.gguf every candidate
    is first put on the nearest grid the GGUF type can hold (K types: `unit` (..., rows, 2) holds the super-block's d
    and dmin; the types with block minimums take the offsets dmin·m below and above the range's low end, as the
    others take zero points).
    """
    xmin = w.amin(dim=-1, keepdim=True).clamp(max=0)
    xmax = w.amax(dim=-1, keepdim=True).clamp(min=0)
    kind = spec.gguf_type
    minimums = kind is not None and kind.minimums

    def representable(scale, zero):
        return (scale, zero) if kind is None else snap_grid(kind, scale, zero, unit)

    def minmax() -> Grid:
        scale, zero = representable(*_minmax_grid(xmin, xmax, spec))
        if not minimums:
            return Grid(scale, zero)
        below, above = offset_candidates(kind, -xmin, unit)
        offset = torch.where((above + xmin).abs() < (below + xmin).abs(), above, below)  # the nearer (ties: below)
        return Grid(scale, torch.zeros_like(scale), offset)

    if spec.grid == "minmax":
        return minmax()
    if spec.h_weighted and hessian is None:
        raise BoaError(f"grid={spec.grid!r} needs the layer's input Hessian; use grid='mse' or 'minmax' for RTN")

    def candidates(steps: torch.Tensor) -> tuple[Grid, torch.Tensor]:
        """Grids for clip steps (K, ..., rows, 1), each with its zero points (offsets) below and above: the grids
        (K·Z, ..., rows, 1) and their steps."""
        p = (1 - steps.double() / 100).to(w.dtype)  # as 1 − i/100 in Python floats, then w's dtype
        scale, zero = _minmax_grid(p * xmin, p * xmax, spec)
        if spec.sym:
            return Grid(*representable(scale, zero)), steps
        if minimums:
            offsets = offset_candidates(kind, -p * xmin, unit).transpose(0, 1)  # (K, 2, ...)
            scale = representable(scale, zero)[0].unsqueeze(1).expand_as(offsets).flatten(0, 1)
            grid = Grid(scale, torch.zeros_like(scale), offsets.flatten(0, 1))
            return grid, steps.unsqueeze(1).expand_as(offsets).flatten(0, 1)
        # (K, 2, ...); clamped: for a row with no positive weight, -p·xmin/scale is maxq up to rounding, and its
        # ceiling maxq + 1 is no b-bit zero point (nothing packs or exports it)
        zeros = torch.stack([torch.floor(-p * xmin / scale), torch.ceil(-p * xmin / scale)], 1).clamp(0, spec.maxq)
        scale, zero = representable(scale.unsqueeze(1).expand_as(zeros).flatten(0, 1), zeros.flatten(0, 1))
        return Grid(scale, zero), steps.unsqueeze(1).expand_as(zeros).flatten(0, 1)

    def score(grid: Grid, diagonal: bool = False) -> torch.Tensor:
        """Scores of K candidate grids (K, ..., rows, 1); `diagonal`: by the diagonal of H alone."""
        if diagonal and grid.offset is None:  # the shortlist's pass over every candidate: in place, one buffer
            err = torch.div(w, grid.scale).round_().add_(grid.zero).clamp_(0, spec.maxq)
            err = err.sub_(grid.zero).mul_(grid.scale).sub_(w)
        else:
            err = fake_quantize(w, *grid[:2], spec.maxq, grid.offset) - w
        if diagonal:
            return err.mul_(err) @ hessian.diagonal(dim1=-2, dim2=-1).unsqueeze(-1).to(err.dtype)
        if spec.grid == "mse":
            return err.abs().pow(MSE_NORM).sum(-1, keepdim=True)
        # The candidates join the rows, (..., K·rows, n) @ (..., n, n): a per-head H is then never broadcast
        # (copied) along the candidates.
        stacked = err.movedim(0, -3)
        HE = (stacked.reshape(*stacked.shape[:-3], -1, w.shape[-1]) @ hessian).reshape(stacked.shape)
        return (HE.movedim(-3, 0) * err).sum(-1, keepdim=True)

    best_grid = minmax()
    best = score(Grid(*(None if x is None else x[None] for x in best_grid)))[0]
    best_step = torch.zeros_like(best, dtype=torch.long)

    chunk = max(1, SEARCH_CHUNK // max(1, w.numel()))

    def shortlisted(grid: Grid, step: torch.Tensor) -> tuple[Grid, torch.Tensor]:
        """Each row's SHORTLIST candidates of least diagonal score (a stable ranking), (SHORTLIST, ..., rows, 1)."""
        proxy = torch.cat([score(Grid(*(None if x is None else x[c0 : c0 + chunk] for x in grid)), diagonal=True)
                           for c0 in range(0, step.shape[0], chunk)])
        keep = torch.sort(proxy, dim=0, stable=True).indices[:SHORTLIST]
        return (Grid(*(None if x is None else torch.gather(x.expand_as(proxy), 0, keep) for x in grid)),
                torch.gather(step.expand_as(proxy), 0, keep))

    def consider(steps: torch.Tensor) -> None:
        """Keeps, per row, the first strictly better of the candidates for these steps (K, ..., rows, 1)."""
        nonlocal best, best_grid, best_step
        grid, step = candidates(steps)
        if spec.grid == "hessian-fast" and step.shape[0] > SHORTLIST:
            grid, step = shortlisted(grid, step)
        for c0 in range(0, step.shape[0], chunk):
            part = Grid(*(None if x is None else x[c0 : c0 + chunk] for x in grid))
            err, i = score(part).min(0)  # the first minimum: the earliest candidate on a tie
            better = err < best

            def pick(x, kept):  # each row's chosen candidate, where it beats the best so far
                return torch.where(better, torch.gather(x.expand(-1, *err.shape), 0, i[None])[0], kept)

            best = torch.where(better, err, best)
            best_grid = Grid(*(None if x is None else pick(x, kept) for x, kept in zip(part, best_grid)))
            best_step = pick(step[c0 : c0 + chunk], best_step)

    def as_steps(values) -> torch.Tensor:
        return torch.as_tensor(values, device=w.device).reshape(-1, *[1] * xmin.dim())

    if spec.grid == "mse":
        consider(as_steps(range(1, CLIP_STEPS)))
    else:  # each H-weighted score is a (rows × n) @ (n × n) product: every COARSE-th ratio, then around each best
        consider(as_steps(range(COARSE, CLIP_STEPS, COARSE)))
        offsets = as_steps([o for o in range(1 - COARSE, COARSE) if o])
        consider((best_step + offsets).clamp(0, CLIP_STEPS - 1))
    return best_grid


def grids_by_group(w: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None = None,
                   units: torch.Tensor | None = None) -> Grid:
    """Grids, each tensor (..., rows, n_groups): one per row and run of group_size columns of w (..., rows, cols)
    (the last group may be narrower). The Hessian-weighted search uses each group's diagonal block of H. GGUF K types:
    `units` (..., rows, cols / 256, 2) are the super-blocks' (d, dmin) (default: boa.core.gguf_grids.super_units of
    w)."""
    cols = w.shape[-1]
    width = spec.group_width(cols)
    kind = spec.gguf_type
    if kind is not None and kind.super_blocks and units is None:
        units = super_units(w, kind)
    grids = []
    for c0 in range(0, cols, width):
        block = None if hessian is None else hessian[..., c0 : c0 + width, c0 : c0 + width]
        unit = None if units is None else units[..., c0 // SUPER_BLOCK, :]
        grids.append(find_grid(w[..., c0 : c0 + width], spec, block, unit))
    return Grid(*(None if parts[0] is None else torch.cat(parts, dim=-1) for parts in zip(*grids)))


@dataclass
class QuantizedWeight:
    """A quantized weight: W ≈ scale[:, g_idx] · (codes − zero[:, g_idx]) (− offset[:, g_idx]).

    codes (rows, cols) uint8; scale, zero (rows, n_groups) in the weight's dtype; g_idx (cols,) int32 maps each
    input column to its group (under act-order a group is a run of the *processing* order, so g_idx is stored);
    offset (rows, n_groups) only for GGUF grids with block minimums (Grid).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    offset: torch.Tensor | None = None

    GRID_PARTS = ("codes", "scale", "zero", "g_idx")  # the tensors every one has; offset where it is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Its tensors by part name (offset only where there is one), for storage."""
        parts = {k: getattr(self, k) for k in self.GRID_PARTS}
        return parts if self.offset is None else {**parts, "offset": self.offset}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], bits: int) -> QuantizedWeight:
        return cls(*(tensors[k] for k in cls.GRID_PARTS), bits, tensors.get("offset"))

    def take_rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The rows `index` (every row's tensors alike; g_idx is shared)."""
        return QuantizedWeight(self.codes[index], self.scale[index], self.zero[index], self.g_idx, self.bits,
                               None if self.offset is None else self.offset[index])

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        return dequantize(self.codes.to(self.scale.dtype), self.scale[:, g], self.zero[:, g],
                          None if self.offset is None else self.offset[:, g])
