"""Export to the GPTQ checkpoint format (checkpoint_format "gptq", a.k.a. v1), as GPTQModel and AutoGPTQ write it and
transformers (through optimum + gptqmodel) and vLLM load it.

    config.json, tokenizer files   the model's, with "quantization_config": {"quant_method": "gptq", "bits",
                                   "group_size" (−1: per-channel), "desc_act", "sym", "checkpoint_format": "gptq",
                                   "lm_head": false, "meta": {"quantizer": ["boa:VERSION"]}}
    model.safetensors              (or shards past max_shard_size, with model.safetensors.index.json) every
                                   tensor that is not quantized as the model holds it (a tied head once, under
                                   the embedding's name), and per quantized layer NAME, with G groups of g columns:
        NAME.qweight   int32   (in·b/32, out)   codes packed along the input: column o of the words holds codes
                                                (0, o), (1, o), … as one bit stream (below)
        NAME.qzeros    int32   (G, out·b/32)    zero points minus one (v1), packed along the output
        NAME.scales    float16 (G, out)
        NAME.g_idx     int32   (in,)            each input column's group: k // g, or any assignment (desc_act)
        NAME.bias      float16 (out,)           if the layer has one
    boa_export.json                {"format", "boa_version", "config": the boa QuantConfig or null}

    W[o, k] = scales[g_idx[k], o] · (code(k, o) − (stored zero(g_idx[k], o) + 1))

Bit layout: 32-bit little-endian words hold the b-bit fields as one continuous bit stream, field j in stream bits
[j·b, (j+1)·b): 32/b fields per word for b = 2, 4, 8, and for b = 3 GPTQ's 3-bit layout, 32 fields per 3 words with
fields 10 and 21 straddling a word boundary (the same stream; compressed_tensors.pack_int32 writes both).

Zero points: v1 stores zero − 1 in each field (GPTQModel's convert_gptq_v2_to_v1_format; loaders add 1 back, per
field or as one word-wide add). A zero point of 0 (an asymmetric group with no negative weight) would store −1,
which no b-bit field holds; such a (row, group) is stored mirrored, codes maxq − c, zero maxq and scale −s, which
dequantizes to the same weights (−s · ((maxq − c) − maxq) = s · c) and leaves every field in [0, maxq − 1], so
per-field and word-wide loaders agree.

Scales are float16 as the format prescribes: exact for a float16 model, rounded to float16 otherwise.

Layers at several widths (mixed precision): the config's bits and group_size are those of most weights, and each
other layer is named in GPTQModel's "dynamic" overrides, {"+:^NAME$": {"bits": b, "group_size": g}}, which GPTQModel
and vLLM read (vLLM fuses q/k/v and gate/up, so its layers must share a width: --target-bits ties them).

Not expressible, refused with a BoaError: widths other than 2, 3, 4, 8, in or out features that do not fill whole
words, groups that are not whole runs of one size, scales beyond float16's range.
"""
from __future__ import annotations

import math
import re
from collections import Counter

import torch
from torch import nn

from boa.core.errors import BoaError
from boa.core.shards import DEFAULT_MAX_SHARD_BYTES
from boa.export.common import (
    check_integer_zero_points, check_no_transforms, group_width, has_plain_groups, is_symmetric, pack_int32,
    plain_tensors, write_export,
)
from boa.core.quantizer import QuantizedWeight
from boa.models.adapter import adapter_for

GPTQ_BITS = (2, 3, 4, 8)


def _width(name: str, q: QuantizedWeight) -> tuple[int, int]:
    """(bits, group size; −1: per-channel) of one layer, checked against what the format holds."""
    out, cols = q.codes.shape
    if q.bits not in GPTQ_BITS:
        raise BoaError(f"{name}: {q.bits}-bit weights cannot be stored in the GPTQ format ({GPTQ_BITS} bits)")
    if cols * q.bits % 32 or out * q.bits % 32:
        raise BoaError(f"{name} is {out}×{cols}; the GPTQ format packs {q.bits}-bit fields into whole 32-bit words, "
                       f"so both sizes must be multiples of {32 // math.gcd(q.bits, 32)}")
    group_size = group_width(q) if q.scale.shape[1] > 1 else -1
    if q.scale.shape[1] != (1 if group_size == -1 else -(-cols // group_size)):
        raise BoaError(f"{name} has {q.scale.shape[1]} groups over {cols} columns, which group_size "
                       f"{group_size} does not give; export with --format compressed-tensors")
    return q.bits, group_size


def _widths(layers: dict[str, QuantizedWeight], checkpoint_name) -> tuple[tuple[int, int], dict]:
    """(the width of most weights: the config's bits and group_size, GPTQModel's `dynamic` overrides for the layers
    at other widths: {"+:^NAME$": {"bits", "group_size"}}, as GPTQModel and vLLM read them)."""
    widths = {name: _width(name, q) for name, q in layers.items()}
    weights = Counter()
    for name, width in widths.items():
        weights[width] += layers[name].codes.numel()
    base = max(weights, key=lambda w: (weights[w], w))
    dynamic = {f"+:^{re.escape(checkpoint_name(name))}$": {"bits": bits, "group_size": group_size}
               for name, (bits, group_size) in widths.items() if (bits, group_size) != base}
    return base, dynamic


def gptq_tensors(q: QuantizedWeight) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales and g_idx of one layer (see the module docstring)."""
    maxq = 2**q.bits - 1
    scale, zero, codes = q.scale.float(), q.zero.round().to(torch.int64), q.codes.to(torch.int64)
    mirrored = zero == 0
    scale, zero = torch.where(mirrored, -scale, scale), torch.where(mirrored, maxq, zero)
    codes = torch.where(mirrored[:, q.g_idx.long()], maxq - codes, codes)
    scales = scale.to(torch.float16)
    if not torch.isfinite(scales).all():
        raise BoaError(f"a scale of {scale.abs().max().item():.3g} lies beyond float16's range, which the GPTQ "
                       "format stores scales in; export with --format compressed-tensors")
    return {
        "qweight": pack_int32(codes, q.bits, dim=1).t().contiguous(),
        "qzeros": pack_int32((zero - 1).t(), q.bits, dim=1),
        "scales": scales.t().contiguous(),
        "g_idx": q.g_idx.to(torch.int32).contiguous(),
    }


def export_gptq(model: nn.Module, layers: dict[str, QuantizedWeight], out_dir, tokenizer=None, config=None,
                max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES):
    """Writes `model` (fake-quantized or loaded by boa.load) with its quantized `layers` {module name:
    QuantizedWeight} to `out_dir` in the GPTQ (v1) checkpoint format, in weight files of at most max_shard_size
    (e.g. "5GB"); `config` is the boa QuantConfig recorded in the export manifest."""
    from boa import __version__

    if not layers:
        raise BoaError("the model has no quantized layers to export; quantize it first with `boa quantize`")
    check_no_transforms(model, "GPTQ")
    check_integer_zero_points(layers, "the GPTQ format")
    (bits, group_size), dynamic = _widths(layers, adapter_for(model.config).checkpoint_name)
    tensors = plain_tensors(model, layers)
    for name, q in layers.items():
        if f"{name}.bias" in tensors:
            tensors[f"{name}.bias"] = tensors[f"{name}.bias"].to(torch.float16)
        tensors.update({f"{name}.{key}": t for key, t in gptq_tensors(q).items()})
    quantization_config = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size,
        "desc_act": not all(has_plain_groups(q) for q in layers.values()),
        "sym": all(is_symmetric(q) for q in layers.values()),
        "checkpoint_format": "gptq", "lm_head": False, "meta": {"quantizer": [f"boa:{__version__}"]},
    }
    if dynamic:  # mixed precision (--target-bits)
        quantization_config["dynamic"] = dynamic
    return write_export(out_dir, "gptq", model, tensors, quantization_config, tokenizer, config, max_shard_size)
