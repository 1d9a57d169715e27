"""Perplexity over non-overlapping windows of a token stream."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from boa.core.errors import BoaError


def eval_windows(config, tokens: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """The first `max_windows` (all if None) non-overlapping windows (n, seqlen) of `tokens` (1, N), after checking
    seqlen against the model's positions."""
    from boa.models.loader import check_seqlen

    check_seqlen(config, seqlen, "seqlen")
    if seqlen < 2:
        raise BoaError(f"seqlen={seqlen}: a window of one token has no next token to predict; use 2 or more")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise BoaError(f"max_windows={max_windows!r} must be a positive number of windows, or None for all")
    n_windows = tokens.shape[-1] // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise BoaError(f"the evaluation text has {tokens.shape[-1]} tokens, shorter than one window of {seqlen}")
    return tokens.reshape(-1)[: n_windows * seqlen].reshape(n_windows, seqlen)


def next_token_nll(logits: torch.Tensor, windows: torch.Tensor) -> float:
    """The summed NLL of every window's tokens after the first, given the logits (n, seqlen, vocab) of `windows`."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="sum").item()


@torch.no_grad()
def perplexity(
    model, tokens: torch.Tensor, seqlen: int = 512, max_windows: int | None = None, batch_size: int = 4,
    progress: bool = False,
) -> float:
    """exp(mean next-token NLL) over the first `max_windows` (all if None) non-overlapping windows of `tokens` (1, N)."""
    windows = eval_windows(model.config, tokens, seqlen, max_windows)
    device = next(model.parameters()).device
    total = 0.0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = batch.to(device)
        total += next_token_nll(model(input_ids=batch, use_cache=False).logits, batch)
    return math.exp(total / windows[:, 1:].numel())
