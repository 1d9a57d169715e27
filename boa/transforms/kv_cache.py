"""KV-cache quantization (QuaRot's KV·: ALGORITHMS.md §7): keys and values quantized per head and token,
asymmetric, one grid per head_dim-long vector (clip 0.95), after a Hadamard over head_dim on queries and keys.

Keys are quantized after RoPE, where the cache holds them; rotating queries and keys by the same orthogonal H leaves
q·kᵀ unchanged and spreads the keys' outlier dimensions before they are rounded. The attention modules run through
`kv_attention`, registered with transformers' AttentionInterface (as boa's statistics capture is), which quantizes
what the layer attends to and then calls the implementation the model had. Each token's grid depends on that token
alone, so quantizing the whole cache at every step gives what a cache stored at `bits` would hold (fake
quantization: the cache keeps its dtype in memory).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from boa.transforms.base import Transform, check_quantizer, register_transform
from boa.transforms.hadamard import Rotation

KV_ATTENTION = "boa_kv"
KV_BITS = (4, 8)

_settings: dict[int, "KVQuant"] = {}   # id(attention module) -> its settings
_stock: dict[int, str] = {}            # id(config) -> the implementation kv_attention stands in for


def quantize_per_head(x: torch.Tensor, bits: int, clip_ratio: float) -> torch.Tensor:
    """x (..., d) fake-quantized with an asymmetric grid per vector of the last axis: range clip·[min, max]."""
    maxq = 2**bits - 1
    x32 = x.float()
    low, high = x32.amin(-1, keepdim=True) * clip_ratio, x32.amax(-1, keepdim=True) * clip_ratio
    scale = ((high - low) / maxq).clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.round(-low / scale)
    return ((torch.clamp(torch.round(x32 / scale) + zero, 0, maxq) - zero) * scale).to(x.dtype)


def kv_attention(module, query, key, value, attention_mask, **kwargs):
    """Queries and keys rotated over head_dim, keys and values quantized, then the model's own attention."""
    settings = _settings.get(id(module))
    if settings is not None:
        if settings.rotate_qk:
            rotation = Rotation.build(query.shape[-1])
            query, key = rotation.apply(query), rotation.apply(key)
        key = quantize_per_head(key, settings.bits, settings.clip_ratio)
        value = quantize_per_head(value, settings.bits, settings.clip_ratio)
    from boa.models.attention_capture import eager_attention
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    stock = _stock.get(id(module.config), "eager")  # a deep copy's config (TurboBoA's FP path) runs eager
    if stock in ALL_ATTENTION_FUNCTIONS and stock != KV_ATTENTION:
        implementation = ALL_ATTENTION_FUNCTIONS[stock]
    else:
        implementation = eager_attention(module)
    return implementation(module, query, key, value, attention_mask, **kwargs)


class _Detach:
    """A handle that takes the attention modules out of kv_attention again (the other transforms' handles are
    torch's RemovableHandle)."""

    def __init__(self, modules, configs):
        self.modules, self.configs = modules, configs

    def remove(self) -> None:
        for module in self.modules:
            _settings.pop(id(module), None)
        for config in self.configs:
            if id(config) in _stock:
                config._attn_implementation = _stock.pop(id(config))


@register_transform
@dataclass
class KVQuant(Transform):
    """Keys and values of every attention layer quantized to `bits` per head and token."""

    name: ClassVar[str] = "kv_cache"
    bits: int = 4
    clip_ratio: float = 0.95
    rotate_qk: bool = True

    def validate(self) -> None:
        check_quantizer("KV-cache", self.bits, KV_BITS, self.clip_ratio, 0.95)

    def attach(self, model, adapter) -> list:
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if ALL_ATTENTION_FUNCTIONS.get(KV_ATTENTION) is not kv_attention:
            AttentionInterface.register(KV_ATTENTION, kv_attention)
        modules = [block.get_submodule(adapter.attention) for block in adapter.blocks(model)]
        configs = {id(m.config): m.config for m in modules}.values()
        for config in configs:
            if config._attn_implementation != KV_ATTENTION:
                _stock[id(config)] = config._attn_implementation
                config._attn_implementation = KV_ATTENTION
        for module in modules:
            _settings[id(module)] = self
        return [_Detach(modules, list(configs))]
