"""What boa's two foreign exports (compressed_tensors.py, gptq_format.py) share: packing codes into an int32 bit
stream, telling a layer's grid shape, the unquantized tensors, and writing the folder atomically, its weights in
shards with the Hugging Face index past a size (what transformers and vLLM read)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from boa.core.errors import BoaError
from boa.core.output import writing_output
from boa.core.quantizer import QuantizedWeight
from boa.core.shards import DEFAULT_MAX_SHARD_BYTES, ShardWriter, parse_size
from boa.models.adapter import adapter_for

EXPORT_MANIFEST = "boa_export.json"
_MASK32 = (1 << 32) - 1


def check_no_transforms(model: nn.Module, fmt: str) -> None:
    """A model rotated by boa.transforms needs its run-time parts (online Hadamards, a conjugated final norm), which
    `fmt` cannot describe: refused rather than written as a model that computes something else."""
    transforms = getattr(model, "boa_transforms", ())
    if transforms:
        raise BoaError(f"this model was quantized with {[t.name for t in transforms]}, whose run-time rotations the "
                       f"{fmt} format cannot describe; keep boa's own format (boa.load / boa eval / boa generate run "
                       "it)")


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Integers in [0, 2^bits) packed along `dim` into int32 words as one continuous little-endian bit stream."""
    x = values.movedim(dim, -1).to(torch.int64)
    n = x.shape[-1]
    start = torch.arange(n, device=x.device) * bits
    word, shift = start // 32, start % 32
    out = torch.zeros(*x.shape[:-1], -(-n * bits // 32) + 1, dtype=torch.int64, device=x.device)
    out.index_add_(-1, word, (x << shift) & _MASK32)
    out.index_add_(-1, word + 1, x >> (32 - shift))  # the high bits of a field that straddles two words (else 0)
    out = out[..., :-1]
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32).movedim(-1, dim).contiguous()


def group_width(q: QuantizedWeight) -> int:
    """The columns of a full group (all of them per-channel); only the last group may be narrower."""
    return int(torch.bincount(q.g_idx.long()).max())


def has_plain_groups(q: QuantizedWeight) -> bool:
    """Whether group k holds exactly the columns [k·g, (k+1)·g) (no act-order permutation)."""
    cols = q.codes.shape[1]
    return torch.equal(q.g_idx.long(), torch.arange(cols, device=q.g_idx.device) // group_width(q))


def check_integer_zero_points(layers: dict[str, QuantizedWeight], format_name: str) -> None:
    """That every layer's grid is scale · (code − zero) with an integer zero point: GGUF's block minimums (an
    offset) have no place in `format_name`."""
    for name, q in layers.items():
        if q.offset is not None:
            raise BoaError(f"{name} sits on GGUF grids with block minimums (Q2_K/Q4_K/Q5_K), which {format_name} "
                           "cannot hold; export it with --format gguf, or quantize on another grid")


def is_symmetric(q: QuantizedWeight) -> bool:
    return bool((q.zero == 2 ** (q.bits - 1)).all())


def plain_tensors(model: nn.Module, layers: dict) -> dict[str, torch.Tensor]:
    """The model's state dict without the quantized layers' weights (a fake-quantized `weight`, or a QuantLinear's
    packed buffers); their biases stay. Tensors sharing storage (a tied lm_head) are kept once, under the first name
    (the embedding's), which is the one transformers re-ties from."""
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        owner, leaf = name.rsplit(".", 1)
        if owner in layers and leaf != "bias":
            continue
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().contiguous()
    return tensors


def write_export(out_dir, fmt: str, model: nn.Module, tensors: dict, quantization_config: dict,
                 tokenizer=None, config=None, max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Writes config.json (the model's, with `quantization_config`), the tokenizer, the weights (under the names
    the family's own checkpoints use: Adapter.checkpoint_name) and the export manifest to `out_dir`, atomically:
    model.safetensors, or past max_shard_size (e.g. "5GB") shards model-0000K-of-0000N.safetensors with
    model.safetensors.index.json."""
    from boa import __version__

    out_dir = Path(out_dir)
    hf_config = model.config.to_dict()
    hf_config["quantization_config"] = quantization_config
    hf_config["dtype"] = str(model_dtype(model)).removeprefix("torch.")
    manifest = {"format": fmt, "boa_version": __version__, "config": None if config is None else config.to_dict()}
    max_shard_bytes = parse_size(max_shard_size)  # an unreadable size fails before any file is written
    with writing_output(out_dir, EXPORT_MANIFEST, manifest, writer="boa export") as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        writer = ShardWriter(tmp, max_shard_bytes, metadata={"format": "pt"})  # transformers wants "pt" there
        checkpoint_name = adapter_for(model.config).checkpoint_name
        for name, tensor in tensors.items():
            writer.add(checkpoint_name(name), tensor)
        writer.finish()
    return out_dir


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (its embeddings, norms, ...)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())
