"""Statistics of several processes summed into the one-process statistics (boa.core.ranks): every rank saw its own
share of the calibration windows through the same model and code, so every rank holds the same statistics (same
shapes, the same ones present); the means each holds are weighted by its token count."""
from __future__ import annotations

import torch

from boa.core.hessian import HessianAccumulator
from boa.core.ranks import Ranks
from boa.stats.attention import AttentionRecorder


def reduce_accumulators(accumulators, ranks: Ranks) -> None:
    """Each distinct accumulator (q/k/v share one) becomes the token-weighted mean over the ranks, on every rank."""
    if not ranks.distributed:
        return
    for acc in {id(a): a for a in accumulators}.values():
        _reduce_mean(acc, ranks)


def _count(value: int, device, ranks: Ranks) -> int:
    return int(ranks.sum_(torch.tensor([value], dtype=torch.float64, device=device), "token counts").item())


def _mean_over_ranks(mean: torch.Tensor, n: int, what: str, ranks: Ranks) -> int:
    """`mean` over this rank's n tokens becomes, in place, the mean over every rank's: n_r·mean_r summed is the sum
    over all tokens. Returns their count (0: no rank had any, and the mean is left alone — an expert no rank's tokens
    reached stays empty, and the pooled fallback takes over)."""
    total = _count(n, mean.device, ranks)
    if total:
        ranks.sum_(mean.mul_(n), what).div_(total)
    return total


def _reduce_mean(acc: HessianAccumulator, ranks: Ranks) -> None:
    acc.n = _mean_over_ranks(acc.H, acc.n, "input Hessians", ranks)
    if acc.D is not None:  # over the tokens that came with the FP path's inputs
        acc.n_dx = _mean_over_ranks(acc.D, acc.n_dx, "dX terms", ranks)


def reduce_recorder(recorder: AttentionRecorder, ranks: Ranks) -> None:
    """The recorder's sums and token count summed over the ranks (its `finish` then gives the global means)."""
    if not ranks.distributed:
        return
    for name in ("query", "key", "value_H", "value_D"):
        value = getattr(recorder, name)
        if value is not None:
            ranks.sum_(value, f"attention statistics ({name})")
    recorder.tokens = _count(recorder.tokens, recorder.query.device, ranks)
    recorder.dx_tokens = _count(recorder.dx_tokens, recorder.query.device, ranks)
