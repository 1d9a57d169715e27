"""boa's kernels: the quantization hot loop (fused column compensation), batched inverse Cholesky factors, aespa's
fused learned-rounding step, the packed low-bit matmul that runs quantized models, its integer twin for low-bit
activations (W8A8, W4A8, W4A4) and the online Hadamard rotation.

Every op has a plain-torch reference beside it and runs on the best backend available (see dispatch.py):
CUDA > Triton on a GPU, C++ on a CPU, torch everywhere; `BOA_KERNELS=torch|cpp|triton|cuda` overrides.
"""
from boa_kernels.compensate import compensate_block_, compensate_block_torch
from boa_kernels.dispatch import BACKENDS, backend_for
from boa_kernels.hadamard import hadamard_transform, hadamard_transform_torch
from boa_kernels.int8_matmul import int8_matmul, int8_matmul_torch
from boa_kernels.packed_matmul import packed_matmul, packed_matmul_torch
from boa_kernels.rounding import relaxed_error, rounding_adam_step_

__all__ = ["BACKENDS", "backend_for", "compensate_block_", "compensate_block_torch", "hadamard_transform",
           "hadamard_transform_torch", "int8_matmul", "int8_matmul_torch", "packed_matmul", "packed_matmul_torch",
           "relaxed_error", "rounding_adam_step_"]
