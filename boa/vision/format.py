"""Saving and loading quantized CNNs (Genie-M or RTN): one folder that `boa.load_vision` turns back into a model.

    quantization.json     {"format": "boa-vision", "version", "model": built-in name, "config", "report",
                           "layers": {NAME: {"weight_bits", "input_bits", "input_signed", "in_features"}}}
    model.safetensors     every float tensor (BatchNorm, biases) under its state-dict name, and per quantized layer
                          NAME its packed weight as in boa's LLM format (NAME.qweight uint8, NAME.scales float32,
                          NAME.zeros uint8; per output channel, the conv weight flattened to (out, C·kh·kw)) and
                          NAME.input_step (the activation step, absent for a float input)

The loaded model computes exactly what the quantized model computed when it was saved (same codes, same
dequantization, same activation steps). Output folders follow boa.core.output: new, empty or an earlier
boa-vision folder (replaced atomically); the run's checkpoint beside it (OUT.partial) goes once the folder is written.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from boa.core.errors import BoaError
from boa.core.output import read_manifest, writing_output
from boa.core.packed import PackedWeight, pack
from boa.vision.fake_quant import FrozenLayer, apply_frozen, quant_layers

FORMAT = "boa-vision"
VERSION = 1
MANIFEST = "quantization.json"
WEIGHTS = "model.safetensors"
WRITER = "boa quantize-vision"  # the command that writes these folders, named in errors


def save_vision(result, folder, report: dict | None = None) -> Path:
    """Writes what boa.quantize_vision returned (a VisionResult) atomically, with an optional report, then removes
    the run's checkpoint (folder.partial)."""
    folder = Path(folder)
    layers = result.layers
    tensors = {}
    for name, tensor in result.model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in layers and leaf == "weight" or ".input_quantizer." in f".{name}":
            continue
        tensors[name] = tensor.detach().contiguous()
    entries = {}
    for name, layer in layers.items():
        packed = pack(layer.weight)
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in packed.tensors().items()})
        if layer.input_bits is not None:
            tensors[f"{name}.input_step"] = layer.input_step.reshape(1).float()
        entries[name] = {"weight_bits": packed.bits, "input_bits": layer.input_bits,
                         "input_signed": layer.input_signed, "in_features": packed.in_features}
    manifest = {"format": FORMAT, "version": VERSION, "model": result.model_name, "config": result.config.to_dict(),
                "report": report, "layers": entries}
    with writing_output(folder, MANIFEST, manifest, writer=WRITER, checkpoint=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS))
    return folder


def load_vision(folder):
    """(model, VisionSpec, manifest) from a folder written by save_vision; the model is in eval mode."""
    from boa.vision.models import build_vision_model

    folder = Path(folder)
    manifest = read_manifest(folder, MANIFEST)
    if manifest is None or manifest.get("format") != FORMAT:
        raise BoaError(f"{folder} is not a quantized CNN saved by boa (no {FORMAT} {MANIFEST}); "
                       "make one with `boa quantize-vision`")
    if manifest.get("version") != VERSION:
        raise BoaError(f"{folder} was written by {FORMAT} version {manifest.get('version')}; this boa reads {VERSION}")
    model, spec = build_vision_model(manifest["model"])
    tensors = load_file(str(folder / WEIGHTS))
    by_name = dict(quant_layers(model))
    for name, info in manifest["layers"].items():
        if name not in by_name:
            raise BoaError(f"{folder}: layer {name} is not in {manifest['model']}; the file is damaged")
        try:
            packed = PackedWeight(qweight=tensors.pop(f"{name}.qweight"), scales=tensors.pop(f"{name}.scales"),
                                  zeros=tensors.pop(f"{name}.zeros"), perm=None, bits=info["weight_bits"],
                                  in_features=info["in_features"], group_size=info["in_features"])
            step = tensors.pop(f"{name}.input_step") if info["input_bits"] is not None else None
        except KeyError as err:
            raise BoaError(f"{folder} is missing {err.args[0]}; the file is damaged") from None
        weight = by_name[name].weight
        packed.check(name, weight.shape[0], weight[0].numel())
        if step is not None and not (torch.isfinite(step).all() and (step > 0).all()):
            raise BoaError(f"layer {name}: its input step is not a positive number; the file is damaged")
        apply_frozen(by_name[name], FrozenLayer(packed.to_quantized(), info["input_bits"],
                                                None if step is None else step.reshape(()), info["input_signed"]))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    quantized = {f"{name}.weight" for name in manifest["layers"]}
    missing = [k for k in missing if k not in quantized and ".input_quantizer." not in f".{k}"]
    if missing or unexpected:
        raise BoaError(f"{folder} does not match {manifest['model']} (missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}); the file is damaged")
    return model.eval(), spec, manifest
