"""Export to compressed-tensors' `pack-quantized` format (what llm-compressor writes and vLLM serves), loadable by
`transformers.AutoModelForCausalLM.from_pretrained` wherever the `compressed-tensors` package is installed.

    config.json, tokenizer files   the model's, with "quantization_config" (schema below)
    model.safetensors              (or shards past max_shard_size, with model.safetensors.index.json) every
                                   tensor that is not quantized (embeddings, norms, lm_head, biases) as the model
                                   holds it (a tied head once, under the embedding's name), and per quantized layer
                                   NAME (W = scale[:, k // g] · (code[:, k] − zero[:, k // g])):
        NAME.weight_packed      int32 (out, ⌈in·b/32⌉)   codes packed along the input (pack_int32, dim 1)
        NAME.weight_scale       model dtype (out, G)     G = in / g (strategy "group"), or 1 (strategy "channel")
        NAME.weight_shape       int64 (2,)               [out, in]
        NAME.weight_zero_point  int32 (⌈out·b/32⌉, G)    asymmetric layers only: zeros packed along the output
                                                         (pack_int32, dim 0)
    boa_export.json                {"format", "boa_version", "config": the boa QuantConfig or null}

Bit layout (pack_int32): the b-bit fields of a row form one continuous little-endian bit stream: field j occupies
stream bits [j·b, (j+1)·b), and word w holds stream bits [32w, 32w + 32) (so a 3-bit field may straddle two words);
the last word is padded with zeros. compressed-tensors stores signed values v ∈ [−2^(b−1), 2^(b−1)) as the field
v + 2^(b−1), which is exactly boa's unsigned code (and zero point): its dequantization (v − z_signed) · s equals
boa's (code − zero) · s. Symmetric layers (zero = 2^(b−1) everywhere) store no zero point.

quantization_config: {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status":
"compressed", "config_groups": {"group_i": {"targets", "weights": {"num_bits", "type": "int", "symmetric",
"strategy": "group" | "channel", "group_size": g | null, "dynamic": false}, "format": "pack-quantized"}},
"ignore": [unquantized Linear modules, e.g. lm_head], "dequantize": true if any layer is asymmetric} — one group
(targets ["Linear"]) when every layer shares a scheme, else one group per scheme targeting its layers by name.
"dequantize" is transformers' switch for dequantizing at load time, which compressed-tensors 0.20 needs to load
packed zero points; vLLM ignores it.

Not expressible, refused with a BoaError: act-order groups (g_idx other than k // g; compressed-tensors dropped
per-column g_idx), and a group size that does not divide in_features.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from boa.core.errors import BoaError
from boa.core.shards import DEFAULT_MAX_SHARD_BYTES
from boa.export.common import (
    check_integer_zero_points, group_width, has_plain_groups, is_symmetric, model_dtype, pack_int32, plain_tensors,
    write_export,
)
from boa.core.quantizer import QuantizedWeight
from boa.models.adapter import adapter_for
from boa.transforms import ActivationQuant


def _scheme(name: str, q: QuantizedWeight) -> tuple[int, bool, int | None]:
    """(bits, symmetric, group size or None per-channel) of one layer; refuses what the format cannot hold."""
    cols = q.codes.shape[1]
    if not 1 <= q.bits <= 8:
        raise BoaError(f"{name}: {q.bits}-bit weights cannot be stored in compressed-tensors (1 to 8 bits)")
    if not has_plain_groups(q):
        raise BoaError(
            f"{name}: its groups are act-order groups (g_idx is not column // group_size), which compressed-tensors "
            "cannot store (it dropped per-column g_idx); re-quantize with --act-order --static-groups or without "
            "--act-order, or export with --format gptq, which keeps g_idx"
        )
    width = group_width(q)
    if q.scale.shape[1] > 1 and cols % width:
        raise BoaError(
            f"{name}: group size {width} does not divide its {cols} input columns, which compressed-tensors "
            f"requires; re-quantize with a group size dividing {cols} (or -1 for per-channel grids)"
        )
    return q.bits, is_symmetric(q), (width if q.scale.shape[1] > 1 else None)


def _scheme_label(scheme: tuple) -> str:
    bits, symmetric, group_size = scheme
    return f"{bits}-bit " + ("per-channel" if group_size is None else f"g{group_size}")


def _weights_args(bits: int, symmetric: bool, group_size: int | None) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False,
            "strategy": "channel" if group_size is None else "group", "group_size": group_size}


def _input_activations(model: nn.Module) -> dict | None:
    """The input_activations entry of a model quantized with boa.transforms: compressed-tensors holds 8-bit
    symmetric per-token dynamic activations over each token's full range (ActivationQuant(8, clip_ratio=1.0)); the
    rotations, the KV quantizer, 4-bit or clipped activations it cannot describe."""
    transforms = getattr(model, "boa_transforms", ())
    if not transforms:
        return None
    (only, *rest) = transforms
    if not rest and isinstance(only, ActivationQuant) and only.bits == 8 and only.clip_ratio == 1.0:
        return {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token"}
    raise BoaError(f"compressed-tensors holds 8-bit per-token activations without clipping (--a-bits 8 --a-clip 1), "
                   f"not this model's {[t.to_dict() for t in transforms]}; keep boa's own format (boa.load / boa "
                   "eval / boa generate run it)")


def export_compressed_tensors(model: nn.Module, layers: dict[str, QuantizedWeight], out_dir, tokenizer=None,
                              config=None, max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Writes `model` (fake-quantized or loaded by boa.load) with its quantized `layers` {module name:
    QuantizedWeight} to `out_dir` in compressed-tensors' pack-quantized format, in weight files of at most
    max_shard_size (e.g. "5GB"); `config` is the boa QuantConfig recorded in the export manifest."""
    if not layers:
        raise BoaError("the model has no quantized layers to export; quantize it first with `boa quantize`")
    check_integer_zero_points(layers, "compressed-tensors")
    input_activations = _input_activations(model)
    dtype = model_dtype(model)
    tensors = plain_tensors(model, layers)
    by_scheme = defaultdict(list)
    for name, q in layers.items():
        scheme = _scheme(name, q)
        by_scheme[scheme].append(name)
        bits, symmetric, _ = scheme
        tensors[f"{name}.weight_packed"] = pack_int32(q.codes, bits, dim=1)
        tensors[f"{name}.weight_scale"] = q.scale.to(dtype).contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor(q.codes.shape, dtype=torch.int64)
        if not symmetric:
            tensors[f"{name}.weight_zero_point"] = pack_int32(q.zero.round().to(torch.int64), bits, dim=0)
    if len(by_scheme) > 1 and any(not symmetric for _, symmetric, _ in by_scheme):
        raise BoaError(f"the layers use {len(by_scheme)} schemes ({', '.join(sorted(map(_scheme_label, by_scheme)))}) "
                       "with zero points, which transformers' loader dequantizes all with one of them; quantize "
                       "with --sym, or export with --format gptq (per-layer widths as GPTQModel's dynamic "
                       "overrides), or keep boa's own format")
    adapter = adapter_for(model.config)
    asymmetric_experts = [n for n in layers if adapter.experts_path and f".{adapter.experts_path}." in n
                          and not is_symmetric(layers[n])]
    if asymmetric_experts:
        raise BoaError(f"{asymmetric_experts[0]} and {len(asymmetric_experts) - 1} more expert layers have zero points "
                       "(asymmetric grids), which transformers' loader for compressed-tensors MoE experts drops; "
                       "re-quantize with --sym, or export with --format gptq, or keep boa's own format")
    # the float Linears, and MoE routers (not Linears in transformers, Linears in vLLM, which matches "Linear")
    floats = [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in layers]
    if adapter.router:
        floats += [f"{adapter.blocks_path}.{i}.{adapter.router}" for i in range(len(adapter.blocks(model)))]
    ignore = sorted(adapter.checkpoint_name(n) for n in floats)
    single = len(by_scheme) == 1
    groups = {
        f"group_{i}": {"targets": ["Linear"] if single else names, "weights": _weights_args(*scheme),
                       "input_activations": input_activations, "output_activations": None,
                       "format": "pack-quantized"}
        for i, (scheme, names) in enumerate(by_scheme.items())
    }
    quantization_config = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
    }
    if any(not symmetric for _, symmetric, _ in by_scheme):
        quantization_config["dequantize"] = True
    return write_export(out_dir, "compressed-tensors", model, tensors, quantization_config, tokenizer, config,
                        max_shard_size)
