"""Adapters: where a model family keeps its blocks, projections, head counts and rotary embedding.

Adding a family is one small subclass registered under its `config.model_type` values; nothing else in boa looks
at model names.
"""
from __future__ import annotations

from operator import attrgetter

from torch import nn

from boa.errors import BoaError

_REGISTRY: dict[str, type["Adapter"]] = {}


def register(cls: type["Adapter"]) -> type["Adapter"]:
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(config) -> "Adapter":
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise BoaError(
            f"unsupported architecture {model_type!r}; boa supports model_type "
            f"{', '.join(supported_model_types())}. Adding one is a small Adapter in boa/models/."
        )
    return _REGISTRY[model_type](config)


class Adapter:
    model_types: tuple[str, ...] = ()
    blocks_path: str                 # attribute path of the decoder blocks, from the top model
    q_proj: str                      # names inside a block
    k_proj: str
    v_proj: str
    o_proj: str
    mlp_in: tuple[str, ...]          # the MLP's input projections (gate/up, or fc1)
    mlp_out: str                     # its output projection
    rotary_path: str | None = None   # the model's rotary embedding module, if it has one

    def __init__(self, config):
        self.config = config

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.n_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.n_heads

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return attrgetter(self.blocks_path)(model)

    def rotary_embedding(self, model: nn.Module) -> nn.Module | None:
        return attrgetter(self.rotary_path)(model) if self.rotary_path else None

    def sequential_groups(self) -> list[list[str]]:
        """A block's linear layers in true-sequential order: each group's inputs depend only on earlier groups."""
        return [[self.q_proj, self.k_proj, self.v_proj], [self.o_proj], list(self.mlp_in), [self.mlp_out]]

    def linear_names(self) -> list[str]:
        return [name for group in self.sequential_groups() for name in group]


@register
class LlamaAdapter(Adapter):
    """Llama, Mistral, Qwen2 and Qwen3 (Qwen3's q_norm/k_norm sit inside attention and need no quantization)."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")
    blocks_path = "model.layers"
    q_proj, k_proj, v_proj, o_proj = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
    mlp_in = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out = "mlp.down_proj"
    rotary_path = "model.rotary_emb"


@register
class OPTAdapter(Adapter):
    """OPT: learned positions, no rotary embedding, no GQA."""

    model_types = ("opt",)
    blocks_path = "model.decoder.layers"
    q_proj, k_proj, v_proj, o_proj = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"
    mlp_in = ("fc1",)
    mlp_out = "fc2"
