"""The C++ packed matmul (csrc/cpu/packed_matmul.cpp) on boa's packed layout: on this CPU's instruction set and
compiled for AVX2 and for portable C++ it equals the torch reference (dequantize, then matmul) over bits, group
sizes, act-order, ragged widths, batch sizes, bias and x dtypes; groups it cannot take run on torch."""
import pytest
import torch

from boa.core.packed import pack
from boa_kernels.packed_matmul import KERNEL_BITS
from boa_kernels.loader import load_cpu, load_cpu_for
from boa_kernels.packed_matmul import packed_matmul, packed_matmul_torch

from problems import random_quantized

BITS = KERNEL_BITS


CASES = [  # (out, in, group_size, act_order)
    (40, 256, 128, False),    # whole tiles per group
    (20, 192, 64, False),     # one tile per group
    (33, 576, 128, False),    # SmolLM2's width: a partial last group
    (24, 100, 32, True),      # ragged width, act-order permutation; two groups per tile
    (17, 64, -1, False),      # per-channel
    (16, 200, -1, True),      # per-channel, ragged, act-order (a single group: no permutation needed)
    (9, 48, 16, False),       # groups of 16: the float-lane path everywhere
]


def check_against_reference(kernel, bits, case, batch, dtype):
    out, cols, group_size, act_order = case
    packed = pack(random_quantized(out, cols, bits, group_size, act_order, seed=bits + batch))
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, cols, generator=g).to(dtype)
    bias = torch.randn(out, generator=g).to(dtype)
    y = kernel(x, packed.qweight, packed.scales, packed.zeros, packed.perm, bias, bits, packed.group_size)
    ref = packed_matmul_torch(x, packed, bias)
    assert y.dtype == dtype and y.shape == (batch, out)
    # float32 x: the products keep ~16 bits of x (two bf16 parts) or all of it (float lanes), summed in float32 in
    # another order than BLAS; bfloat16 x: the same products, then one rounding of y to bfloat16.
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    scale = ref.float().abs().max()
    assert (y.float() - ref.float()).abs().max() <= tol * scale, (bits, case, batch, dtype)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpp_kernel_matches_reference(bits, dtype):
    """GEMV (batch 1–8, every batch size has its own instantiation) and the BLAS path (batch > 8)."""
    for case in CASES:
        for batch in (1, 2, 3, 4, 5, 6, 7, 8, 9, 33):
            check_against_reference(load_cpu().packed_matmul, bits, case, batch, dtype)


@pytest.mark.parametrize("batch", [1, 33], ids=["gemv", "blas"])
def test_cpp_kernel_runs_under_inference_mode(batch):
    """Generation runs under torch.inference_mode: the BLAS path's worker threads write its output there too (they
    do not inherit the thread-local mode by themselves)."""
    with torch.inference_mode():  # 2100 rows: several blocks of the BLAS path, so that worker threads take some
        check_against_reference(load_cpu().packed_matmul, 4, (2100, 256, 128, False), batch, torch.float32)


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"], ids=["avx2", "portable"])
def test_kernel_paths_for_other_instruction_sets(march):
    """The same source compiled for AVX2 and for plain x86-64 (the portable C++ of boa/packed_math.h)."""
    module = load_cpu_for(march)
    if module is None:
        pytest.skip(f"cannot build for -march={march} here")
    assert module.packed_isa() == {"x86-64-v3": "avx2", "x86-64": "portable"}[march]
    for bits in BITS:
        for case in CASES:
            for batch in (1, 3, 9):
                check_against_reference(module.packed_matmul, bits, case, batch, torch.float32)


def test_cpp_kernel_rejects_bad_arguments():
    packed = pack(random_quantized(8, 128, 4, 32))
    op = load_cpu().packed_matmul
    with pytest.raises(RuntimeError, match="packed columns"):
        op(torch.randn(1, 64), packed.qweight, packed.scales, packed.zeros, None, None, 4, 32)
    with pytest.raises(RuntimeError, match="scales"):
        op(torch.randn(1, 128), packed.qweight, packed.scales.double(), packed.zeros, None, None, 4, 32)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        op(torch.randn(1, 128), packed.qweight, packed.scales, packed.zeros, None, None, 4, 24)


def test_groups_the_kernels_cannot_take_run_on_torch():
    packed = pack(random_quantized(8, 96, 4, 24))
    x = torch.randn(2, 96)
    assert torch.equal(packed_matmul(x, packed), packed_matmul_torch(x, packed))
