"""Attention statistics for BoA's Kronecker Hessians (ALGORITHMS.md §4).

While a block runs under its Adapter's `capturing(...)` (boa.models.attention_capture: transformers' attention
interface, no forked modeling files), every watched attention layer hands an `AttentionRecorder` its query and key
already rotated (RoPE), shaped (batch, heads, T, d) and (batch, kv_heads, T, d), with the mask and the scaling.

A recorder accumulates, per head, 2E[q qᵀ] and 2E[k kᵀ] (post-RoPE, pooled over tokens and positions) and, for the
"block_v" Hessians, 2E[(A_h X)(A_h X)ᵀ] with A_h the head's attention probabilities and X the v_proj input. With the
dX correction the FP pass keeps its query/key, and the quantized pass adds 2E[(A_fp X_fp − A_q X_q)(A_q X_q)ᵀ].
"""
from __future__ import annotations

import torch
from torch import nn


class StopForward(Exception):
    """Raised once a pass has seen everything it needs: the rest of the block need not run."""


def attention_probabilities(module: nn.Module, query, key, attention_mask, scaling) -> torch.Tensor:
    """softmax(q kᵀ · scaling + mask) in fp32, (batch, heads, T, S), with the kv heads repeated for GQA.

    The mask is what the model passed: additive (float) or boolean (True = attend), or None, in which case the
    layer's `is_causal` decides (sdpa leaves causality implicit)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    scores = (query.float() @ key.float().transpose(-1, -2)) * scaling
    T, S = scores.shape[-2:]
    if attention_mask is None:
        if getattr(module, "is_causal", False) and T > 1:
            causal = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)
            scores = scores.masked_fill(~causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :S], float("-inf"))
    else:
        scores = scores + attention_mask[..., :S].float()
    return torch.softmax(scores, dim=-1)


class AttentionRecorder:
    """Accumulates one attention layer's statistics over a statistics pass (sums; `finish` turns them to means).

    values: also the per-head v_proj input Hessians and, when `reference` holds the FP pass's attention call for the
    current batch (None for a batch the FP pass did not run), their dX terms. stop: raise StopForward after recording,
    once nothing after attention is needed. On the FP pass (which="fp") a recorder only keeps each call's (query,
    key, mask, scaling) in `kept`.
    """

    def __init__(self, values: bool, dtype: torch.dtype = torch.float32, stop: bool = False):
        self.values = values
        self.dtype = dtype
        self.stop = stop
        self.tokens = 0
        self.dx_tokens = 0  # the tokens of the windows value_D saw (those the FP pass ran on)
        self.seqlen = 0
        self.query = self.key = self.value_H = self.value_D = None
        self.x: torch.Tensor | None = None  # v_proj input of the current call
        self.kept: list[tuple] = []         # FP pass: (query, key, mask, scaling) per call
        self.reference: tuple | None = None  # quantized pass: the FP call's (query, key, mask, scaling, v_proj input)

    def watch_values(self, v_proj: nn.Linear):
        """A hook on v_proj that keeps its input for the attention call that follows."""

        def keep(module, args):
            self.x = args[0]

        return v_proj.register_forward_pre_hook(keep)

    def _add(self, name: str, value: torch.Tensor) -> None:
        current = getattr(self, name)
        setattr(self, name, value if current is None else current + value)

    def record(self, which: str, module, query, key, attention_mask, scaling) -> None:
        """One attention call of the "fp" or "quantized" pass; raises StopForward after it when `stop` is set."""
        self._record(which, module, query, key, attention_mask, scaling)
        if self.stop:
            raise StopForward

    def _record(self, which: str, module, query, key, attention_mask, scaling) -> None:
        if which == "fp":
            self.kept.append((query, key, attention_mask, scaling))
            return
        b, h, T, _ = query.shape
        q = query.to(self.dtype)
        k = key.to(self.dtype)
        self._add("query", torch.einsum("bhti,bhtj->hij", q, q))
        self._add("key", torch.einsum("bhti,bhtj->hij", k, k))
        self.tokens += b * T
        self.seqlen = max(self.seqlen, T)
        if not self.values:
            return
        x, self.x = self.x, None
        groups = h // k.shape[1]
        # Per kv head, Σ_h (A_h X)ᵀ(A_h X) over its q heads = Xᵀ (Σ_h A_hᵀ A_h) X: g·T³ + T²C + TC² operations
        # instead of g·(T²C + TC²) — cheaper once C > T, as in every real model; and a causal A's zeros skipped
        # (gram_of_rows), about a third of the g·T³.
        for i in range(b):  # one window at a time bounds the (heads, T, T) temporaries
            probs = attention_probabilities(module, query[i : i + 1], key[i : i + 1], _window(attention_mask, i),
                                            scaling)
            A = probs[0].reshape(k.shape[1], groups, T, -1)                   # (kv heads, g, T, S)
            xi = x[i].to(self.dtype)
            H_sum = xi.T @ (gram_of_rows(A, A).to(self.dtype) @ xi)          # (kv heads, C, C)
            self._add("value_H", H_sum)
            if self.reference is not None:
                q_fp, k_fp, mask_fp, scaling_fp, x_fp = self.reference
                probs_fp = attention_probabilities(module, q_fp[i : i + 1], k_fp[i : i + 1],
                                                   _window(mask_fp, i), scaling_fp)
                A_fp = probs_fp[0].reshape(k.shape[1], groups, T, -1)
                cross = x_fp[i].to(self.dtype).T @ (gram_of_rows(A_fp, A).to(self.dtype) @ xi)
                self._add("value_D", cross - H_sum)                            # Σ_h (A_fp X_fp − A X)ᵀ (A X)
                self.dx_tokens += T

    def finish(self) -> dict[str, torch.Tensor]:
        """Means 2E[·] per head: query/key covariances (heads / kv heads, d, d); value_H and value_D per kv head
        (C, C), each the mean over the q heads that share it (value_D over the tokens the FP pass ran on)."""
        groups = self.query.shape[0] // self.key.shape[0]

        def mean(total, tokens):
            return None if total is None else 2 * total / tokens

        def per_kv_head(total, tokens):  # sums over each kv head's q heads -> their mean
            return None if total is None else mean(total, tokens) / groups

        return {"query": mean(self.query, self.tokens), "key": mean(self.key, self.tokens),
                "value_H": per_kv_head(self.value_H, self.tokens),
                "value_D": per_kv_head(self.value_D, self.dx_tokens)}


# gram_of_rows takes the rows (query positions) this many at a time.
ROW_BLOCK = 64


def gram_of_rows(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Σ over g and t of A[..., g, t, :]ᵀ B[..., g, t, :] for A, B (..., g, T, S): (..., S, S), the sum of the g
    matrices AᵀB. Rows are taken ROW_BLOCK query positions at a time, each block only up to the last column where
    A or B holds a nonzero in it: under a causal mask, block k's products then cover (k+1)·ROW_BLOCK columns, not S
    (about S³/3 multiply-adds instead of S³). Exact zeros only are skipped, whatever the mask."""
    T, S = A.shape[-2:]
    out = A.new_zeros(*A.shape[:-3], S, S)
    for t0 in range(0, T, ROW_BLOCK):
        a, b = A[..., t0 : t0 + ROW_BLOCK, :], B[..., t0 : t0 + ROW_BLOCK, :]
        used = (a != 0).flatten(0, -2).any(0) | (b != 0).flatten(0, -2).any(0)      # (S,)
        end = int(used.nonzero().max()) + 1 if bool(used.any()) else 0
        if end:
            a, b = a[..., :end].flatten(-3, -2), b[..., :end].flatten(-3, -2)    # (..., g·rows, end)
            out[..., :end, :end] += a.transpose(-1, -2) @ b
    return out


def _window(mask: torch.Tensor | None, i: int) -> torch.Tensor | None:
    """Window i's slice of a (batch or 1, 1, T, S) mask."""
    if mask is None or mask.shape[0] == 1:
        return mask
    return mask[i : i + 1]


def back_rotate(C: torch.Tensor, R: torch.Tensor | None, chunk: int = 128) -> torch.Tensor:
    """(1/L) Σ_t R_tᵀ C R_t for each matrix of C (heads, d, d); R (L, d, d) the rotary matrices (None: no RoPE)."""
    if R is None:
        return C
    R = R.to(C.dtype)
    total = torch.zeros_like(C)
    for t0 in range(0, R.shape[0], chunk):
        Rt = R[t0 : t0 + chunk]                                  # (t, d, d)
        total += (Rt.transpose(-1, -2).unsqueeze(0) @ (C.unsqueeze(1) @ Rt.unsqueeze(0))).sum(1)
    return total / R.shape[0]


def output_row_factor(o_weight: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """W_o,hᵀ W_o,h for each head h (W_o,h: the out-projection columns fed by head h), averaged over the q heads
    that share a kv head: (kv_heads, d, d). v_proj's exact row factor."""
    hidden = o_weight.shape[0]
    per_head = o_weight.T.reshape(n_heads, -1, hidden)          # (heads, d, hidden)
    F = per_head @ per_head.transpose(-1, -2)
    return F.reshape(n_kv_heads, n_heads // n_kv_heads, *F.shape[1:]).mean(1)
