"""Routing a transformers model's attention layers through a recorder, without forked modeling files.

While `routed(...)` is active, the attention modules it names call `capture_attention` (registered with
transformers' AttentionInterface as CAPTURE on first use, not at import) through their config's
`_attn_implementation`. It hands what the layer sees — query and key already rotated (RoPE), shaped
(batch, heads, T, d) and (batch, kv_heads, T, d), the mask and the scaling — to the recorder, then calls the
implementation the config had (the modeling file's eager function when that was "eager"), so the block's outputs do
not change. Masks are built by the model before its blocks run, so capture block calls whose kwargs came from the
stock implementation (as the pipeline does). The Adapter (boa.models.adapter) offers this as `capturing`.
"""
from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

CAPTURE = "boa_capture"

_active: dict[int, tuple[object, str]] = {}  # id(attention module) -> its recorder and pass name
_replaced: dict[int, str] = {}               # id(config) -> the implementation CAPTURE stands in for


def eager_attention(module: nn.Module):
    """The modeling file's own eager attention function for this attention module."""
    return sys.modules[type(module).__module__].eager_attention_forward


def _stock_implementation(module: nn.Module):
    name = _replaced.get(id(module.config)) or "eager"
    if name in ALL_ATTENTION_FUNCTIONS and name != CAPTURE:
        return ALL_ATTENTION_FUNCTIONS[name]
    return eager_attention(module)


def capture_attention(module, query, key, value, attention_mask, **kwargs):
    """Records what a watched attention layer sees, then runs the model's own implementation (every other layer
    sharing the config goes straight through). A recorder may stop the forward (boa.stats.StopForward)."""
    if id(module) in _active:
        recorder, which = _active[id(module)]
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        with torch.no_grad():
            recorder.record(which, module, query, key, attention_mask, scaling)
    return _stock_implementation(module)(module, query, key, value, attention_mask, **kwargs)


def _register_capture() -> None:
    if ALL_ATTENTION_FUNCTIONS.get(CAPTURE) is not capture_attention:
        AttentionInterface.register(CAPTURE, capture_attention)


@contextlib.contextmanager
def routed(attentions: dict[str, nn.Module], recorder):
    """Routes the given attention modules ({"fp": module, "quantized": module}) through `capture_attention` for the
    duration, recording into `recorder` (anything with record(which, module, query, key, mask, scaling)); restores
    their configs' implementation afterwards."""
    _register_capture()
    configs = {id(module.config): module.config for module in attentions.values()}
    for key, config in configs.items():
        _replaced[key] = config._attn_implementation
    _active.update({id(module): (recorder, which) for which, module in attentions.items()})
    try:
        for config in configs.values():
            config._attn_implementation = CAPTURE
        yield recorder
    finally:
        for key, config in configs.items():
            config._attn_implementation = _replaced.pop(key)
        for module in attentions.values():
            _active.pop(id(module), None)
