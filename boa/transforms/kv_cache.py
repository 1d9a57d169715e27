"""KV-cache quantization (QuaRot's KV·: ALGORITHMS.md §7): keys and values quantized per head and token,
asymmetric, one grid per head_dim-long vector (clip 0.95), after a Hadamard over head_dim on queries and keys.

Keys are quantized after RoPE, where the cache holds them; rotating queries and keys by the same orthogonal H leaves
q·kᵀ unchanged and spreads the keys' outlier dimensions before they are rounded. The attention modules run through
`kv_attention`, registered with transformers' AttentionInterface (as boa's statistics capture is), which quantizes
what the layer attends to and then calls the implementation the model had. Each token's grid depends on that token
alone, so quantizing the whole cache at every step gives what a cache stored at `bits` would hold (fake
quantization: during calibration and evaluation the cache keeps its dtype). For generation, `KVQuant.new_cache()`
is a transformers Cache that does store them at `bits`: uint8 codes (two per byte at 4 bits) with a float32 scale
and zero point per head and token, rotated and quantized as each token arrives, dequantized when attended to.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch

from transformers.cache_utils import Cache, DynamicLayer

from boa.transforms.base import Transform, check_quantizer, register_transform
from boa.transforms.hadamard import Rotation

KV_ATTENTION = "boa_kv"
KV_BITS = (4, 8)

_settings: dict[int, "KVQuant"] = {}   # id(attention module) -> its settings
_stock: dict[int, str] = {}            # id(config) -> the implementation kv_attention stands in for
_head_rotation = lru_cache(maxsize=None)(Rotation.build)  # the unseeded Hadamard over head_dim, built once per order


def per_head_codes(x: torch.Tensor, bits: int, clip_ratio: float) -> tuple[torch.Tensor, ...]:
    """Codes uint8 (..., d), scales and zero points float32 (..., 1) of an asymmetric grid per vector of the last
    axis, range clip·[min, max]: x ≈ (codes − zero) · scale."""
    maxq = 2**bits - 1
    x32 = x.float()
    low, high = x32.amin(-1, keepdim=True) * clip_ratio, x32.amax(-1, keepdim=True) * clip_ratio
    scale = ((high - low) / maxq).clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.round(-low / scale)
    return torch.clamp(torch.round(x32 / scale) + zero, 0, maxq).to(torch.uint8), scale, zero


def dequantize_per_head(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype):
    """(codes − zero) · scale in float32, returned in `dtype`."""
    return ((codes.float() - zero) * scale).to(dtype)


def quantize_per_head(x: torch.Tensor, bits: int, clip_ratio: float) -> torch.Tensor:
    """x (..., d) fake-quantized with per_head_codes' grid, returned in x's dtype."""
    return dequantize_per_head(*per_head_codes(x, bits, clip_ratio), x.dtype)


def kv_attention(module, query, key, value, attention_mask, **kwargs):
    """Queries and keys rotated over head_dim, keys and values quantized, then the model's own attention. Keys and
    values from a QuantizedKVCache were rotated and quantized when they were stored."""
    settings = _settings.get(id(module))
    if settings is not None:
        rotation = _head_rotation(query.shape[-1]) if settings.rotate_qk else None
        if rotation is not None:
            query = rotation.apply(query)
        if not getattr(key, "boa_kv_stored", False):
            key = rotation.apply(key) if rotation is not None else key
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


def kv_mask(*args, config=None, **kwargs):
    """The attention mask kv_attention's implementation expects: the stock implementation's mask builder (transformers
    builds no mask at all for an implementation it has no builder for, so chunked steps against a cache and eager
    attention would run unmasked); the eager additive mask where the stock one is unknown, as kv_attention then
    runs eager attention."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    stock = _stock.get(id(config), "eager")
    builder = ALL_MASK_ATTENTION_FUNCTIONS[stock if stock in ALL_MASK_ATTENTION_FUNCTIONS else "eager"]
    return builder(*args, config=config, **kwargs)


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

        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        if ALL_ATTENTION_FUNCTIONS.get(KV_ATTENTION) is not kv_attention:
            AttentionInterface.register(KV_ATTENTION, kv_attention)
        if ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(KV_ATTENTION) is not kv_mask:
            AttentionMaskInterface.register(KV_ATTENTION, kv_mask)
        modules = [block.get_submodule(adapter.attention) for block in adapter.blocks(model)]
        configs = {id(m.config): m.config for m in modules}.values()
        for config in configs:
            if config._attn_implementation != KV_ATTENTION:
                _stock[id(config)] = config._attn_implementation
                config._attn_implementation = KV_ATTENTION
        for module in modules:
            _settings[id(module)] = self
        return [_Detach(modules, list(configs))]

    def new_cache(self) -> "QuantizedKVCache":
        """An empty cache for generation that stores keys and values at `bits`."""
        return QuantizedKVCache(self)


class _StoredCodes:
    """One growing tensor of a layer's cache, (batch, heads, tokens, d), held as codes and a grid per head-vector;
    at 4 bits two codes share a byte (d padded to even)."""

    def __init__(self, bits: int, clip_ratio: float):
        self.bits, self.clip_ratio = bits, clip_ratio
        self.codes = self.scale = self.zero = None
        self.dim = 0

    def append(self, x: torch.Tensor) -> None:
        codes, scale, zero = per_head_codes(x, self.bits, self.clip_ratio)
        self.dim = x.shape[-1]
        if self.bits == 4:
            if self.dim % 2:
                codes = torch.nn.functional.pad(codes, (0, 1))
            codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        parts = (codes, scale, zero) if self.codes is None else (
            torch.cat([self.codes, codes], -2), torch.cat([self.scale, scale], -2), torch.cat([self.zero, zero], -2))
        self.codes, self.scale, self.zero = parts

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        codes = self.codes
        if self.bits == 4:
            codes = torch.stack([codes & 15, codes >> 4], -1).flatten(-2)[..., : self.dim]
        return dequantize_per_head(codes, self.scale, self.zero, dtype)

    @property
    def tokens(self) -> int:
        return 0 if self.codes is None else self.codes.shape[-2]

    @property
    def nbytes(self) -> int:
        return 0 if self.codes is None else sum(t.nbytes for t in (self.codes, self.scale, self.zero))


class _QuantizedKVLayer(DynamicLayer):
    """A layer's keys (rotated over head_dim first when rotate_qk) and values, stored by _StoredCodes. `update`
    returns them dequantized in the model's dtype, marked so kv_attention does not quantize them again."""

    is_croppable = False

    def __init__(self, settings: "KVQuant"):
        super().__init__()
        self.settings = settings
        self.stored_keys = _StoredCodes(settings.bits, settings.clip_ratio)
        self.stored_values = _StoredCodes(settings.bits, settings.clip_ratio)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.dtype = key_states.dtype
        if self.settings.rotate_qk:
            key_states = _head_rotation(key_states.shape[-1]).apply(key_states)
        self.stored_keys.append(key_states)
        self.stored_values.append(value_states)
        keys, values = self.stored_keys.dequantize(self.dtype), self.stored_values.dequantize(self.dtype)
        keys.boa_kv_stored = values.boa_kv_stored = True
        return keys, values

    def get_seq_length(self) -> int:
        return self.stored_keys.tokens

    def reset(self) -> None:
        self.__init__(self.settings)

    @property
    def nbytes(self) -> int:
        return self.stored_keys.nbytes + self.stored_values.nbytes


class QuantizedKVCache(Cache):
    """transformers' dynamic cache with every layer a _QuantizedKVLayer; `nbytes` is what it holds."""

    def __init__(self, settings: KVQuant):
        super().__init__(layer_class_to_replicate=lambda: _QuantizedKVLayer(settings))

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)
