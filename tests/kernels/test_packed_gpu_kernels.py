"""The GPU kernels of the packed low-bit matmul against `packed_matmul_torch`: the Triton GEMM (under
TRITON_INTERPRET=1 on CPU tensors here, on the GPU where there is one) and the CUDA GEMV (csrc/cuda/packed_gemv.cu):
compiled with nvcc for the GPUs we target, its vectorised unpacking (boa/packed_math.h) compiled for the host and
compared with the layout's torch definition, its kernel source run on the CPU by a small emulation of the CUDA
features it uses (threads, barriers, shuffles: the thread mapping and index math, not the timing or the memory
model), and on a GPU the built extension."""
import os
import shutil
import struct
import subprocess

import pytest
import torch

from boa.core.packed import pack, pack_codes
from boa.core.quantizer import QuantizedWeight
from boa_kernels.loader import CPU_FLAGS, CSRC, load_cuda
from boa_kernels.packed_matmul import packed_matmul_torch
from boa_kernels.triton_packed_gemm import packed_gemm_triton

NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
ARCHS = ("80", "90")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton: the GPU, else the interpreter (conftest)

IN = 200  # not a multiple of 64: the last tile holds 56 padding codes
OUT = 80  # not a multiple of the Triton block (64) nor of the CUDA pass (16 rows)
BITS = (2, 3, 4, 8)
GROUPS = (16, 32, 128, None)  # None: per-channel grids
CASES = [(b, g, act) for b in BITS for g in GROUPS for act in (False, True) if not (act and g is None)]
BATCHES = (1, 5, 17)


def packed_weight(out, n, bits, group, act_order, seed=0):
    """A random PackedWeight: codes and zeros over the whole range, groups scattered under act-order (perm set)."""
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if group is None else -(-n // group)
    codes = torch.randint(0, 2**bits, (out, n), generator=g).to(torch.uint8)
    scale = 0.005 + torch.rand(out, n_groups, generator=g) * 0.02
    zero = torch.randint(0, 2**bits, (out, n_groups), generator=g).float()
    g_idx = torch.zeros(n, dtype=torch.int32) if group is None else (torch.arange(n) // group).to(torch.int32)
    if act_order:
        g_idx = g_idx[torch.randperm(n, generator=g)]
    w = pack(QuantizedWeight(codes, scale, zero, g_idx, bits))
    assert (w.perm is not None) == act_order
    return w


def args(x, w, bias):
    d = x.device
    perm = None if w.perm is None else w.perm.to(d)
    return (x, w.qweight.to(d), w.scales.to(d), w.zeros.to(d), perm, None if bias is None else bias.to(d), w.bits,
            w.group_size)


def assert_close_fp32(y, ref):
    """Not bit-identical to the reference: the kernels sum in another order (runs of 16, then lanes or K blocks)
    and multiply the scale once per run of 16 columns instead of into every weight; each is an fp32 rounding of
    relative size 2⁻²⁴ per term, so the error is bounded by a few K·2⁻²⁴ of the largest output."""
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def problem(bits, group, act, batch, dtype=torch.float32, seed=0, n=IN, out=OUT):
    w = packed_weight(out, n, bits, group, act, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, n, generator=g).to(dtype)
    bias = torch.randn(out, generator=g)
    return x, w, bias


# --- Triton GEMM ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, group, act", CASES)
def test_triton_matches_torch_in_fp32(bits, group, act):
    for batch in BATCHES:
        x, w, bias = problem(bits, group, act, batch)
        x = x.to(DEVICE)
        y = packed_gemm_triton(*args(x, w, bias))
        assert y.dtype == torch.float32 and y.shape == (batch, OUT)
        assert_close_fp32(y, packed_matmul_torch(x, w, bias.to(DEVICE)))


@pytest.mark.parametrize("n", [64, 40, 1])  # whole tiles; one partial tile; a single column
def test_triton_other_widths(n):
    x, w, bias = problem(4, None, False, 3, n=n)
    x = x.to(DEVICE)
    assert_close_fp32(packed_gemm_triton(*args(x, w, None)), packed_matmul_torch(x, w))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_triton_keeps_x_dtype(dtype):
    """16-bit x: an fp16/bf16 dot of exact (code − zero) with fp32 accumulation, so y differs from the reference
    (computed in fp32, then rounded) by about one rounding of y's dtype; float64 runs as float32."""
    x, w, bias = problem(4, 32, True, 5, dtype=dtype)
    x, bias = x.to(DEVICE), bias.to(dtype).to(DEVICE)
    y = packed_gemm_triton(*args(x, w, bias))
    ref = packed_matmul_torch(x, w, bias)
    assert y.dtype == dtype
    eps = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float64: 1e-6}[dtype]
    torch.testing.assert_close(y.double(), ref.double(), rtol=eps, atol=eps * ref.abs().max().item())


def test_triton_rejects_bad_arguments():
    x, w, bias = problem(4, 32, False, 2)
    a = args(x, w, bias)
    with pytest.raises(ValueError, match="bits"):
        packed_gemm_triton(*a[:6], 5, a[7])
    with pytest.raises(ValueError, match="qweight"):
        packed_gemm_triton(x[:, :100], *a[1:])
    with pytest.raises(ValueError, match="multiple of 16"):
        packed_gemm_triton(*a[:7], 24)
    with pytest.raises(ValueError, match="perm"):
        packed_gemm_triton(*a[:4], torch.arange(IN), *a[5:])
    with pytest.raises(ValueError, match="bias"):
        packed_gemm_triton(*a[:5], bias[:3], *a[6:])


# --- the CUDA GEMV: compiles here, runs on a GPU ------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def builds(tmp_path_factory):
    """Starts the compiles (nvcc for each arch, g++ for the emulation) as the module starts, so that they overlap
    the interpreter tests: {name: (process, output path)}."""
    folder = tmp_path_factory.mktemp("packed_gemv")
    commands = {}
    if NVCC is not None:
        for arch in ARCHS:
            obj = folder / f"packed_gemv_sm{arch}.o"
            commands[arch] = ([NVCC, "-c", "-std=c++17", "-O3", "-I", str(CSRC / "include"), "-Werror", "all-warnings",
                               "-gencode", f"arch=compute_{arch},code=sm_{arch}",
                               str(CSRC / "cuda" / "packed_gemv.cu"), "-o", str(obj)], obj)
    if GXX is not None:
        commands["emulation"] = (emulation_command(folder), folder / "gemv_emulated")
    started = {name: (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), path)
               for name, (cmd, path) in commands.items()}
    yield started
    for process, _ in started.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def finished(builds, name):
    """The output of a started build, once it succeeded."""
    if name not in builds:
        pytest.skip(f"no compiler for {name}")
    process, path = builds[name]
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert path.stat().st_size > 0
    return path


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ARCHS)
def test_gemv_compiles_without_warnings(builds, arch):
    finished(builds, arch)


# Reads lines "bits hex" (one tile of 8·bits bytes) and prints its 64 codes as boa::unpack_quad gives them, after
# checking each against boa::unpack_code; checks boa::centred_code exhaustively (codes and zeros < 256) against
# code − zero and, times a scale, against boa::dequant_code. Exit status: the number of mismatches (capped).
PACKED_MATH_PROGRAM = r"""
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "boa/packed_math.h"

int main() {
  int failures = 0;
  for (uint32_t code = 0; code < 256; ++code)
    for (int z = 0; z < 256; ++z) {
      const float centred = boa::centred_code(code, boa::biased_zero(static_cast<float>(z)));
      const float scale = 0.0173f * static_cast<float>(1 + z % 7);
      failures += centred != static_cast<float>(static_cast<int>(code) - z);
      failures += centred * scale != boa::dequant_code(code, scale, static_cast<float>(z));
    }
  int bits;
  char hex[160];
  while (std::scanf("%d %159s", &bits, hex) == 2) {
    uint8_t tile[64];
    for (int k = 0; k < 8 * bits; ++k) {
      unsigned v;
      std::sscanf(hex + 2 * k, "%2x", &v);
      tile[k] = static_cast<uint8_t>(v);
    }
    uint32_t words[16];
    std::memcpy(words, tile, 8 * bits);
    for (int q = 0; q < 16; ++q) {
      uint32_t codes[4];
      boa::unpack_quad(words, bits, q, codes);
      for (int j = 0; j < 4; ++j) {
        failures += codes[j] != boa::unpack_code(tile, bits, 4 * q + j);
        std::printf("%u ", codes[j]);
      }
    }
    std::printf("\n");
  }
  return failures > 100 ? 100 : failures;
}
"""


@pytest.fixture(scope="module")
def packed_math_exe(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ is not on PATH")
    folder = tmp_path_factory.mktemp("packed_math")
    exe, source = folder / "packed_math", folder / "packed_math.cpp"
    source.write_text(PACKED_MATH_PROGRAM)
    out = subprocess.run([GXX, *CPU_FLAGS, "-Wall", "-Wextra", "-Werror", "-I", str(CSRC / "include"), str(source),
                          "-o", str(exe)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return exe


def test_vectorised_unpacking_equals_the_layout(packed_math_exe):
    """unpack_quad (the CUDA GEMV's unpacking of a tile held as 32-bit words) gives the codes that torch's pack_codes
    packed, for every width, and centred_code is exact."""
    g = torch.Generator().manual_seed(0)
    lines, expected = [], []
    for bits in BITS:
        codes = torch.randint(0, 2**bits, (1, 64 * 40), generator=g).to(torch.uint8)
        codes[0, :64] = 2**bits - 1  # a tile of all ones, then random tiles
        tiles = pack_codes(codes, bits).view(-1, 8 * bits)
        lines += [f"{bits} {bytes(t.tolist()).hex()}" for t in tiles]
        expected.append(codes.view(-1, 64))
    out = subprocess.run([str(packed_math_exe)], input="\n".join(lines) + "\n", capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, f"{out.returncode} mismatches"
    got = torch.tensor([[int(v) for v in line.split()] for line in out.stdout.splitlines()], dtype=torch.uint8)
    assert torch.equal(got, torch.cat(expected))


# --- the CUDA GEMV's kernel source, run on the CPU -----------------------------------------------------------------
# The kernel and its launcher as written, compiled by g++ against a shim of what they use from CUDA: a block is 256
# std::threads, __syncthreads and the warp shuffles are barriers, __ldg a load, 16-bit floats converted in software;
# the launch runs the blocks one after the other on an emulated GPU (EMU_SMS SMs of EMU_SMEM bytes of shared memory,
# EMU_BLOCKS resident blocks each). Shared memory starts as garbage, so that a read of something never staged shows.
# This checks the thread mapping: staging, layout, tile loop, chunks, persistent passes, reductions, stores. It does
# not check timing, coalescing or the GPU's memory model (a race may go unseen).
EMULATION_SHIM = r"""
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct uint2 { uint32_t x, y; };
struct uint4 { uint32_t x, y, z, w; };
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
using cudaError_t = int;
using cudaStream_t = void*;
constexpr int cudaSuccess = 0, cudaErrorInvalidValue = 1;
enum { cudaDevAttrMultiProcessorCount, cudaDevAttrMaxSharedMemoryPerBlockOptin,
       cudaDevAttrMaxSharedMemoryPerMultiprocessor, cudaFuncAttributeMaxDynamicSharedMemorySize };

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 gridDim;
inline thread_local unsigned char* emu_smem;
inline std::barrier<>* emu_block_barrier;
inline std::barrier<>* emu_warp_barrier[32];
inline float emu_warp_values[32][32];

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int offset) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  emu_warp_values[warp][lane] = v;
  emu_warp_barrier[warp]->arrive_and_wait();
  const float other = emu_warp_values[warp][lane ^ offset];
  emu_warp_barrier[warp]->arrive_and_wait();
  return other;
}
template <class T> T __ldg(const T* p) { return *p; }
inline float __uint_as_float(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

struct emu_half { uint16_t bits; };
inline emu_half __ushort_as_half(uint16_t b) { return {b}; }
inline uint16_t __half_as_ushort(emu_half h) { return h.bits; }
inline float __half2float(emu_half h) {
  const int e = (h.bits >> 10) & 31, m = h.bits & 1023;
  const float a = e == 31 ? (m ? NAN : INFINITY)
                : e == 0 ? std::ldexp(float(m), -24) : std::ldexp(float(1024 + m), e - 25);
  return h.bits >> 15 ? -a : a;
}
inline emu_half __float2half_rn(float v) {  // round to nearest even
  const uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  const float a = std::fabs(v);
  if (std::isnan(v)) return {0x7E00};
  if (a >= 65520.f) return {uint16_t(sign | 0x7C00)};
  if (a < std::ldexp(1.f, -14)) return {uint16_t(sign | int(std::nearbyint(std::ldexp(a, 24))))};
  int e;
  std::frexp(a, &e);
  int m = int(std::nearbyint(std::ldexp(a, 11 - e)));
  if (m == 2048) { m = 1024; ++e; }
  return {uint16_t(sign | ((e + 14) << 10) | (m - 1024))};
}
struct emu_bf16 { uint16_t bits; };
inline emu_bf16 __float2bfloat16_rn(float v) {
  const uint32_t u = __float_as_uint(v);
  return {uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}
inline uint16_t __bfloat16_as_ushort(emu_bf16 h) { return h.bits; }

inline int emu_env(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : fallback;
}
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, int attr, int) {
  *v = attr == cudaDevAttrMultiProcessorCount ? emu_env("EMU_SMS", 4) : emu_env("EMU_SMEM", 65536);
  return cudaSuccess;
}
template <class K> cudaError_t cudaFuncSetAttribute(K, int, int) { return cudaSuccess; }
template <class K> cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int, size_t) {
  *n = emu_env("EMU_BLOCKS", 2);
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

template <class K, class A>
void emu_launch(K kernel, dim3 grid, int threads, size_t shared, const A& a) {
  std::fprintf(stderr, "tpr=%d chunks=%d passes=%lld grid=%u\n", a.tpr, a.n_chunks, (long long)a.passes, grid.x);
  if (shared > size_t(emu_env("EMU_SMEM", 65536)) || threads % 32) std::abort();
  gridDim = grid;
  std::vector<unsigned char> smem(shared);
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::memset(smem.data(), 0xFF, shared);  // NaN as float32, fp16 and bf16
      std::barrier<> block(threads);
      std::vector<std::unique_ptr<std::barrier<>>> warps;
      for (int w = 0; w < threads / 32; ++w) {
        warps.emplace_back(new std::barrier<>(32));
        emu_warp_barrier[w] = warps.back().get();
      }
      emu_block_barrier = &block;
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
          threadIdx = dim3(t);
          blockIdx = dim3(bx, by);
          emu_smem = smem.data();
          kernel(a);
        });
      for (auto& thread : pool) thread.join();
    }
}
"""

# Reads a problem (10 int64: batch in out groups group_size bits x_kind has_perm bias_kind row_bytes, then x,
# qweight, scales, zeros, perm, bias as raw bytes) from argv[1]; writes y's raw bytes to argv[2].
EMULATION_DRIVER = r"""
#include "packed_gemv_emulated.inc"

int main(int, char** argv) {
  FILE* f = std::fopen(argv[1], "rb");
  int64_t h[10];
  if (std::fread(h, 8, 10, f) != 10) return 2;
  const int64_t batch = h[0], in = h[1], out = h[2], groups = h[3], bias_kind = h[8];
  const size_t x_size = h[6] == 0 ? 4 : 2;
  auto read = [&](size_t n) {
    std::vector<unsigned char> v(n + 16);
    if (n && std::fread(v.data(), 1, n, f) != n) std::abort();
    return v;
  };
  auto x = read(batch * in * x_size), qweight = read(out * h[9]), scales = read(out * groups * 4);
  auto zeros = read(out * groups), perm = read(h[7] ? in * 4 : 0);
  auto bias = read(bias_kind == 0 ? 0 : bias_kind == 1 ? out * 4 : out * x_size);
  std::vector<unsigned char> y(batch * out * x_size + 1);
  const int err = boa::launch_packed_gemv(
      x.data(), int(h[6]), qweight.data(), reinterpret_cast<const float*>(scales.data()), zeros.data(),
      h[7] ? reinterpret_cast<const int32_t*>(perm.data()) : nullptr, bias_kind ? bias.data() : nullptr,
      bias_kind == 1, y.data(), batch, in, out, groups, h[4], int(h[5]), nullptr);
  if (err) return 3;
  FILE* o = std::fopen(argv[2], "wb");
  std::fwrite(y.data(), 1, batch * out * x_size, o);
  return std::fclose(o);
}
"""

EMULATION_EDITS = [  # (text of packed_gemv.cu, its stand-in on the CPU)
    ("#include <cuda_runtime.h>\n", ""),
    ("#include <cuda_bf16.h>\n", ""),
    ("#include <cuda_fp16.h>\n", ""),
    ("extern __shared__ __align__(16) unsigned char smem[];", "unsigned char* smem = emu_smem;"),
    ("kernel<<<grid, kThreads, shared, stream>>>(a);", "(void)stream; emu_launch(kernel, grid, kThreads, shared, a);"),
]


def emulation_command(folder):
    """Writes the emulation's sources into folder; the g++ command that builds folder/gemv_emulated."""
    source = (CSRC / "cuda" / "packed_gemv.cu").read_text()
    for text, stand_in in EMULATION_EDITS:
        assert text in source, f"packed_gemv.cu no longer holds {text!r}: update EMULATION_EDITS"
        source = source.replace(text, stand_in)
    (folder / "emulation_shim.h").write_text(EMULATION_SHIM)
    (folder / "packed_gemv_emulated.inc").write_text('#include "emulation_shim.h"\n' + source)
    (folder / "driver.cpp").write_text(EMULATION_DRIVER)
    return [GXX, "-std=c++20", "-O1", "-pthread", "-I", str(CSRC / "include"), str(folder / "driver.cpp"),
            "-o", str(folder / "gemv_emulated")]


X_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
SMALL_GPU = {}  # the shim's default: 4 SMs of 64 KiB, 2 blocks each
H100 = {"EMU_SMS": "132", "EMU_BLOCKS": "4", "EMU_SMEM": "233472"}
ONE_SM = {"EMU_SMS": "1", "EMU_BLOCKS": "1"}


def raw(t):
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


@pytest.mark.parametrize("bits, group, act, batch, n, out, dtype, bias_kind, device, path", [
    (2, 16, True, 1, IN, OUT, torch.float32, 1, SMALL_GPU, "tpr=32 chunks=1 passes=5 grid=5"),
    (3, None, False, 3, IN, OUT, torch.float32, 0, SMALL_GPU, "tpr=32 chunks=1"),
    (4, 32, True, 17, IN, OUT, torch.float32, 1, SMALL_GPU, "tpr=32 chunks=1"),  # 8 + 8 + 1 over grid.y
    (8, 128, False, 8, IN, OUT, torch.float32, 1, SMALL_GPU, "tpr=32 chunks=1"),
    (4, 64, True, 8, 1216, 40, torch.float32, 1, SMALL_GPU, "tpr=32 chunks=3"),  # x over the shared budget
    (8, 32, True, 2, 520, 300, torch.float32, 1, ONE_SM, "tpr=32 chunks=1 passes=19 grid=1"),  # persistent
    (4, 128, True, 1, 4096, 24, torch.float16, 2, H100, "tpr=64 chunks=1"),  # few rows: threads over K
    (8, 64, False, 8, 9000, 7, torch.bfloat16, 1, H100, "tpr=128 chunks=2"),
    (3, 32, True, 1, 16448, 10, torch.float16, 2, H100, "tpr=256 chunks=1"),
    (2, 32, False, 2, 40000, 21, torch.float32, 1, H100, "tpr=256 chunks=3"),
    (4, None, False, 1, 1, 5, torch.float32, 1, SMALL_GPU, "tpr=32 chunks=1"),  # one column
])
def test_emulated_gemv_matches_torch(builds, tmp_path, bits, group, act, batch, n, out, dtype, bias_kind, device,
                                     path):
    exe = finished(builds, "emulation")
    x, w, bias = problem(bits, group, act, batch, dtype=dtype, n=n, out=out)
    bias = [None, bias, bias.to(dtype)][bias_kind]
    groups = w.scales.shape[1]
    header = struct.pack("<10q", batch, n, out, groups, -(-n // 64) * 64 if groups == 1 else w.group_size, bits,
                         X_KIND[dtype], w.perm is not None, bias_kind, w.qweight.shape[1])
    tensors = [x, w.qweight, w.scales, w.zeros] + [t for t in (w.perm, bias) if t is not None]
    (tmp_path / "problem").write_bytes(header + b"".join(raw(t) for t in tensors))
    ran = subprocess.run([str(exe), str(tmp_path / "problem"), str(tmp_path / "y")], capture_output=True, text=True,
                         timeout=120, env={**os.environ, **device})
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr.startswith(path)  # the launcher took the path the case is for
    y = torch.frombuffer(bytearray((tmp_path / "y").read_bytes()), dtype=torch.int16 if dtype == torch.bfloat16
                         else dtype).view(batch, out)
    y = y.view(torch.bfloat16) if dtype == torch.bfloat16 else y
    ref = packed_matmul_torch(x, w, bias)
    if dtype == torch.float32:
        assert_close_fp32(y, ref)
    else:  # y and the reference both round the same fp32 sum, up to its summation order: one ulp apart at most
        eps = {torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
        torch.testing.assert_close(y.double(), ref.double(), rtol=eps, atol=eps * ref.abs().max().item())


def cuda_gemv():
    kernels = load_cuda()
    assert kernels is not None, "the CUDA extension did not build (see the boa_kernels notice on stderr)"
    return kernels.packed_gemv


@needs_gpu
@pytest.mark.parametrize("bits, group, act", CASES)
def test_cuda_gemv_matches_torch_in_fp32(bits, group, act):
    for batch in (1, 2, 3, 5, 8, 17):  # every batch template (1, 2, 4, 8) and one beyond, over two grid rows
        x, w, bias = problem(bits, group, act, batch)
        x = x.cuda()
        for b in (bias, None):
            y = cuda_gemv()(*args(x, w, b))
            assert y.dtype == torch.float32 and y.shape == (batch, OUT)
            assert_close_fp32(y, packed_matmul_torch(x, w, None if b is None else b.cuda()))


@needs_gpu
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, "x", torch.float64])
def test_cuda_gemv_dtypes(x_dtype, bias_dtype):
    """16-bit x stays 16-bit in shared memory and y is rounded once from fp32; float64 runs as float32."""
    x, w, bias = problem(3, 32, True, 4, dtype=x_dtype)
    bias = None if bias_dtype is None else bias.to(x_dtype if bias_dtype == "x" else bias_dtype).cuda()
    x = x.cuda()
    y = cuda_gemv()(*args(x, w, bias))
    ref = packed_matmul_torch(x, w, bias)
    assert y.dtype == x_dtype
    eps = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float64: 1e-6}[x_dtype]
    torch.testing.assert_close(y.double(), ref.double(), rtol=eps, atol=eps * ref.abs().max().item())


@needs_gpu
@pytest.mark.parametrize("batch, n, out, bits, group, dtype", [
    (1, 4096, 4096, 4, 128, torch.float16),  # a decoding step: many passes over persistent blocks
    (8, 14336, 512, 4, 128, torch.float32),  # x (8 × 14336 fp32) over the shared budget: chunks of tiles
    (3, 11008, 96, 2, 64, torch.bfloat16),   # few rows: threads spread over K (up to 256 per row)
    (2, 4160, 1000, 3, 32, torch.float32),   # 65 tiles: a partial round of tiles per thread
])
def test_cuda_gemv_large(batch, n, out, bits, group, dtype):
    x, w, bias = problem(bits, group, True, batch, dtype=dtype, n=n, out=out)
    x = x.cuda()
    y = cuda_gemv()(*args(x, w, bias))
    ref = packed_matmul_torch(x.float(), w, bias.cuda())
    eps = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(y.float(), ref, rtol=eps, atol=eps * ref.abs().max().item())


@needs_gpu
def test_cuda_gemv_misaligned_qweight_and_empty_batch():
    x, w, bias = problem(4, 32, False, 2)
    storage = torch.zeros(w.qweight.numel() + 1, dtype=torch.uint8, device="cuda")
    shifted = storage[1:].view_as(w.qweight)  # contiguous, 1 byte off 16-byte alignment
    shifted.copy_(w.qweight)
    a = list(args(x.cuda(), w, bias))
    a[1] = shifted
    assert_close_fp32(cuda_gemv()(*a), packed_matmul_torch(x.cuda(), w, bias.cuda()))
    a[0] = x[:0].cuda()
    assert cuda_gemv()(*a).shape == (0, OUT)


@needs_gpu
def test_cuda_gemv_rejects_bad_arguments():
    x, w, bias = problem(4, 32, True, 2)
    a = args(x.cuda(), w, bias)
    gemv = cuda_gemv()
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        gemv(x, *a[1:])
    with pytest.raises(RuntimeError, match="device"):
        gemv(a[0], w.qweight, *a[2:])
    with pytest.raises(RuntimeError, match="bits"):
        gemv(*a[:6], 5, a[7])
    with pytest.raises(RuntimeError, match="packed columns"):
        gemv(a[0][:, :100], *a[1:])
    with pytest.raises(RuntimeError, match="multiple of 16"):
        gemv(*a[:7], 24)
    with pytest.raises(RuntimeError, match="perm"):
        gemv(*a[:4], a[4].long(), *a[5:])
    with pytest.raises(RuntimeError, match="bias"):
        gemv(*a[:5], a[5][:3], *a[6:])
