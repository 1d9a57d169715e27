"""The statistics pass: run a block over the calibration batches and gather, for one group of its linear layers, what
the solver needs: input Hessians, the dX terms against the FP path, and (BoA) the attention row factors."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from operator import attrgetter

import torch
from torch import nn

from boa.models.adapter import Adapter
from boa.core.hessian import HessianAccumulator
from boa.stats.attention import AttentionRecorder, StopForward, back_rotate, output_row_factor


@dataclass
class LayerStats:
    """One layer's objective tr(H_out ΔW H ΔWᵀ) − 2 tr(H_out W D ΔWᵀ), summed over heads.

    H: (C, C) input Hessian, or (heads, C, C) one per head; H_out: (heads, d, d) row factors or None (identity);
    D: the dX term 2E[(X_fp − X_q) X_qᵀ] shaped like H (the solver scales it by α), or None."""

    H: torch.Tensor
    H_out: torch.Tensor | None = None
    D: torch.Tensor | None = None

    @property
    def heads(self) -> int:
        if self.H_out is not None:
            return self.H_out.shape[0]
        return self.H.shape[0] if self.H.dim() == 3 else 1

    def dx_term(self, alpha: float) -> torch.Tensor | None:
        """α·D, the dX term a solve uses, or None when there is none or α = 0."""
        return self.D * alpha if self.D is not None and alpha > 0 else None

    def loss(self, W: torch.Tensor, Q: torch.Tensor) -> float:
        """tr(H_out ΔW H ΔWᵀ) summed over heads, ΔW = Q − W: the error this layer's solve minimises (without dX)."""
        dW = (Q - W).to(self.H.dtype).reshape(self.heads, -1, W.shape[-1])
        HdW = dW @ self.H
        if self.H_out is not None:
            HdW = self.H_out.to(dW.dtype) @ HdW
        return float((HdW * dW).sum())


@dataclass
class FPPass:
    """The unquantized block on the FP path's inputs (TurboBoA's dX reference): per batch, every linear layer's
    input and the attention call's (query, key, mask, scaling); and the outputs, the next block's FP inputs."""

    layer_inputs: list[dict[str, torch.Tensor]]
    attention: list[tuple] | None
    outputs: list[torch.Tensor]


def run_block(block: nn.Module, inputs, kwargs, dtype: torch.dtype) -> list[torch.Tensor]:
    """The block's outputs on every batch, in `dtype`: the next block's inputs."""
    block_dtype = next(block.parameters()).dtype
    outputs = []
    for x, kw in zip(inputs, kwargs):
        out = block(x.to(block_dtype), **kw)
        outputs.append((out[0] if isinstance(out, tuple) else out).to(dtype))
    return outputs


def run_fp_block(block: nn.Module, adapter: Adapter, inputs, kwargs, dtype: torch.dtype, attention: bool) -> FPPass:
    """One full forward of the block (before any of its layers is quantized) that keeps what the dX terms need.
    Layers fed the same tensor keep one copy; inputs are stored in `dtype` (the cache dtype)."""
    modules = dict(block.named_modules())
    layer_inputs: list[dict[str, torch.Tensor]] = []
    stored: list[tuple[torch.Tensor, torch.Tensor]] = []  # this batch's distinct inputs and their copies

    def keep(name):
        def hook(module, args):
            x = args[0]
            copy = next((kept for seen, kept in stored if seen is x), None)
            if copy is None:
                copy = x.detach().to(dtype)
                stored.append((x, copy))
            layer_inputs[-1][name] = copy

        return hook

    def next_batch(module, args, kwargs):
        layer_inputs.append({})
        stored.clear()

    recorder = AttentionRecorder(values=False) if attention else None
    with contextlib.ExitStack() as stack:
        stack.callback(block.register_forward_pre_hook(next_batch, with_kwargs=True).remove)
        for name in adapter.linear_names():
            stack.callback(modules[name].register_forward_pre_hook(keep(name)).remove)
        if recorder is not None:
            stack.enter_context(adapter.capturing({"fp": attrgetter(adapter.attention)(block)}, recorder))
        outputs = run_block(block, inputs, kwargs, dtype)
    return FPPass(layer_inputs, recorder.kept if recorder is not None else None, outputs)


def collect_statistics(
    block: nn.Module,
    layers: list[str],
    inputs: list[torch.Tensor],
    kwargs: list[dict],
    dtype: torch.dtype,
    *,
    fp: FPPass | None = None,
    recorder: AttentionRecorder | None = None,
    adapter: Adapter | None = None,
) -> dict[str, HessianAccumulator]:
    """Runs `block` on every batch and returns each layer's accumulator (layers fed the same tensor, like q/k/v or
    gate/up, share one). With `fp`, each accumulator also gets the dX term against the FP pass's inputs, and the
    recorder (if any) the attention's. A pass stops as soon as everything it needs has been seen (layers are listed
    in call order)."""
    modules = dict(block.named_modules())
    hessians: dict[str, HessianAccumulator] = {}
    fed: list[tuple[torch.Tensor, HessianAccumulator]] = []  # this batch's distinct inputs
    fp_inputs: dict[str, torch.Tensor] = {}
    last = layers[-1]
    stop_at_last = recorder is None or not recorder.stop

    def accumulate(name):
        def hook(module, args):
            x = args[0]
            shared = next((acc for seen, acc in fed if seen is x), None)
            if shared is None:
                shared = hessians.get(name) or HessianAccumulator(x.shape[-1], dtype, x.device)
                shared.add(x.detach(), fp_inputs.get(name))
                fed.append((x, shared))
            hessians[name] = shared
            if name == last and stop_at_last:
                raise StopForward

        return hook

    with contextlib.ExitStack() as stack:
        for name in layers:
            stack.callback(modules[name].register_forward_pre_hook(accumulate(name)).remove)
        if recorder is not None:
            if recorder.values:
                stack.callback(recorder.watch_values(modules[adapter.v_proj]).remove)
            stack.enter_context(adapter.capturing({"quantized": attrgetter(adapter.attention)(block)}, recorder))
        block_dtype = next(block.parameters()).dtype
        for i, (x, kw) in enumerate(zip(inputs, kwargs)):
            fed.clear()
            if fp is not None:
                fp_inputs = fp.layer_inputs[i]
                if recorder is not None and fp.attention is not None:
                    recorder.reference = (*fp.attention[i], fp_inputs[adapter.v_proj])
            try:
                block(x.to(block_dtype), **kw)
            except StopForward:
                pass
    return hessians


def attention_layer_stats(
    adapter: Adapter,
    block: nn.Module,
    shared: HessianAccumulator,
    attention: dict[str, torch.Tensor | None],
    rotary: torch.Tensor | None,
    v_row_factor: str,
) -> dict[str, LayerStats]:
    """BoA's Kronecker factors for q/k/v (ALGORITHMS.md §4) from the shared input statistics and the recorder's
    means (`AttentionRecorder.finish`).

    q_proj: H_out = back-rotated key covariance of its kv head; k_proj: back-rotated query covariance averaged over
    the q heads sharing it; v_proj: per-head input Hessians of A_h X with row factor W_o,hᵀW_o,h ("exact") or none.
    Qwen3-style q/k norms between projection and RoPE are linearised as diag(γ)/rms(q): the 1/rms factor is one
    scalar per head after averaging and does not change a Kronecker solve, so H_out becomes diag(γ) H_out diag(γ)
    (the component of the norm's Jacobian along q itself is dropped).
    """
    groups = adapter.n_heads // adapter.n_kv_heads
    d = adapter.head_dim
    query, key = attention["query"], attention["key"]
    H_out_q = back_rotate(key, rotary).repeat_interleave(groups, dim=0)
    H_out_k = back_rotate(query.reshape(adapter.n_kv_heads, groups, d, d).mean(1), rotary)
    norms = adapter.qk_norm_weights(attrgetter(adapter.attention)(block))
    if norms is not None:
        gamma_q, gamma_k = (g.to(H_out_q.dtype) for g in norms)
        H_out_q = gamma_q[:, None] * H_out_q * gamma_q[None, :]
        H_out_k = gamma_k[:, None] * H_out_k * gamma_k[None, :]
    stats = {
        adapter.q_proj: LayerStats(shared.H, H_out_q, shared.D),
        adapter.k_proj: LayerStats(shared.H, H_out_k, shared.D),
    }
    if attention["value_H"] is None:  # no attention probabilities recorded: v_proj is plain GPTQ
        stats[adapter.v_proj] = LayerStats(shared.H, None, shared.D)
        return stats
    H_out_v = None
    if v_row_factor == "exact":
        o_weight = attrgetter(adapter.o_proj)(block).weight.detach().to(shared.H.dtype)
        H_out_v = output_row_factor(o_weight, adapter.n_heads, adapter.n_kv_heads)
    stats[adapter.v_proj] = LayerStats(attention["value_H"], H_out_v, attention["value_D"])
    return stats
