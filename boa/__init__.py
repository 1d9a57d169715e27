"""boa: backpropagation-free post-training quantization for transformer LLMs.

    import boa
    model, tokenizer, _ = boa.load_model("smollm2-135m")
    calib = boa.data.calibration_windows(tokenizer, "wikipedia", nsamples=128, seqlen=512)
    result = boa.quantize(model, boa.QuantConfig(method="gptq", bits=4, group_size=128), calib=calib)
    boa.save(result, "out/smollm2-w4g128", tokenizer)
    qmodel, tokenizer, config = boa.load("out/smollm2-w4g128")

CNNs with BatchNorm (Genie, zero-shot): boa.load_vision_model, boa.quantize_vision, boa.save_vision, boa.load_vision
(see boa/vision.py).
"""
from boa import data, eval  # noqa: A004 - the evaluation subpackage
from boa.config import QuantConfig
from boa.errors import BoaError
from boa.export import load, save
from boa.models import load_model
from boa.pipeline import QuantResult, quantize
from boa.vision import VisionQuantConfig, quantize_vision
from boa.export.vision import load_vision, save_vision
from boa.models.vision import load_vision_model

__version__ = "0.1.0"
__all__ = ["BoaError", "QuantConfig", "QuantResult", "VisionQuantConfig", "data", "eval", "load", "load_model",
           "load_vision", "load_vision_model", "quantize", "quantize_vision", "save", "save_vision"]
