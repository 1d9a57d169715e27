"""Corpora and token windows: seeded calibration samples and evaluation token streams."""
from __future__ import annotations

import torch

from boa.data.corpora import check_corpus, corpus_text
from boa.core.errors import BoaError

__all__ = ["calibration_windows", "check_corpus", "corpus_text", "eval_tokens", "tokenize"]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """(1, N) token ids of a long text, without the length warning meant for single prompts."""
    saved = tokenizer.model_max_length
    tokenizer.model_max_length = int(1e30)
    try:
        return tokenizer(text, return_tensors="pt").input_ids
    finally:
        tokenizer.model_max_length = saved


def calibration_windows(tokenizer, corpus: str = "wikipedia", nsamples: int = 128, seqlen: int = 512, seed: int = 0):
    """nsamples windows of seqlen consecutive tokens at seeded random offsets: LongTensor (nsamples, seqlen)."""
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise BoaError(f"{name}={value!r} must be a positive integer (the number of calibration windows and "
                           "their length in tokens)")
    ids = tokenize(tokenizer, corpus_text(corpus, "calib"))[0]
    if ids.numel() < seqlen + 1:
        raise BoaError(
            f"calibration text {corpus!r} has {ids.numel()} tokens, shorter than one window of {seqlen}; "
            "give more text or a smaller --seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_tokens(tokenizer, corpus: str) -> torch.Tensor:
    """(1, N) token ids of a corpus's evaluation split."""
    return tokenize(tokenizer, corpus_text(corpus, "eval"))
