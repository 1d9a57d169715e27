"""QuaRot's rotations (ALGORITHMS.md §7): orthogonal changes of basis that leave the float model's function unchanged
and spread the outlier channels of activations and weights over all channels, so that both quantize well.

Row-vector convention: the residual stream r becomes r' = r·Q (Q = diag(±1)·Hadamard/√d, seeded). Then
- every RMSNorm's weight γ is first folded into the linears that read it (W ← W·diag γ, γ ← 1): the norm then
  commutes with Q (rms(r·Q) = rms(r));
- embeddings E ← E·Q; linears reading the residual (q, k, v, gate, up) W ← W·Q; linears writing it (o, down)
  W ← Qᵀ·W and b ← b·Q; the head W ← W·diag(γ_final)·Q;
- tied embeddings stay tied: the head then reads E·Q as it is, and the final norm is conjugated instead of folded
  (it computes (norm(r'·Qᵀ))·Q: two fast transforms per token, and γ_final stays where it was);
- value_heads: each value head's vectors rotated by a Hadamard M of order head_dim (v_proj W ← Mᵀ·W per head,
  o_proj's columns of each query head ← ·M; with GQA a kv head's M serves all its query heads);
- online_down: down_proj's input x ← x·H_n at run time (a forward pre-hook: the fast transform), W ← W·H_n.
"""
from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import ClassVar

import torch
from torch import nn

from boa.core.errors import BoaError
from boa.models.fused import split_for_now
from boa.transforms.base import Transform, register_transform
from boa.transforms.hadamard import Rotation


def _exact(t: torch.Tensor) -> torch.Tensor:
    """t in a dtype whose rounding the result's own rounding hides: float64 for float32/64 weights, float32 for
    bf16/fp16 ones (an 8B model's fusion then streams half the bytes)."""
    return t.double() if t.dtype in (torch.float32, torch.float64) else t.float()


def _rows(weight: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """W·Q: each row rotated."""
    return rotation.apply(_exact(weight))


def _columns(weight: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """Qᵀ·W: each column rotated."""
    return rotation.apply(_exact(weight).T).T


def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    """γ into the columns of the linears reading the norm; the norm keeps 1."""
    gamma = norm.weight.detach().double()
    for linear in linears:
        _set(linear.weight, _exact(linear.weight) * gamma.to(_exact(linear.weight).dtype))
    _set(norm.weight, torch.ones_like(gamma))


def _head_and_embeddings_tied(model: nn.Module) -> bool:
    """From the config, not the parameters: a streamed model reads a tied head into a parameter of its own."""
    return model.get_output_embeddings() is not None and bool(getattr(model.config, "tie_word_embeddings", False))


@register_transform
@dataclass
class QuaRot(Transform):
    """A seeded random Hadamard rotation of the residual stream, per-head Hadamards on the value path and an online
    Hadamard before down_proj."""

    name: ClassVar[str] = "quarot"
    seed: int = 0
    value_heads: bool = True
    online_down: bool = True

    def validate(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise BoaError(f"rotation seed={self.seed!r} must be an integer")

    def _check(self, adapter) -> None:
        if not adapter.rms_norm:
            raise BoaError(f"QuaRot rotations are not supported for {adapter.config.model_type!r} models: they need "
                           "pre-norm RMSNorm blocks whose norms fold into the next linears (a LayerNorm's mean "
                           "subtraction and Gemma's norms after attention and MLP do not commute with a rotation; "
                           "MoE experts are not rotated yet). Quantize it without --rotate")

    def residual(self, adapter) -> Rotation:
        return Rotation.build(adapter.config.hidden_size, seed=self.seed)

    def fuse_outside(self, model, adapter) -> None:
        self._check(adapter)
        Q = self.residual(adapter)
        embeddings = model.get_input_embeddings()
        _set(embeddings.weight, _rows(embeddings.weight, Q))
        if _head_and_embeddings_tied(model):
            return  # the head reads E·Q; the final norm is conjugated by attach()
        head = model.get_output_embeddings()
        if head is not None:
            final_norm = attrgetter(adapter.final_norm)(model)
            _fold_norm(final_norm, [head])
            _set(head.weight, _rows(head.weight, Q))

    def fuse_loaded(self, model, adapter, module, raw) -> None:
        """Embeddings rotated; an untied head gets the final norm's γ (read raw: the norm may be loaded, and folded,
        on its own) and the rotation; the final norm of an untied model keeps 1."""
        super().fuse_loaded(model, adapter, module, raw)
        self._check(adapter)
        Q = self.residual(adapter)
        tied = _head_and_embeddings_tied(model)
        final_norm = attrgetter(adapter.final_norm)(model)
        if module is model.get_input_embeddings() or (tied and module is model.get_output_embeddings()):
            _set(module.weight, _rows(module.weight, Q))
        elif not tied and module is model.get_output_embeddings():
            names = {id(m): n for n, m in model.named_modules()}
            gamma = raw(f"{names[id(final_norm)]}.weight").double().to(module.weight.device)
            _set(module.weight, _exact(module.weight) * gamma.to(_exact(module.weight).dtype))  # rounded to the weight's dtype, as _fold_norm does
            _set(module.weight, _rows(module.weight, Q))
        elif not tied and module is final_norm:
            _set(module.weight, torch.ones_like(module.weight))

    def fuse_block(self, block, adapter) -> None:
        with split_for_now(block, adapter):  # a fused projection's parts (v's heads) are rotated as parts
            self._fuse_split_block(block, adapter)

    def _fuse_split_block(self, block, adapter) -> None:
        self._check(adapter)
        Q = self.residual(adapter)
        layers = dict(block.named_modules())
        _fold_norm(layers[adapter.attn_norm], [layers[n] for n in adapter.qkv])
        _fold_norm(layers[adapter.mlp_norm], [layers[n] for n in adapter.mlp_in])
        for name in (*adapter.qkv, *adapter.mlp_in):
            _set(layers[name].weight, _rows(layers[name].weight, Q))
        for name in (adapter.o_proj, adapter.mlp_out):
            linear = layers[name]
            _set(linear.weight, _columns(linear.weight, Q))
            if linear.bias is not None:
                _set(linear.bias, Q.apply(_exact(linear.bias)))
        if self.value_heads:
            self._rotate_value_heads(layers[adapter.v_proj], layers[adapter.o_proj], adapter)
        if self.online_down:
            down = layers[adapter.mlp_out]
            _set(down.weight, _rows(down.weight, Rotation.build(down.in_features)))

    @staticmethod
    def _rotate_value_heads(v_proj: nn.Linear, o_proj: nn.Linear, adapter) -> None:
        d = adapter.head_dim
        M = Rotation.build(d)
        W_v = _exact(v_proj.weight).reshape(-1, d, v_proj.in_features)            # (kv heads, d, in)
        _set(v_proj.weight, M.apply(W_v.transpose(1, 2)).transpose(1, 2).reshape(v_proj.weight.shape))  # Mᵀ·W_v,h
        if v_proj.bias is not None:
            _set(v_proj.bias, M.apply(_exact(v_proj.bias).reshape(-1, d)).reshape(-1))
        W_o = _exact(o_proj.weight).reshape(o_proj.out_features, -1, d)           # (out, heads, d)
        _set(o_proj.weight, M.apply(W_o).reshape(o_proj.weight.shape))                # W_o,h·M

    def attach(self, model, adapter) -> list:
        self._check(adapter)
        handles = []
        if _head_and_embeddings_tied(model):
            handles += _conjugate(attrgetter(adapter.final_norm)(model), self.residual(adapter))
        if self.online_down:
            for block in adapter.blocks(model):
                down = attrgetter(adapter.mlp_out)(block)
                handles.append(down.register_forward_pre_hook(_OnlineRotation(Rotation.build(down.in_features))))
        return handles


class _OnlineRotation:
    """A forward pre-hook: the module's input x ← x·H."""

    def __init__(self, rotation: Rotation):
        self.rotation = rotation

    def __call__(self, module, args):
        return (self.rotation.apply(args[0]), *args[1:])


def _conjugate(norm: nn.Module, Q: Rotation) -> list:
    """norm(r') becomes norm(r'·Qᵀ)·Q: the norm sees the unrotated stream, its output is rotated again."""
    before = norm.register_forward_pre_hook(lambda module, args: (Q.unapply(args[0]), *args[1:]))
    after = norm.register_forward_hook(lambda module, args, out: Q.apply(out))
    return [before, after]
