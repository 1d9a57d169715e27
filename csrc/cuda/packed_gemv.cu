// Packed low-bit GEMV on the GPU, for decoding (batch 1–8): y = x · Wᵀ (+ bias) with W in boa's packed layout.
// The op, its contract and its CPU twin are csrc/cpu/packed_matmul.cpp; this file holds only the kernel and a launcher
// with a plain C++ interface (no torch headers, so that `nvcc -c` of it is quick); csrc/cuda/bindings.cpp checks the
// tensors and calls it.
//
// Sizes and layout (device pointers, contiguous, row-major; boa/core/packed.py):
//   x        (batch, in)              float32, float16 or bfloat16 (`x_kind`); y (batch, out) in the same type
//   qweight  uint8 (out, in_pad·b/8)  a row = in_pad / 64 tiles of 8·b bytes (bit planes, boa/packed_math.h)
//   scales   float32 (out, G), zeros uint8 (out, G); packed column j is in group min(j / group_size, G − 1)
//   perm     int32 (in,) or null: packed column j multiplies x[:, perm[j]]; bias (out,) float32 or x's type, or null
// Math: per run of 16 packed columns (one group: group sizes are multiples of 16), per row and batch row,
//   part = Σ (code − zero) · x  (code − zero exact, boa::centred_code), then acc += scale · part; fp32 throughout.
//
// Thread mapping. A block is 256 threads, split into row groups of `tpr` threads (32–256, whole warps). A thread
// owns kRows = 2 rows of its row group and the tiles λ, λ + tpr, … of those rows (λ = its index in the group): it
// loads a whole tile of each row at once (16-byte loads; 8-byte for 3 bits, whose 24-byte tiles are 8-byte aligned),
// unpacks the 64 codes with constant shifts (boa::unpack_quad) and multiplies every code into all NB batch rows, so
// one unpacked code serves NB products and one x value read serves kRows rows. Lanes then reduce by warp shuffles,
// warps of one row group through shared memory. Blocks are persistent: grid = min(row passes, blocks resident on the
// GPU), each block walks passes of (256 / tpr)·kRows rows, so x is staged once per block, not once per row; a
// thread issues its first tiles' loads before the staging, so that they fly while x is gathered.
// x in shared memory: gathered by perm, zero-padded to in_pad, in x's own type (16-bit inputs stay 16-bit), laid out
// [batch row][q][tile][4] for the 4 consecutive columns 4q … 4q+3 of each tile (q < 16), one q-row padded to
// 32·k + 4 elements: a warp reading one q for 32 consecutive tiles reads consecutive 16-byte (8-byte) chunks, and the
// staging stores (32 consecutive columns of one tile) hit distinct banks. If NB·in_pad does not fit (about 110 KiB
// on an H100, keeping two blocks per SM), in is walked in chunks of tiles, restaged for every pass.
// Batch: NB ∈ {1, 2, 4, 8} rows a block (batch 3 runs as 4, 5–7 as 8, the missing rows staged as zeros); batches
// above 8 run as further blocks along grid.y (the op dispatches ≤ 8 here). Threads per row: about 4 tiles each,
// doubled while the row passes are fewer than the blocks the GPU holds.
// Cost per code: ~1.5 integer ops (shift, mask), one FADD (centred_code), NB FMAs. At 4 bits an H100's HBM delivers
// ~30 codes/clock/SM, so batch 1–2 stays memory-bound while batch 8 (~8 FMAs a code) is bound by fp32 FMA at about
// half the bandwidth; tensor cores (mma with the batch padded to 8 or 16) would be the next step there.
#include <cstdint>

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "boa/packed_math.h"

namespace boa {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 2;  // rows per thread: each x value read from shared memory serves kRows rows
constexpr int kQuads = kTile / 4;  // groups of 4 consecutive columns in a tile
// Blocks per SM the register budget is cut for (__launch_bounds__): 64 registers a thread up to 2 batch rows, 80 for
// 4, 128 for 8; one block fewer at 8 bits, whose tiles take 32 registers. nvcc -Xptxas -v (sm_90): no spills but
// 8–12 bytes in six of the 48 kernels.
constexpr int min_blocks(int bits, int nb) { return (nb <= 2 ? 4 : nb <= 4 ? 3 : 2) - (bits == 8 && nb <= 4 ? 1 : 0); }

enum XKind : int { kF32 = 0, kF16 = 1, kBF16 = 2 };  // the x_kind argument of launch_packed_gemv

// x's element type as raw bits (so that the staging copies bits and zero is 0), and its conversions.
template <int KIND>
struct Elem;

template <>
struct Elem<kF32> {
  using Bits = uint32_t;
  static __device__ __forceinline__ float to_float(Bits b) { return __uint_as_float(b); }
  static __device__ __forceinline__ Bits from_float(float v) { return __float_as_uint(v); }
  static __device__ __forceinline__ void load4(const Bits* p, float* v) {
    const uint4 r = *reinterpret_cast<const uint4*>(p);
    v[0] = __uint_as_float(r.x);
    v[1] = __uint_as_float(r.y);
    v[2] = __uint_as_float(r.z);
    v[3] = __uint_as_float(r.w);
  }
};

template <>
struct Elem<kF16> {
  using Bits = uint16_t;
  static __device__ __forceinline__ float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ Bits from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
  static __device__ __forceinline__ void load4(const Bits* p, float* v) {
    const uint2 r = *reinterpret_cast<const uint2*>(p);
    v[0] = to_float(static_cast<Bits>(r.x & 0xFFFFu));
    v[1] = to_float(static_cast<Bits>(r.x >> 16));
    v[2] = to_float(static_cast<Bits>(r.y & 0xFFFFu));
    v[3] = to_float(static_cast<Bits>(r.y >> 16));
  }
};

template <>
struct Elem<kBF16> {
  using Bits = uint16_t;
  static __device__ __forceinline__ float to_float(Bits b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }
  static __device__ __forceinline__ Bits from_float(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
  static __device__ __forceinline__ void load4(const Bits* p, float* v) {  // bf16 → fp32 is a 16-bit shift
    const uint2 r = *reinterpret_cast<const uint2*>(p);
    v[0] = __uint_as_float(r.x << 16);
    v[1] = __uint_as_float(r.x & 0xFFFF0000u);
    v[2] = __uint_as_float(r.y << 16);
    v[3] = __uint_as_float(r.y & 0xFFFF0000u);
  }
};

struct GemvParams {
  const void* x;
  const uint8_t* qweight;
  const float* scales;
  const uint8_t* zeros;
  const int32_t* perm;
  const void* bias;
  void* y;
  int64_t batch, in, out, groups, group_size, row_bytes, passes;
  int tiles, chunk_tiles, n_chunks, tpr;
  bool bias_is_float;
};

// Elements of one q-row of the staged x for a chunk of tc tiles: 4·tc rounded up to 32, plus 4 (bank spreading).
__host__ __device__ __forceinline__ int q_stride(int tc) { return (4 * tc + 31) / 32 * 32 + 4; }

__host__ __device__ constexpr size_t red_bytes(int nb) {
  return (static_cast<size_t>(kWarps) * kRows * nb * sizeof(float) + 15) / 16 * 16;
}

// A tile of one row as its 2·BITS little-endian words (the layout boa::unpack_quad reads).
template <int BITS>
__device__ __forceinline__ void load_tile(const uint8_t* p, uint32_t* w) {
  if constexpr (BITS == 3) {
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p) + k);
      w[2 * k] = v.x;
      w[2 * k + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int k = 0; k < BITS / 2; ++k) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + k);
      w[4 * k] = v.x;
      w[4 * k + 1] = v.y;
      w[4 * k + 2] = v.z;
      w[4 * k + 3] = v.w;
    }
  }
}

// Tiles t0 … t0+tc−1 of x's batch rows b0 … b0+NB−1 into shared memory, gathered by perm; padding and missing batch
// rows are 0. Consecutive threads take consecutive packed columns (coalesced reads of x and perm when perm is null).
template <int KIND, int NB>
__device__ __forceinline__ void stage_x(typename Elem<KIND>::Bits* xs, const GemvParams& a, int64_t b0, int nb,
                                        int t0, int tc) {
  using Bits = typename Elem<KIND>::Bits;
  const Bits* x = static_cast<const Bits*>(a.x);
  const int stride = q_stride(tc), cols = kTile * tc;
#pragma unroll 4
  for (int e = threadIdx.x; e < cols; e += kThreads) {
    const int64_t col = static_cast<int64_t>(t0) * kTile + e;
    const bool real = col < a.in;
    const int64_t src = real ? (a.perm ? static_cast<int64_t>(a.perm[col]) : col) : 0;
    const int slot = ((e & 63) >> 2) * stride + 4 * (e >> 6) + (e & 3);  // [q][tile][j]
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      Bits v = 0;
      if (real && b < nb) v = x[(b0 + b) * a.in + src];
      xs[b * kQuads * stride + slot] = v;
    }
  }
}

template <int KIND, int BITS, int NB>
__global__ void __launch_bounds__(kThreads, min_blocks(BITS, NB)) packed_gemv_kernel(const GemvParams a) {
  using E = Elem<KIND>;
  using Bits = typename E::Bits;
  extern __shared__ __align__(16) unsigned char smem[];
  float* red = reinterpret_cast<float*>(smem);                 // [warp][row][batch row]
  Bits* xs = reinterpret_cast<Bits*>(smem + red_bytes(NB));  // [batch row][q][tile][4]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tpr = a.tpr, rg = tid / tpr, lam = tid % tpr;
  const int rows_per_pass = (kThreads / tpr) * kRows;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * NB;
  const int nb = static_cast<int>(a.batch - b0 < NB ? a.batch - b0 : NB);
  int staged = -1;  // the chunk now in shared memory (uniform over the block)

  for (int64_t pass = blockIdx.x; pass < a.passes; pass += gridDim.x) {
    int64_t row[kRows];
    bool row_ok[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      row[r] = pass * rows_per_pass + rg * kRows + r;
      row_ok[r] = row[r] < a.out;
    }
    float acc[kRows][NB];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int b = 0; b < NB; ++b) acc[r][b] = 0.f;

    for (int c = 0; c < a.n_chunks; ++c) {
      const int t0 = c * a.chunk_tiles;
      const int tc = a.tiles - t0 < a.chunk_tiles ? a.tiles - t0 : a.chunk_tiles;
      uint32_t w[kRows][2 * BITS];
      auto load_rows = [&](int64_t t) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (row_ok[r]) {
            load_tile<BITS>(a.qweight + row[r] * a.row_bytes + t * tile_bytes(BITS), w[r]);
          } else {
#pragma unroll
            for (int k = 0; k < 2 * BITS; ++k) w[r][k] = 0;
          }
        }
      };
      if (lam < tc) load_rows(t0 + lam);  // the first tiles' loads fly while x is staged
      if (c != staged) {
        __syncthreads();  // everyone is done with the chunk staged before
        stage_x<KIND, NB>(xs, a, b0, nb, t0, tc);
        __syncthreads();
        staged = c;
      }
      const int stride = q_stride(tc);

      for (int tl = lam; tl < tc; tl += tpr) {
        const int64_t t = t0 + tl;
        if (tl != lam) load_rows(t);
#pragma unroll
        for (int m = 0; m < 4; ++m) {  // runs of 16 columns, each inside one group
          const int64_t g = group_of_column(t * kTile + 16 * m, a.group_size, a.groups);
          float scale[kRows], zero[kRows];
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            scale[r] = row_ok[r] ? __ldg(a.scales + row[r] * a.groups + g) : 0.f;
            zero[r] = biased_zero(row_ok[r] ? static_cast<float>(__ldg(a.zeros + row[r] * a.groups + g)) : 0.f);
          }
          float part[kRows][NB];
#pragma unroll
          for (int r = 0; r < kRows; ++r)
#pragma unroll
            for (int b = 0; b < NB; ++b) part[r][b] = 0.f;
#pragma unroll
          for (int qq = 0; qq < 4; ++qq) {
            const int q = 4 * m + qq;
            float xv[NB][4];
#pragma unroll
            for (int b = 0; b < NB; ++b) E::load4(xs + (b * kQuads + q) * stride + 4 * tl, xv[b]);
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
              uint32_t code[4];
              unpack_quad(w[r], BITS, q, code);
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                const float centred = centred_code(code[j], zero[r]);
#pragma unroll
                for (int b = 0; b < NB; ++b) part[r][b] = fmaf(centred, xv[b][j], part[r][b]);
              }
            }
          }
#pragma unroll
          for (int r = 0; r < kRows; ++r)
#pragma unroll
            for (int b = 0; b < NB; ++b) acc[r][b] = fmaf(scale[r], part[r][b], acc[r][b]);
        }
      }
    }

    // Lanes → warp sums → the warps of a row group, in shared memory; then one thread per (batch row, row) stores.
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        float v = acc[r][b];
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
        if (lane == 0) red[(warp * kRows + r) * NB + b] = v;
      }
    __syncthreads();
    const int warps_per_group = tpr / 32;
    for (int e = tid; e < rows_per_pass * NB; e += kThreads) {
      const int b = e / rows_per_pass, rr = e % rows_per_pass;  // consecutive threads store consecutive rows
      const int64_t o = pass * rows_per_pass + rr;
      if (b < nb && o < a.out) {
        const int first = (rr / kRows) * warps_per_group, r = rr % kRows;
        float sum = 0.f;
        for (int k = first; k < first + warps_per_group; ++k) sum += red[(k * kRows + r) * NB + b];
        if (a.bias)
          sum += a.bias_is_float ? static_cast<const float*>(a.bias)[o]
                                 : E::to_float(static_cast<const Bits*>(a.bias)[o]);
        static_cast<Bits*>(a.y)[(b0 + b) * a.out + o] = E::from_float(sum);
      }
    }
    __syncthreads();  // red is rewritten by the next pass
  }
}

template <int KIND, int BITS, int NB>
cudaError_t launch(GemvParams a, cudaStream_t stream) {
  using Bits = typename Elem<KIND>::Bits;
  const auto kernel = packed_gemv_kernel<KIND, BITS, NB>;
  int device = 0, sms = 0, optin = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  if (err != cudaSuccess) return err;

  // Chunk of tiles staged at once: as much of x as leaves room for two blocks per SM.
  const size_t reserved = red_bytes(NB);
  size_t budget = static_cast<size_t>(per_sm / 2 - 1024);
  if (budget > static_cast<size_t>(optin)) budget = optin;
  const int64_t per_q = static_cast<int64_t>((budget - reserved) / (NB * kQuads * sizeof(Bits)));
  int64_t chunk = (per_q - 4) / 4 / 8 * 8;  // a multiple of 8 tiles: q_stride(chunk) = 4·chunk + 4 ≤ per_q
  if (chunk < 8) chunk = 8;
  a.chunk_tiles = static_cast<int>(a.tiles < chunk ? (a.tiles > 0 ? a.tiles : 1) : chunk);
  a.n_chunks = (a.tiles + a.chunk_tiles - 1) / a.chunk_tiles;
  const size_t shared = reserved + static_cast<size_t>(NB) * kQuads * q_stride(a.chunk_tiles) * sizeof(Bits);

  if (shared > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    if (err != cudaSuccess) return err;
  }
  int blocks_per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, shared);
  if (err != cudaSuccess) return err;
  if (blocks_per_sm < 1) blocks_per_sm = 1;
  const int64_t resident = static_cast<int64_t>(blocks_per_sm) * sms;

  // Threads per row: about 4 tiles each, more while there are too few row passes to fill the GPU.
  a.tpr = 32;
  while (a.tpr < kThreads && 4 * a.tpr < a.chunk_tiles) a.tpr *= 2;
  auto passes = [&](int tpr) { return (a.out + (kThreads / tpr) * kRows - 1) / ((kThreads / tpr) * kRows); };
  while (a.tpr < kThreads && a.tpr < a.chunk_tiles && passes(a.tpr) < resident) a.tpr *= 2;
  a.passes = passes(a.tpr);

  const dim3 grid(static_cast<unsigned>(a.passes < resident ? a.passes : resident),
                  static_cast<unsigned>((a.batch + NB - 1) / NB));
  kernel<<<grid, kThreads, shared, stream>>>(a);
  return cudaGetLastError();
}

template <int KIND, int BITS>
cudaError_t launch_nb(const GemvParams& a, cudaStream_t stream) {
  if (a.batch <= 1) return launch<KIND, BITS, 1>(a, stream);
  if (a.batch <= 2) return launch<KIND, BITS, 2>(a, stream);
  if (a.batch <= 4) return launch<KIND, BITS, 4>(a, stream);
  return launch<KIND, BITS, 8>(a, stream);
}

template <int KIND>
cudaError_t launch_bits(const GemvParams& a, int bits, cudaStream_t stream) {
  switch (bits) {
    case 2: return launch_nb<KIND, 2>(a, stream);
    case 3: return launch_nb<KIND, 3>(a, stream);
    case 4: return launch_nb<KIND, 4>(a, stream);
    case 8: return launch_nb<KIND, 8>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// y = x · Wᵀ (+ bias) on `stream` (sizes and layout at the top of this file). x_kind: 0 float32, 1 float16,
// 2 bfloat16, for x and y; bias (or null) is float32 when bias_is_float, else x's type. qweight must be 16-byte
// aligned (8-byte for 3 bits). Returns the launch's error (cudaSuccess when there is nothing to do).
cudaError_t launch_packed_gemv(const void* x, int x_kind, const uint8_t* qweight, const float* scales,
                               const uint8_t* zeros, const int32_t* perm, const void* bias, bool bias_is_float,
                               void* y, int64_t batch, int64_t in, int64_t out, int64_t groups, int64_t group_size,
                               int bits, cudaStream_t stream) {
  if (batch <= 0 || out <= 0) return cudaSuccess;
  if (groups < 1 || group_size < 1 || in < 0) return cudaErrorInvalidValue;
  const int64_t in_pad = (in + kTile - 1) / kTile * kTile;
  GemvParams a{};
  a.x = x;
  a.qweight = qweight;
  a.scales = scales;
  a.zeros = zeros;
  a.perm = perm;
  a.bias = bias;
  a.y = y;
  a.batch = batch;
  a.in = in;
  a.out = out;
  a.groups = groups;
  a.group_size = group_size;
  a.row_bytes = in_pad / 8 * bits;
  a.tiles = static_cast<int>(in_pad / kTile);
  a.bias_is_float = bias_is_float;
  switch (x_kind) {
    case kF32: return launch_bits<kF32>(a, bits, stream);
    case kF16: return launch_bits<kF16>(a, bits, stream);
    case kBF16: return launch_bits<kBF16>(a, bits, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace boa
