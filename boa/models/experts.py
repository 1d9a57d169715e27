"""Mixture-of-experts blocks: experts quantized one by one on the tokens routed to them, stored fused.

transformers keeps a MoE block's experts as two 3-D parameters, gate_up_proj (experts, 2·inter, hidden) and
down_proj (experts, hidden, inter), run in a loop over the experts the router picked. For the run, UnfusedExperts
takes the module's place: one Expert per expert with gate_proj, up_proj and down_proj nn.Linears, run by the same
loop, so each expert's layers are ordinary layers whose input hooks see exactly the tokens routed to it (its
Hessian, and `tokens`, the count). The model keeps that form after the run: boa's format saves the experts one by
one, and boa.load unfuses a freshly built model's experts before putting each one's packed layers in; the exports
write them one by one under the family's checkpoint names (Adapter.checkpoint_name), which transformers merges. The
router stays float: it is not a layer the adapters list.
"""
from __future__ import annotations

import torch
from torch import nn


class Expert(nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        for name, weight in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                layer.weight.copy_(weight)
            self.add_module(name, layer.requires_grad_(False))


class UnfusedExperts(nn.ModuleList):
    """A fused experts module (gate_up_proj, down_proj, act_fn; forward(hidden, top_k_index, top_k_weights)) as a
    list of Experts computing the same function. `tokens[e]`: how many (token, expert) routings expert e got."""

    def __init__(self, fused: nn.Module):
        inter = fused.gate_up_proj.shape[1] // 2
        super().__init__(Expert(gate_up[:inter], gate_up[inter:], down)
                         for gate_up, down in zip(fused.gate_up_proj.detach(), fused.down_proj.detach()))
        self.tokens = torch.zeros(len(self), dtype=torch.long)
        self.forced = False  # every expert runs on every token, only the routed outputs used (a reference's statistics)
        self._fused = [fused]  # kept outside the module tree (its act_fn too): its parameters are not this module's
        for name in ("gate_up_proj", "down_proj"):  # its memory is the experts' now
            setattr(fused, name, nn.Parameter(torch.empty(0, device=fused.gate_up_proj.device), requires_grad=False))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        routed = torch.nn.functional.one_hot(top_k_index, num_classes=len(self)).permute(2, 1, 0)  # (E, k, tokens)
        hit = range(len(self)) if self.forced else routed.sum(dim=(1, 2)).nonzero()[:, 0].tolist()
        for e in hit:  # in expert order, as transformers' loop
            slot, token = torch.where(routed[e])
            self.tokens[e] += token.numel()
            expert, x = self[e], hidden_states if self.forced else hidden_states[token]
            y = expert.down_proj(self._fused[0].act_fn(expert.gate_proj(x)) * expert.up_proj(x))
            y = y[token] if self.forced else y
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out
