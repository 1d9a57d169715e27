"""boa's own decode loop for Llama-family models: the per-token work without transformers' per-call Python.

transformers' forward spends most of a small model's decode step in Python (masks, cache objects, hooks, output
dataclasses): on SmolLM2 the packed kernels take ~30 µs a call and the token ~19 ms. `Decoder` holds what a step
needs and nothing else:

    x = embed(token)
    per layer:  h = rmsnorm(x) ; q,k,v = qkv(h)               one packed call (q/k/v rows concatenated at load)
                q,k = rope(q,k) ; cache[pos] = k,v            a static cache (layers, kv heads, max_len, head_dim)
                x += o_proj(attention(q, cache[:pos+1]))      torch's SDPA, GQA without copies
                h = rmsnorm(x) ; g,u = gate_up(h)             one packed call
                x += down(silu(g) · u)
    logits = head(rmsnorm(x))

On a CPU with the model in float32 or bfloat16 and every layer a packed one the C++ kernels take (or an nn.Linear),
a decode step runs each decoder layer as one C++ call (csrc/cpu/decode_layer.cpp: the same math, a layer per Python
call instead of ~40 torch ops; for a bfloat16 model the linears take bfloat16 x, the rest runs in float32, the KV
cache too); `native=False` keeps the torch path, which is its reference. Prefill runs the prompt
the same way with a causal mask on the torch path (the packed layers take their batched path). The layers are
the model's own modules (QuantLinear or nn.Linear) or row-concatenations of them; the model is not changed and
transformers' `generate` keeps working on it. Families: llama, mistral, qwen2 (q/k/v biases); a model with
run-time transforms (rotations, quantized activations or KV cache) takes transformers' path.

On a GPU a decode step is a CUDA graph (`cuda_graph`, on by default there): the step is written with fixed shapes —
the token and its position are tensors, the cache is written with index_copy_, attention runs over all max_len
positions with the later ones masked — captured once and replayed per token, so that its ~200 kernel launches cost
one. The same fixed-shape step runs on a CPU too (`_fixed_step`), where the tests hold it to the torch path.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from boa.algorithms.rtn import rtn
from boa.core.errors import BoaError
from boa.core.packed import PackedWeight
from boa.core.quantizer import QuantSpec
from boa.models.adapter import adapter_for
from boa.nn.quant_linear import QuantLinear
from boa_kernels.loader import load_cpu
from boa_kernels.packed_matmul import KERNEL_BITS, kernel_ready

FAMILIES = ("llama", "mistral", "qwen2")
HEAD_GROUP = 32  # the packed head's grids: per 32 weights, as llama.cpp's Q8_0 / Q4_0


def supports(model: nn.Module) -> bool:
    """Whether `Decoder` runs this model (else generation takes transformers' path)."""
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) in FAMILIES and not getattr(model, "boa_transforms", ())
            and getattr(config, "hidden_act", "silu") == "silu")


def concat_rows(layers: list[nn.Module]) -> nn.Module:
    """One layer computing the given layers' outputs side by side (they read one input): packed weights with their
    rows concatenated (same bits, groups and column order), or one nn.Linear."""
    first = layers[0]
    bias = None if first.bias is None else torch.cat([layer.bias for layer in layers]).detach()
    if all(isinstance(layer, QuantLinear) for layer in layers):
        packed = [layer.packed for layer in layers]
        if any(p.bits != packed[0].bits or p.group_size != packed[0].group_size or p.perm is not None
               or p.offsets is not None for p in packed):
            return _SideBySide(layers)  # act-order, mixed widths or block minimums: one call each
        joined = PackedWeight(torch.cat([p.qweight for p in packed]), torch.cat([p.scales for p in packed]),
                              torch.cat([p.zeros for p in packed]), None, packed[0].bits, packed[0].in_features,
                              packed[0].group_size)
        return QuantLinear(joined, bias)
    if all(type(layer) is nn.Linear for layer in layers):
        fused = nn.Linear(first.in_features, sum(layer.out_features for layer in layers), bias=bias is not None,
                          device=first.weight.device, dtype=first.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([layer.weight for layer in layers]))
            if bias is not None:
                fused.bias.copy_(bias)
        return fused.requires_grad_(False)
    return _SideBySide(layers)


def packed_head(head: nn.Module, bits: int | None) -> nn.Module:
    """The output head as it is (bits None), or rounded to `bits` and packed (see Decoder)."""
    if bits is None:
        return head
    if bits not in KERNEL_BITS or type(head) is not nn.Linear:
        raise BoaError(f"head_bits={bits!r}: the head (an nn.Linear) packs to one of {KERNEL_BITS} bits; 8 keeps "
                       "the logits closest to the float head's")
    q = rtn(head.weight.detach(), QuantSpec(bits=bits, group_size=HEAD_GROUP))
    return QuantLinear(q, None if head.bias is None else head.bias.detach(), dtype=torch.float32)


class _SideBySide(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.parts = nn.ModuleList(layers)

    def forward(self, x):
        return torch.cat([layer(x) for layer in self.parts], dim=-1)


class Decoder:
    """Greedy/sampled decoding state for one sequence of at most `max_len` tokens (see the module docstring)."""

    def __init__(self, model: nn.Module, max_len: int, native: bool = True, head_bits: int | None = None,
                 cuda_graph: bool | None = None):
        """head_bits: run the output head rounded to that many bits (RTN, asymmetric, groups of HEAD_GROUP) and
        packed, as llama.cpp's files hold it (Q8_0 or Q6_K): a small model's float head is most of what a decode step
        reads (SmolLM2: 113 MB in float32 against 60 MB of 4-bit layers), so this is faster, and the logits are no
        longer exactly the model's. None: the model's own head. cuda_graph: replay decode steps as a CUDA graph
        (None: wherever the model is on a GPU; where capture fails, a warning and the same step op by op)."""
        if not supports(model):
            raise BoaError(f"boa's decode loop runs {', '.join(FAMILIES)} models without run-time transforms; use "
                           "transformers' generate for this one")
        config = model.config
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        if window is not None and max_len > window:
            raise BoaError(f"{max_len} positions exceed this model's sliding window of {window}, which boa's decode "
                           "loop does not apply; generate fewer tokens or use transformers' generate")
        adapter = adapter_for(config)
        self.max_len = max_len
        self.heads, self.kv_heads, self.head_dim = adapter.n_heads, adapter.n_kv_heads, adapter.head_dim
        inner = model.model
        self.embed, self.norm, self.head = inner.embed_tokens, inner.norm, packed_head(model.lm_head, head_bits)
        self.blocks = []
        for layer in inner.layers:
            attention, mlp = layer.self_attn, layer.mlp
            self.blocks.append((
                layer.input_layernorm,
                concat_rows([attention.q_proj, attention.k_proj, attention.v_proj]),
                attention.o_proj,
                layer.post_attention_layernorm,
                concat_rows([mlp.gate_proj, mlp.up_proj]),
                mlp.down_proj,
            ))
        weight = next(p for p in model.parameters() if p.is_floating_point())
        self.dtype, self.device = weight.dtype, weight.device
        positions = torch.arange(max_len, device=self.device)[None]
        cos, sin = inner.rotary_emb(torch.zeros(1, device=self.device, dtype=self.dtype), positions)
        # (max_len, head_dim), as the model's own rotary embedding gives them
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        self.native = self._native_layers(inner.layers) if native else None
        shape = (len(self.blocks), 1, self.kv_heads, max_len, self.head_dim)
        cache_dtype = torch.float32 if self.native is not None else self.dtype
        self.keys = torch.zeros(shape, device=self.device, dtype=cache_dtype)
        self.values = torch.zeros_like(self.keys)
        self.length = 0
        # the fixed-shape step's inputs and output (a CUDA graph reads and writes these same tensors on every replay)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.positions = torch.arange(max_len, device=self.device)
        self.graph, self.logits, self.capture_tried = None, None, False
        # T = 1 steps take the fixed-shape step (captured on a GPU; op by op where capture fails, and on a CPU)
        self.use_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.use_graph and self.device.type != "cuda":
            raise BoaError("cuda_graph=True needs the model on a CUDA device")

    def _native_layers(self, layers) -> list[tuple] | None:
        """Each layer's arguments for the C++ step (csrc/cpu/decode_layer.cpp), or None where it cannot run."""
        kernels = load_cpu()
        if (self.device.type != "cpu" or self.dtype not in (torch.float32, torch.bfloat16)
                or not hasattr(kernels, "decode_layer_")):
            return None
        native = []
        for layer, (attn_norm, qkv, o_proj, mlp_norm, gate_up, down) in zip(layers, self.blocks):
            linears, norms = [qkv, o_proj, gate_up, down], [attn_norm, mlp_norm]
            if not all(_native_norm(n) for n in norms) or not all(_native_linear(m, self.dtype) for m in linears):
                return None
            tensors, ints = [], []
            for m in linears:
                if isinstance(m, QuantLinear):
                    p = m.packed
                    tensors += [p.qweight, p.scales, p.zeros, p.perm, m.bias]
                    ints += [p.bits, p.group_size]
                else:
                    tensors += [m.weight, None, None, None, m.bias]
                    ints += [0, 0]
            scale = getattr(layer.self_attn, "scaling", self.head_dim**-0.5)
            native.append((norms[0].weight.detach().float(), norms[1].weight.detach().float(),
                           norms[0].variance_epsilon, tensors, ints, float(scale)))
        return native

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (1, heads, T, head_dim) rotated as transformers' rotate-half RoPE by cos, sin (T, head_dim)."""
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _run_blocks(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, store, attend) -> torch.Tensor:
        """The decoder layers on x (1, T, hidden) at RoPE's cos, sin (T, head_dim): store(i, k, v) puts layer i's
        keys and values (1, kv_heads, T, head_dim) in the cache, attend(i, q) attends q over it."""
        T = x.shape[1]
        q_rows, kv_rows = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for i, (attn_norm, qkv, o_proj, mlp_norm, gate_up, down) in enumerate(self.blocks):
            q, k, v = qkv(attn_norm(x)).split((q_rows, kv_rows, kv_rows), dim=-1)
            q = self._rotate(q.view(1, T, self.heads, self.head_dim).transpose(1, 2), cos, sin)
            k = self._rotate(k.view(1, T, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
            store(i, k, v.view(1, T, self.kv_heads, self.head_dim).transpose(1, 2))
            x = x + o_proj(attend(i, q).transpose(1, 2).reshape(1, T, q_rows))
            gate, up = gate_up(mlp_norm(x)).chunk(2, dim=-1)
            x = x + down(F.silu(gate) * up)
        return x

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feeds ids (1, T) after the tokens already seen; returns the last position's logits (vocab,)."""
        start, T = self.length, ids.shape[1]
        if start + T > self.max_len:
            raise BoaError(f"the sequence would grow past the decoder's {self.max_len} positions; make a Decoder "
                           "with a larger max_len")
        if T > 1 and start > 0:
            raise BoaError("after the prompt the decoder takes one token per step")
        end = start + T
        if T == 1 and self.native is not None:
            return self._native_step(ids, start)
        if T == 1 and self.use_graph:
            return self._graph_step(ids, start)

        def store(i, k, v):
            self.keys[i, :, :, start:end] = k
            self.values[i, :, :, start:end] = v

        def attend(i, q):
            keys, values = self.keys[i, :, :, :end].to(q.dtype), self.values[i, :, :, :end].to(q.dtype)
            return F.scaled_dot_product_attention(q, keys, values, is_causal=T > 1,
                                                  enable_gqa=self.kv_heads != self.heads)

        x = self._run_blocks(self.embed(ids), self.cos[start:end], self.sin[start:end], store, attend)
        self.length = end
        return self.head(self.norm(x[:, -1:]))[0, -1]

    def _fixed_step(self) -> torch.Tensor:
        """One token (self.token at self.position) with shapes that never change from step to step, as a CUDA graph
        needs: the cache written by index_copy_, attention over all max_len positions, those after the token masked.
        Returns the logits (vocab,)."""
        visible = (self.positions <= self.position)[None, None, None]  # (1, 1, 1, max_len)

        def store(i, k, v):
            self.keys[i].index_copy_(2, self.position, k.to(self.keys.dtype))
            self.values[i].index_copy_(2, self.position, v.to(self.values.dtype))

        def attend(i, q):
            return F.scaled_dot_product_attention(q, self.keys[i].to(q.dtype), self.values[i].to(q.dtype),
                                                  attn_mask=visible, enable_gqa=self.kv_heads != self.heads)

        cos, sin = self.cos.index_select(0, self.position), self.sin.index_select(0, self.position)
        x = self._run_blocks(self.embed(self.token), cos, sin, store, attend)
        return self.head(self.norm(x))[0, -1]

    def _graph_step(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        self.token.copy_(ids)
        self.position.fill_(start)
        if not self.capture_tried and self.device.type == "cuda":
            self.capture_tried = True
            self._capture()
        if self.graph is None:  # the same fixed-shape step, launched op by op
            logits = self._fixed_step()
        else:
            self.graph.replay()
            logits = self.logits
        self.length = start + 1
        return logits.clone()

    def _capture(self) -> None:
        """Records _fixed_step as a CUDA graph (after warm-up calls on a side stream, as torch.cuda.graphs asks);
        the warm-up steps rewrite the cache at the current position with the same values, so nothing is lost."""
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._fixed_step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self._fixed_step()
            self.graph = graph
        except RuntimeError as err:
            warnings.warn(f"could not capture boa's decode step as a CUDA graph ({str(err).splitlines()[0]}); "
                          "running it op by op", RuntimeWarning, stacklevel=3)

    def _native_step(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        kernels = load_cpu()
        x = self.embed(ids)[0, 0].float()  # (hidden,), updated in place layer by layer
        cos, sin = self.cos[start].float(), self.sin[start].float()
        bf16 = self.dtype == torch.bfloat16
        for i, (attn_norm, mlp_norm, eps, tensors, ints, scale) in enumerate(self.native):
            kernels.decode_layer_(x, attn_norm, mlp_norm, eps, tensors, ints, self.keys[i, 0], self.values[i, 0],
                                  start, cos, sin, self.heads, self.kv_heads, scale, bf16)
        self.length = start + 1
        return self.head(self.norm(x[None, None].to(self.dtype)))[0, -1]


def _native_norm(norm: nn.Module) -> bool:
    """transformers' RMSNorm (x / rms · weight)."""
    return type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon")


def _native_linear(layer: nn.Module, dtype: torch.dtype) -> bool:
    if isinstance(layer, QuantLinear):
        return kernel_ready(layer.packed) and not layer._forward_hooks and not layer._forward_pre_hooks
    return type(layer) is nn.Linear and layer.weight.dtype == dtype
