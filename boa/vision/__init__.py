"""The CNN path (Genie, CVPR 2023): zero-shot quantization of BatchNorm CNNs — images distilled from the network's
own BatchNorm statistics (Genie-D) and block reconstruction with learned steps and rounding (Genie-M).

    config.py           VisionQuantConfig, DistillConfig, ReconstructConfig, VISION_METHODS, DATA_SOURCES
    quantize.py         the driver: calibration images → Genie-M (or RTN) → VisionResult
    distillation.py     Genie-D: generator, BN-statistics loss, swing convolution, checkpointed batches
    reconstruction.py   Genie-M: block reconstruction over a Sequential's units
    quantizers.py       the learned-step + AdaRound weight quantizer and the LSQ activation quantizer
    fake_quant.py       attaching them to a CNN's conv/linear layers, the bit plan, freezing
    models.py           the CNNs (VisionSpec, REGISTRY, load_vision_model)
    images.py           Fashion-MNIST, bundled photographs, Gaussian noise
    format.py           save_vision / load_vision (the boa-vision folder)
    evaluate.py         classifier metrics: top-1, agreement and KL against the float model

Names are imported on first use; nothing here imports transformers or boa's LLM path. (No module is named after a
function it exports: importing boa.vision.distillation must not make `boa.vision.distill` a module.)
"""
from __future__ import annotations

import importlib

# public name -> the module of boa.vision that defines it
_EXPORTS = {
    "VISION_METHODS": "config",
    "DATA_SOURCES": "config",
    "DistillConfig": "config",
    "ReconstructConfig": "config",
    "VisionQuantConfig": "config",
    "VisionResult": "quantize",
    "calibration_images": "quantize",
    "quantize_vision": "quantize",
    "DistillResult": "distillation",
    "distill": "distillation",
    "ReconstructResult": "reconstruction",
    "reconstruct": "reconstruction",
    "save_vision": "format",
    "load_vision": "format",
    "VISION_MODELS": "models",
    "VisionSpec": "models",
    "build_vision_model": "models",
    "load_vision_model": "models",
    "evaluation_images": "images",
    "classifier_metrics": "evaluate",
    "logits_of": "evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'boa.vision' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"boa.vision.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
