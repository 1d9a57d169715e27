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


def _reduce_mean(acc: HessianAccumulator, ranks: Ranks) -> None:
    total = _count(acc.n, acc.H.device, ranks)
    if total == 0:  # an expert no rank's tokens reached: stays empty (the pooled fallback takes over)
        return
    # means over this rank's tokens: n_r·mean_r summed is the sum over all tokens
    ranks.sum_(acc.H.mul_(acc.n), "input Hessians").div_(total)
    acc.n = total
    if acc.D is not None:
        total_dx = _count(acc.n_dx, acc.D.device, ranks)
        ranks.sum_(acc.D.mul_(acc.n_dx), "dX terms").div_(max(total_dx, 1))
        acc.n_dx = total_dx


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
