"""Saving and loading quantized models, and exporting them to formats other tools serve."""
from boa.export.boa_format import MANIFEST, load, read_manifest, save
from boa.export.compressed_tensors import export_compressed_tensors
from boa.export.gguf_format import export_gguf
from boa.export.gptq_format import export_gptq

__all__ = ["MANIFEST", "export_compressed_tensors", "export_gguf", "export_gptq", "load", "read_manifest", "save"]
