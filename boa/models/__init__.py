"""Loading models by built-in name, local folder or hub id, each with its family's Adapter."""
from boa.models.adapter import Adapter, adapter_for, register, supported_model_types
from boa.models.loader import BUILTIN_MODELS, load_model, model_folder, stream_model
from boa.models.weights import ResidentModel, StreamedModel

__all__ = [
    "Adapter",
    "BUILTIN_MODELS",
    "adapter_for",
    "load_model",
    "model_folder",
    "register",
    "ResidentModel",
    "StreamedModel",
    "stream_model",
    "supported_model_types",
]
