"""Saving and loading quantized models."""
from boa.export.boa_format import check_output_dir, load, read_manifest, save

__all__ = ["check_output_dir", "load", "read_manifest", "save"]
