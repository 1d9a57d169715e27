"""Transforms that compose with every method (base.py): QuaRot's rotations (rotation.py, on Hadamard matrices and
the fast Walsh–Hadamard transform of hadamard.py) and per-token activation quantization (activations.py)."""
from boa.transforms.base import TRANSFORMS, Transform, register_transform, transform_from_dict
from boa.transforms.hadamard import Rotation, fast_walsh_hadamard, hadamard
from boa.transforms.rotation import QuaRot
from boa.transforms.activations import ActivationQuant, quantize_per_token

__all__ = ["TRANSFORMS", "ActivationQuant", "QuaRot", "Rotation", "Transform", "fast_walsh_hadamard", "hadamard",
           "quantize_per_token", "register_transform", "transform_from_dict"]
