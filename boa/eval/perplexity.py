"""Perplexity over non-overlapping windows of a token stream."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from boa.core.errors import BoaError


@torch.no_grad()
def perplexity(
    model, tokens: torch.Tensor, seqlen: int = 512, max_windows: int | None = None, batch_size: int = 4,
    progress: bool = False,
) -> float:
    """exp(mean next-token NLL) over the first `max_windows` (all if None) non-overlapping windows of `tokens` (1, N)."""
    from boa.models.loader import check_seqlen

    check_seqlen(model.config, seqlen, "seqlen")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise BoaError(f"max_windows={max_windows!r} must be a positive number of windows, or None for all")
    n_windows = tokens.shape[-1] // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise BoaError(f"the evaluation text has {tokens.shape[-1]} tokens, shorter than one window of {seqlen}")
    windows = tokens.reshape(-1)[: n_windows * seqlen].reshape(n_windows, seqlen)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)
