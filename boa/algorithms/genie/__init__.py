"""Genie (CVPR 2023): zero-shot quantization of BatchNorm CNNs — distilled images (Genie-D) and block
reconstruction with learned steps and rounding (Genie-M)."""
from boa.algorithms.genie.distill import DistillConfig, DistillResult, distill
from boa.algorithms.genie.reconstruct import ReconstructConfig, ReconstructResult, reconstruct

__all__ = ["DistillConfig", "DistillResult", "ReconstructConfig", "ReconstructResult", "distill", "reconstruct"]
