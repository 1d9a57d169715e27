"""Transforms that compose with every method (base.py): QuaRot's rotations (rotation.py, on Hadamard matrices and
the fast Walsh–Hadamard transform of hadamard.py) per-token activation quantization (activations.py) and KV-cache quantization (kv_cache.py)."""
from boa.transforms.base import TRANSFORMS, Transform, register_transform, transform_from_dict
from boa.transforms.hadamard import Rotation, fast_walsh_hadamard, hadamard
from boa.transforms.rotation import QuaRot
from boa.transforms.activations import ActivationQuant, quantize_per_token
from boa.transforms.kv_cache import KVQuant, quantize_per_head

__all__ = ["TRANSFORMS", "ActivationQuant", "KVQuant", "QuaRot", "Rotation", "Transform", "fast_walsh_hadamard",
           "hadamard", "quantize_per_head", "quantize_per_token", "register_transform", "transform_from_dict"]
