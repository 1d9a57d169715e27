"""The CUDA kernel of the fused column compensation (csrc/cuda/compensate.cu): it compiles for the GPUs we target
(nvcc alone, no GPU), the per-element math it shares with the CPU build (boa/quant_math.h) equals torch's, and on a
GPU the built extension matches the torch reference."""
import shutil
import subprocess

import pytest
import torch

from boa_kernels import compensate_block_torch
from boa_kernels.loader import CPU_FLAGS, CSRC, load_cuda

from test_kernels import SHAPES, block_problem, run

NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_kernel_compiles_without_warnings(arch, tmp_path):
    obj = tmp_path / f"compensate_sm{arch}.o"
    out = subprocess.run(
        [NVCC, "-c", "-std=c++17", "-O3", "-I", str(CSRC / "include"), "-Werror", "all-warnings",
         "-gencode", f"arch=compute_{arch},code=sm_{arch}", str(CSRC / "cuda" / "compensate.cu"), "-o", str(obj)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert obj.stat().st_size > 0


# Reads lines "w s z u_jj w_k u_jk" (hex floats) and prints "code q e w_k−e·u_jk" (hex floats) in the type argv[1],
# with maxq = argv[2]: every function of quant_math.h, compiled as the CPU extension is.
QUANT_MATH_PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "boa/quant_math.h"

template <typename T>
int run(T maxq) {
  double w, s, z, u_jj, w_k, u_jk;
  while (std::scanf("%la %la %la %la %la %la", &w, &s, &z, &u_jj, &w_k, &u_jk) == 6) {
    const T c = boa::quant_code<T>(w, s, z, maxq);
    const T q = boa::dequant<T>(c, s, z);
    const T e = boa::compensation_error<T>(w, q, u_jj);
    std::printf("%a %a %a %a\n", double(c), double(q), double(e), double(boa::compensate<T>(w_k, e, u_jk)));
  }
  return 0;
}

int main(int argc, char** argv) {
  const double maxq = std::atof(argv[2]);
  return std::strcmp(argv[1], "double") == 0 ? run<double>(maxq) : run<float>(float(maxq));
}
"""

MAXQ = 7.0
# (w, s, z): with s = 0.25, w / s is exact, so these are ties and clamps whose codes are known by hand.
TIES = [(0.125, 0.25, 0), (0.375, 0.25, 0), (0.625, 0.25, 0), (-0.125, 0.25, 3), (-0.375, 0.25, 3),
        (0.875, 0.25, 2), (10.0, 0.25, 0), (-10.0, 0.25, 5)]
TIE_CODES = [0, 2, 2, 3, 1, 6, 7, 0]  # 0.5→0, 1.5→2, 2.5→2, −0.5→−0, −1.5→−2, 3.5→4 (then + z), clamped to [0, maxq]


@pytest.fixture(scope="module")
def quant_math_exe(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ is not on PATH")
    folder = tmp_path_factory.mktemp("quant_math")
    exe = folder / "quant_math"
    source = folder / "quant_math.cpp"
    source.write_text(QUANT_MATH_PROGRAM)
    out = subprocess.run([GXX, *CPU_FLAGS, "-I", str(CSRC / "include"), str(source), "-o", str(exe)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return exe


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_quant_math_equals_torch(quant_math_exe, dtype):
    g = torch.Generator().manual_seed(0)
    n = 256
    ties = torch.tensor(TIES, dtype=dtype)
    w = torch.cat([ties[:, 0], torch.randn(n, generator=g, dtype=dtype) * 2])
    s = torch.cat([ties[:, 1], 0.2 + torch.rand(n, generator=g, dtype=dtype) * 0.3])
    z = torch.cat([ties[:, 2], torch.randint(0, 8, (n,), generator=g).to(dtype)])
    u_jj = 0.5 + torch.rand(len(w), generator=g, dtype=dtype)
    w_k, u_jk = torch.randn(2, len(w), generator=g, dtype=dtype)

    rows = zip(*(t.tolist() for t in (w, s, z, u_jj, w_k, u_jk)))
    lines = "\n".join(" ".join(v.hex() for v in row) for row in rows)
    type_name = "double" if dtype == torch.float64 else "float"
    out = subprocess.run([str(quant_math_exe), type_name, str(MAXQ)], input=lines, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    got = torch.tensor([[float.fromhex(v) for v in line.split()] for line in out.stdout.splitlines()], dtype=dtype)

    c = torch.clamp(torch.round(w / s) + z, 0, MAXQ)
    q = s * (c - z)
    e = (w - q) / u_jj
    expected = torch.stack([c, q, e, w_k - e * u_jk], dim=1)
    assert torch.equal(got, expected)
    assert got[: len(TIES), 0].tolist() == TIE_CODES


def cuda_compensate():
    kernels = load_cuda()
    assert kernels is not None, "the CUDA extension did not build (see the boa_kernels notice on stderr)"
    return kernels.compensate_block_


def cuda_problem(shape, dtype):
    b, R, B, G, shared, start, stop = shape
    return [t.cuda() for t in block_problem(b, R, B, G, shared, dtype)], start, stop


def assert_matches_torch_in_fp64(problem, start, stop):
    Wt, Et, Ct = run(compensate_block_torch, *problem, start, stop)
    Wc, Ec, Cc = run(cuda_compensate(), *problem, start, stop)
    assert torch.equal(Cc, Ct)
    # not bit-identical: the GPU contracts the update's product and difference into one FMA
    torch.testing.assert_close(Wc, Wt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Ec, Et, rtol=1e-12, atol=1e-12)


@needs_gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_compensation_matches_torch_in_fp64(shape):
    problem, start, stop = cuda_problem(shape, torch.float64)
    assert_matches_torch_in_fp64(problem, start, stop)


@needs_gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_compensation_close_in_fp32(shape):
    problem, start, stop = cuda_problem(shape, torch.float32)
    Wt, Et, Ct = run(compensate_block_torch, *problem, start, stop)
    Wc, Ec, Cc = run(cuda_compensate(), *problem, start, stop)
    assert (Ct != Cc).float().mean() < 1e-3  # a rounding tie may flip under FMA
    torch.testing.assert_close(Wc, Wt, rtol=1e-4, atol=1e-4)


@needs_gpu
@pytest.mark.parametrize("b, R, B, start, stop", [
    (2, 13, 1024, 0, 1024),  # fp64 rows of 8 KiB: 6 rows per thread block fit the 48 KiB of shared memory
    (1, 3, 6200, 100, 164),  # a row over 48 KiB: the kernel works on W in global memory
])
def test_cuda_compensation_wide_blocks(b, R, B, start, stop):
    g = torch.Generator().manual_seed(1)
    W1 = torch.randn(b, R, B, generator=g, dtype=torch.float64)
    U1 = torch.triu(torch.randn(1, B, B, generator=g, dtype=torch.float64)) / B**0.5
    U1.diagonal(dim1=-2, dim2=-1).copy_(0.5 + torch.rand(B, generator=g, dtype=torch.float64))
    scale = 0.2 + torch.rand(b, R, 2, generator=g, dtype=torch.float64) * 0.3
    zero = torch.randint(0, 8, (b, R, 2), generator=g).double()
    group_of = torch.arange(B) % 2
    assert_matches_torch_in_fp64([t.cuda() for t in (W1, U1, scale, zero, group_of)], start, stop)


@needs_gpu
def test_cuda_rejects_bad_arguments():
    W1, U1, scale, zero, group_of = (t.cuda() for t in block_problem(2, 3, 8, 1, True, torch.float32))
    E1, codes = torch.zeros_like(W1), torch.zeros_like(W1)
    compensate = cuda_compensate()
    with pytest.raises(RuntimeError, match="device"):
        compensate(W1, E1, codes, U1.cpu(), scale, zero, group_of, 7.0, 0, 8)
    with pytest.raises(RuntimeError, match="group_of"):
        compensate(W1, E1, codes, U1, scale, zero, group_of.int(), 7.0, 0, 8)
    with pytest.raises(RuntimeError, match="dtype"):
        compensate(W1, E1, codes, U1.double(), scale, zero, group_of, 7.0, 0, 8)
    with pytest.raises(RuntimeError, match="stop"):
        compensate(W1, E1, codes, U1, scale, zero, group_of, 7.0, 0, 9)
