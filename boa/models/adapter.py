"""Adapters: where a model family keeps its blocks, projections, head counts and rotary embedding.

Adding a family is one small subclass registered under its `config.model_type` values; nothing else in boa looks
at model names.
"""
from __future__ import annotations

import re
import sys
from operator import attrgetter

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

from boa.core.errors import BoaError
from boa.models.attention_capture import routed

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
    attention: str = "self_attn"     # the attention module inside a block (the one calling the attention function)
    rotary_path: str | None = None   # the model's rotary embedding module, if it has one
    after_blocks: tuple[str, ...]    # what the last block's output passes through before the head, in order (a
                                     # module the config leaves out, set to None, is skipped)
    model_class = AutoModelForCausalLM  # the transformers auto class that builds the model (with its head)
    # Norms, for the rotations (boa.transforms): RMSNorm blocks only (a LayerNorm's mean subtraction does not
    # commute with a rotation); inside a block, the norm before attention and the one before the MLP
    rms_norm: bool = False
    attn_norm: str | None = None
    mlp_norm: str | None = None
    final_norm: str | None = None    # from the top model: the norm before the head

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

    def capturing(self, attentions: dict[str, nn.Module], recorder):
        """A context in which these attention modules ({"fp" | "quantized": module}) report every call to
        `recorder` (its `record`) before computing as they always do: through transformers' attention interface,
        registered on first use (boa.models.attention_capture)."""
        return routed(attentions, recorder)

    def after_block_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules of after_blocks the model has, in order: the last block's output to the head's input."""
        return [m for m in (attrgetter(path)(model) for path in self.after_blocks) if m is not None]

    def rotary_embedding(self, model: nn.Module) -> nn.Module | None:
        return attrgetter(self.rotary_path)(model) if self.rotary_path else None

    def rotary_matrices(self, model: nn.Module, attention: nn.Module, seqlen: int) -> torch.Tensor | None:
        """R (seqlen, d, d): R[t] @ q is what the model's rotary embedding makes of a head vector q at position t.
        None for models without RoPE."""
        return None

    def qk_norm_weights(self, attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The per-head-dim weights of norms applied to q and k before RoPE (Qwen3), if any."""
        return None

    @property
    def qkv(self) -> tuple[str, str, str]:
        """The q, k and v projections: the layers with attention-aware statistics, fed one input."""
        return (self.q_proj, self.k_proj, self.v_proj)

    def sequential_groups(self) -> list[list[str]]:
        """A block's linear layers in true-sequential order: each group's inputs depend only on earlier groups."""
        return [list(self.qkv), [self.o_proj], list(self.mlp_in), [self.mlp_out]]

    def linear_names(self) -> list[str]:
        return [name for group in self.sequential_groups() for name in group]

    def stored_linear_names(self) -> list[str]:
        """linear_names() as the model stores them: a fused projection's parts are its one fused layer."""
        fused = self.fused_projections()
        return list(dict.fromkeys(name.rsplit(".", 1)[0] if name.rsplit(".", 1)[0] in fused else name
                                  for name in self.linear_names()))

    def fused_projections(self) -> dict[str, tuple[tuple[str, int], ...]]:
        """Fused linears inside a block, {path: ((part, rows), ...)} in row order: quantized part by part
        (boa.models.fused), the parts named path.part above."""
        return {}

    experts_path: str | None = None  # a block's fused experts module (MoE), quantized expert by expert
    router: str | None = None        # an MoE block's router (kept float)

    def split(self, model: nn.Module) -> None:
        """What the run quantizes part by part, split in place: fused projections, fused experts."""
        from boa.models.fused import split_fused

        split_fused(model, self)
        self.unfuse_experts(model)

    def unfuse_experts(self, model: nn.Module) -> None:
        """Each block's fused experts as UnfusedExperts (boa.models.experts), in place. They stay so after the run:
        saved and loaded expert by expert, each layer packed on its own."""
        from boa.models.experts import UnfusedExperts

        if self.experts_path:
            for block in self.blocks(model):
                experts = block.get_submodule(self.experts_path)
                if not isinstance(experts, UnfusedExperts):
                    block.set_submodule(self.experts_path, UnfusedExperts(experts))

    def join(self, model: nn.Module, layers: dict | None = None) -> None:
        """The fused projections joined back in place (`layers`, full names → codes, renamed to them)."""
        from boa.models.fused import join_split

        join_split(model, self, layers)

    @property
    def splits(self) -> bool:
        return bool(self.fused_projections()) or self.experts_path is not None

    def stored_slice(self, name: str) -> tuple[str, tuple] | None:
        """Where a checkpoint may keep a parameter of the split model inside a larger tensor: (that tensor's name,
        the index into it) for a part of a fused projection, or an expert's layer in the fused experts tensors
        (gate_up_proj (experts, 2·inter, hidden): gate rows first; down_proj (experts, hidden, inter)); else None."""
        head = self.blocks_path + "."
        if not name.startswith(head):
            return None
        index, _, rest = name[len(head):].partition(".")
        block = f"{head}{index}."
        owner, _, leaf = rest.rpartition(".")
        path, _, part = owner.rpartition(".")
        parts = self.fused_projections().get(path)
        if parts is not None:
            start = 0
            for other, rows in parts:
                if other == part:
                    return f"{block}{path}.{leaf}", (slice(start, start + rows),)
                start += rows
        if self.experts_path and path.startswith(self.experts_path + ".") and leaf == "weight":
            expert, inter = int(path.rsplit(".", 1)[1]), self.expert_rows
            rows = {"gate_proj": (slice(0, inter),), "up_proj": (slice(inter, 2 * inter),), "down_proj": ()}
            if part in rows:
                fused = "down_proj" if part == "down_proj" else "gate_up_proj"
                return f"{block}{self.experts_path}.{fused}", (expert, *rows[part])
        return None

    def checkpoint_name(self, name: str) -> str:
        """The name the family's own checkpoints give the tensor `name` of the model as boa holds it (what
        transformers' save_pretrained writes and vLLM reads): the same name but where a family names its unfused
        experts otherwise. The exports write these."""
        return name


@register
class LlamaAdapter(Adapter):
    """Llama, Mistral, Qwen2 and Qwen3 (Qwen3's q_norm/k_norm sit inside attention and need no quantization)."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")
    blocks_path = "model.layers"
    q_proj, k_proj, v_proj, o_proj = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
    mlp_in = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out = "mlp.down_proj"
    rotary_path = "model.rotary_emb"
    after_blocks = ("model.norm",)
    rms_norm, attn_norm, mlp_norm, final_norm = True, "input_layernorm", "post_attention_layernorm", "model.norm"

    def rotary_matrices(self, model, attention, seqlen):
        # Rotate the basis vectors with the modeling file's own apply_rotary_pos_emb, so any rope scaling and layout
        # the model uses is what we invert.
        apply = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        rotary = self.rotary_embedding(model)
        d = self.head_dim
        # on the rotary embedding's device (its buffers'), returned on the attention's: they differ while a model
        # in host memory is quantized block by block on a GPU
        device = next(rotary.buffers()).device
        positions = torch.arange(seqlen, device=device)[None]
        cos, sin = self._cos_sin(rotary, attention, torch.zeros(1, seqlen, d, device=device, dtype=torch.float32),
                                 positions)
        basis = torch.eye(d, device=device, dtype=torch.float32)[None, :, None, :].expand(1, d, seqlen, d)
        rotated, _ = apply(basis, basis, cos.float(), sin.float())   # [0, i, t] = R_t e_i
        R = rotated[0].permute(1, 2, 0).contiguous()                 # [t, :, i] = R_t e_i
        return R.to(next(attention.parameters()).device)

    def _cos_sin(self, rotary, attention, x, positions):
        return rotary(x, positions)

    def qk_norm_weights(self, attention):
        if getattr(attention, "q_norm", None) is None:
            return None
        return attention.q_norm.weight.detach(), attention.k_norm.weight.detach()


@register
class Gemma3Adapter(LlamaAdapter):
    """Gemma 3 (text): Llama's projections, with q/k norms whose weights act as 1 + w, interleaved sliding-window
    and global layers, each type with its own RoPE (the rotary module takes the layer type) and mask (recorded per
    block by BlockInputs; BoA's capture records the mask each call gets). No logit soft-capping (Gemma 2's
    attn_logit_softcapping is in the config but Gemma 3's attention does not apply it). Its norms also follow the
    attention and the MLP (post-norms), which a rotation of the residual stream does not commute with: no QuaRot."""

    model_types = ("gemma3_text",)
    rms_norm = False

    def _cos_sin(self, rotary, attention, x, positions):
        return rotary(x, positions, attention.layer_type)

    def qk_norm_weights(self, attention):
        return attention.q_norm.weight.detach().double() + 1, attention.k_norm.weight.detach().double() + 1


@register
class Phi3Adapter(LlamaAdapter):
    """Phi-3: Llama's block with q/k/v fused in qkv_proj and gate/up in gate_up_proj, each quantized as its parts
    (boa.models.fused) and stored fused."""

    model_types = ("phi3",)
    q_proj, k_proj, v_proj = "self_attn.qkv_proj.q", "self_attn.qkv_proj.k", "self_attn.qkv_proj.v"
    mlp_in = ("mlp.gate_up_proj.gate", "mlp.gate_up_proj.up")

    def fused_projections(self):
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        inter = self.config.intermediate_size
        return {"self_attn.qkv_proj": (("q", q), ("k", kv), ("v", kv)), "mlp.gate_up_proj": (("gate", inter),
                                                                                               ("up", inter))}


@register
class MoEAdapter(LlamaAdapter):
    """Mixtral and Qwen3-MoE: Llama's attention, an MoE block of `n_experts` experts (gate/up/down each) behind a
    float router. Every expert's layers are quantized on the tokens routed to it (boa.models.experts)."""

    model_types = ("mixtral", "qwen3_moe")
    rms_norm = False  # no QuaRot yet: its online Hadamard would go before every expert's down_proj
    experts_path = "mlp.experts"
    router = "mlp.gate"
    mlp_out = "mlp.experts.*.down_proj"  # a pattern: one per expert (sequential_groups lists them)

    def __init__(self, config):
        super().__init__(config)
        if config.model_type == "qwen3_moe" and (config.mlp_only_layers or config.decoder_sparse_step != 1):
            raise BoaError("this Qwen3-MoE model mixes dense and MoE blocks (mlp_only_layers / decoder_sparse_step); "
                           "boa quantizes models whose every block is MoE")

    @property
    def n_experts(self) -> int:
        return getattr(self.config, "num_local_experts", None) or self.config.num_experts

    @property
    def expert_rows(self) -> int:
        """An expert's intermediate size (rows of its gate_proj)."""
        return getattr(self.config, "moe_intermediate_size", None) or self.config.intermediate_size

    @property
    def mlp_in(self) -> tuple[str, ...]:
        return tuple(f"{self.experts_path}.{e}.{p}" for e in range(self.n_experts) for p in ("gate_proj", "up_proj"))

    def sequential_groups(self) -> list[list[str]]:
        down = [f"{self.experts_path}.{e}.down_proj" for e in range(self.n_experts)]
        return [list(self.qkv), [self.o_proj], list(self.mlp_in), down]

    _MIXTRAL_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.(gate|up|down)_proj(?=\.|$)")
    _MIXTRAL_W = {"gate": "w1", "up": "w3", "down": "w2"}

    def checkpoint_name(self, name: str) -> str:
        """Mixtral's checkpoints call the MoE block block_sparse_moe and an expert's gate/up/down w1/w3/w2 (Qwen3-MoE
        names them as boa does)."""
        if self.config.model_type != "mixtral":
            return name
        name = self._MIXTRAL_EXPERT.sub(lambda m: f".mlp.experts.{m[1]}.{self._MIXTRAL_W[m[2]]}", name)
        return name.replace(".mlp.", ".block_sparse_moe.")


@register
class OPTAdapter(Adapter):
    """OPT: learned positions, no rotary embedding, no GQA."""

    model_types = ("opt",)
    blocks_path = "model.decoder.layers"
    q_proj, k_proj, v_proj, o_proj = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"
    mlp_in = ("fc1",)
    mlp_out = "fc2"
    # final_layer_norm is None where do_layer_norm_before is off (OPT-350m); project_out exists only where
    # word_embed_proj_dim differs from hidden_size
    after_blocks = ("model.decoder.final_layer_norm", "model.decoder.project_out")


@register
class BertAdapter(Adapter):
    """BERT-style encoders (MiniLM): bidirectional attention, no RoPE."""

    model_types = ("bert",)
    model_class = AutoModel  # no LM head: the encoder itself
    blocks_path = "encoder.layer"
    attention = "attention.self"
    q_proj, k_proj, v_proj = "attention.self.query", "attention.self.key", "attention.self.value"
    o_proj = "attention.output.dense"
    mlp_in = ("intermediate.dense",)
    mlp_out = "output.dense"
    after_blocks = ()  # no final norm, and no head
