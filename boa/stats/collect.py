"""The statistics pass: run a block over the calibration batches and gather, for one group of its linear layers, what
the solver needs: input Hessians, the dX terms against the FP path, and (BoA) the attention row factors."""
from __future__ import annotations

import contextlib
import copy
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

    def loss(self, W: torch.Tensor, Q: torch.Tensor) -> float:
        """tr(H_out ΔW H ΔWᵀ) summed over heads, ΔW = Q − W: the error this layer's solve minimises (without dX)."""
        dW = (Q - W).to(self.H.dtype).reshape(self.heads, -1, W.shape[-1])
        HdW = dW @ self.H
        if self.H_out is not None:
            HdW = self.H_out.to(dW.dtype) @ HdW
        return float((HdW * dW).sum())


def _forward(block: nn.Module, x: torch.Tensor, kwargs: dict):
    """The block on one batch, moved to where and in what dtype the block computes."""
    weight = next(block.parameters())
    return block(x.to(weight.device, weight.dtype), **kwargs)


def run_block(block: nn.Module, inputs, kwargs, dtype: torch.dtype, out=None):
    """The block's outputs on every batch, in `dtype`, appended one by one to `out` (anything with `append`; a new
    list by default), which is returned: the next block's inputs."""
    outputs = [] if out is None else out
    for x, kw in zip(inputs, kwargs):
        y = _forward(block, x, kw)
        outputs.append((y[0] if isinstance(y, tuple) else y).to(dtype))
    return outputs


def _watch_inputs(stack: contextlib.ExitStack, modules: dict, layers: list[str], first_seen, stop_at_last: bool):
    """Pre-hooks on `layers` (in call order, removed with `stack`): a layer whose input tensor was not seen yet in this
    forward gets `first_seen(name, x)`, one fed a tensor already seen (q/k/v, gate/up read one) gets what that gave;
    the last layer stops the forward when `stop_at_last`. Returns ({layer: value}, the seen list: clear it between
    forwards)."""
    values: dict = {}
    seen: list[tuple[torch.Tensor, object]] = []
    last = layers[-1]

    def watch(name):
        def hook(module, args):
            x = args[0]
            value = next((v for t, v in seen if t is x), None)
            if value is None:
                value = first_seen(name, x)
                seen.append((x, value))
            values[name] = value
            if name == last and stop_at_last:
                raise StopForward

        return hook

    for name in layers:
        stack.callback(modules[name].register_forward_pre_hook(watch(name)).remove)
    return values, seen


class FPPass:
    """The unquantized block on the FP path's inputs (TurboBoA's dX reference). Its outputs, the next block's FP
    inputs, are computed at once; what the dX terms need of batch i — linear layers' inputs and the attention call —
    comes from `batch(i, layers)`: kept from that first forward where they fit in memory (`kept`), else recomputed
    by running a frozen copy of the block on that batch again, so that the activations held grow with one batch, not
    with every layer's input on every batch."""

    def __init__(self, block: nn.Module, adapter: Adapter, inputs, kwargs, dtype: torch.dtype, attention: bool,
                 outputs):
        self.block = block  # the frozen copy
        self.adapter = adapter
        self.inputs, self.kwargs, self.dtype = inputs, kwargs, dtype
        self.attention = attention
        self.outputs = outputs
        self.kept: list | None = None  # per batch (run_keeping): (every linear layer's input, the attention call)
        self._last: tuple | None = None  # ((i, layers), what batch(i, layers) gave)

    def batch(self, i: int, layers: list[str]) -> tuple[dict[str, torch.Tensor], tuple | None]:
        """Batch i's inputs of `layers` (listed in call order), in `dtype`, one copy for layers fed the same tensor;
        and when the pass records the attention and v_proj is among them, the attention call's (query, key, mask,
        scaling). Recomputed, the most recent answer is kept, so asking twice runs the block once. A batch past the
        FP pass's last (it may run on the first batches only: dx_windows) has neither."""
        if i >= len(self.inputs):
            return {}, None
        if self.kept is not None:
            inputs, call = self.kept[i]
            # (an MoE expert no token of this batch reached has no input)
            return ({name: inputs[name] for name in layers if name in inputs},
                    call if self.adapter.v_proj in layers else None)
        key = (i, tuple(layers))
        if self._last is None or self._last[0] != key:
            self._last = (key, self._run(i, layers)[:2])
        return self._last[1]

    def _run(self, i: int, layers: list[str], stop: bool = True) -> tuple[dict[str, torch.Tensor], tuple | None,
                                                                           object]:
        """Batch i's inputs of `layers` and attention call (as `batch`), and the block's output — None where the
        forward stopped (`stop`) once they were seen."""
        recorder = None
        if self.attention and self.adapter.v_proj in layers:
            recorder = AttentionRecorder(values=False, stop=stop and layers[-1] in self.adapter.qkv)
        output = None
        with contextlib.ExitStack() as stack, torch.no_grad():
            kept, _ = _watch_inputs(stack, dict(self.block.named_modules()), layers,
                                    lambda name, x: x.detach().to(self.dtype),
                                    stop and (recorder is None or not recorder.stop))
            if recorder is not None:
                attention = attrgetter(self.adapter.attention)(self.block)
                stack.enter_context(self.adapter.capturing({"fp": attention}, recorder))
            try:
                output = _forward(self.block, self.inputs[i], self.kwargs[i])
            except StopForward:
                pass
        return kept, recorder.kept[0] if recorder is not None else None, output

    def run_keeping(self, budget: int | None) -> None:
        """The block's outputs on every batch into `outputs`, keeping each batch's layer inputs and attention call
        for `batch` while they are projected (from the first batch's bytes) to take at most `budget` bytes; past
        it, nothing is kept and `batch` recomputes."""
        layers = self.adapter.linear_names()
        kept = []
        for i in range(len(self.inputs)):
            if kept is None:
                with torch.no_grad():
                    y = _forward(self.block, self.inputs[i], self.kwargs[i])
            else:
                inputs, call, y = self._run(i, layers, stop=False)
                kept.append((inputs, call))
            self.outputs.append((y[0] if isinstance(y, tuple) else y).to(self.dtype))
            if i == 0:
                held = {t.data_ptr(): t.numel() * t.element_size() for t in inputs.values()}
                held.update({t.data_ptr(): t.numel() * t.element_size()
                             for t in (call or ())[:2] if isinstance(t, torch.Tensor)})
                if budget is not None and sum(held.values()) * len(self.inputs) > budget:
                    kept = None
        self.kept = kept


def run_fp_block(block: nn.Module, adapter: Adapter, inputs, kwargs, dtype: torch.dtype, attention: bool,
                 out=None, keep_budget: int | None = 0) -> FPPass:
    """The FP path of a block none of whose layers is quantized yet: its outputs on every batch (into `out`, as
    run_block) and a frozen copy of it, from which FPPass.batch recomputes the layer inputs (and, with `attention`,
    the attention calls) the dX terms need — or, where they are projected to take at most `keep_budget` bytes
    (None: no limit), keeps them from this one forward. The copy lives as long as the FPPass."""
    frozen = copy.deepcopy(block).requires_grad_(False)
    for module in frozen.modules():  # the float path: run-time quantizers (boa.transforms) copied with it removed
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(hook, "lossy", False):
                del module._forward_pre_hooks[key]
    fp = FPPass(frozen, adapter, inputs, kwargs, dtype, attention, [] if out is None else out)
    if keep_budget == 0:
        run_block(frozen, inputs, kwargs, dtype, fp.outputs)
    else:
        fp.run_keeping(keep_budget)
    return fp


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
    recorder (if any) the attention's, on the batches the FP pass ran on (the first ones). A pass stops as soon as
    everything it needs has been seen (layers are listed in call order)."""
    modules = dict(block.named_modules())
    fp_inputs: dict[str, torch.Tensor] = {}

    # an MoE expert's tokens on the FP path are those the FP router picked, not row for row its tokens here: experts
    # get no dX term
    experts = adapter.experts_path + "." if adapter is not None and adapter.experts_path else None

    def accumulate(name, x):  # a layer's accumulator lives across batches; it takes each new input once
        acc = hessians.get(name) or HessianAccumulator(x.shape[-1], dtype, x.device)
        x_ref = None if experts and name.startswith(experts) else fp_inputs.get(name)
        acc.add(x.detach(), x_ref, getattr(x, "unquantized", None))
        return acc

    with contextlib.ExitStack() as stack:
        hessians, fed = _watch_inputs(stack, modules, layers, accumulate, recorder is None or not recorder.stop)
        if recorder is not None:
            if recorder.values:
                stack.callback(recorder.watch_values(modules[adapter.v_proj]).remove)
            stack.enter_context(adapter.capturing({"quantized": attrgetter(adapter.attention)(block)}, recorder))
        for i, (x, kw) in enumerate(zip(inputs, kwargs)):
            fed.clear()
            fp_inputs, fp_attention = fp.batch(i, layers) if fp is not None else ({}, None)
            if recorder is not None:
                recorder.reference = None if fp_attention is None else (*fp_attention, fp_inputs[adapter.v_proj])
            try:
                _forward(block, x, kw)
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
