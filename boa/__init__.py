"""boa: backpropagation-free post-training quantization for transformer LLMs.

    import boa
    model, tokenizer, _ = boa.load_model("smollm2-135m")
    calib = boa.data.calibration_windows(tokenizer, "wikipedia", nsamples=128, seqlen=512)
    result = boa.quantize(model, boa.GPTQ(bits=4, group_size=128), calib=calib)
    boa.save(result, "out/smollm2-w4g128", tokenizer)
    qmodel, tokenizer, config = boa.load("out/smollm2-w4g128")

CNNs with BatchNorm (Genie, zero-shot): boa.load_vision_model, boa.quantize_vision, boa.save_vision, boa.load_vision
(the package boa.vision, which never imports transformers).

Names are imported on first use, so `import boa.vision` (or boa.core) does not load the LLM path.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "BoaError": "boa.core.errors",
    "QuantConfig": "boa.config",
    "RTN": "boa.algorithms",
    "GPTQ": "boa.algorithms",
    "BoA": "boa.algorithms",
    "TurboBoA": "boa.algorithms",
    "Aespa": "boa.algorithms",
    "QuantResult": "boa.pipeline",
    "quantize": "boa.pipeline",
    "load": "boa.export",
    "save": "boa.export",
    "load_model": "boa.models",
    "VisionQuantConfig": "boa.vision",
    "quantize_vision": "boa.vision",
    "load_vision": "boa.vision",
    "save_vision": "boa.vision",
    "load_vision_model": "boa.vision",
}
_SUBPACKAGES = ("algorithms", "core", "data", "eval", "export", "models", "nn", "stats", "vision")

__all__ = sorted([*_EXPORTS, "data", "eval"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"boa.{name}")
    else:
        raise AttributeError(f"module 'boa' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS, *_SUBPACKAGES])
