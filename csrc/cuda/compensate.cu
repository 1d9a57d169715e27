// Fused column pass of the OBS solver on the GPU: quantize, error, rank-1 update, for a run of columns of one block.
// The op, its contract and its CPU twin are csrc/cpu/compensate.cpp; this file holds only the kernel and a launcher
// with a plain C++ interface (no torch headers, so that `nvcc -c` of it is quick); csrc/cuda/bindings.cpp checks the
// tensors and calls it.
//
// Sizes and layout (all contiguous, row-major, float32 or float64, device pointers):
//   W, E, C        (b, R, B)   = rows × B with rows = b·R: the block's weights (updated in place), errors and codes
//   U              (1|b, B, B) the block's diagonal block of U = chol(H⁻¹) (upper), shared or one per batch entry
//   scale, zero    (b, R, G)   grids; group_of (B,) int64 names the grid of each block column, each in [0, G)
// Columns start..stop−1 are processed in order; each one's rank-1 update reaches every later column of the block
// (k ≥ j, as the torch reference `boa_kernels.compensate.compensate_block_torch` does).
//
// Thread mapping: rows are independent, so one warp owns one row and a thread block holds up to 8 rows. The warp
// stages its row of W in shared memory, then walks the columns: every lane reads w[j] and computes the same code and
// error (a broadcast, no shuffle), lane 0 stores them, and the lanes stride over k ≥ j for the update with U's row j,
// which all rows of the batch entry read, so it is served from L1/L2. Warps never share data: __syncwarp suffices.
#include <cassert>
#include <cstdint>

#include <cuda_runtime.h>

#include "boa/quant_math.h"

namespace boa {

namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxRowsPerBlock = 8;
// The dynamic shared memory every GPU grants without opting in; a row wider than this works in global memory.
constexpr size_t kSharedBytes = 48 * 1024;

template <typename T>
__global__ void compensate_rows_kernel(T* __restrict__ W, T* __restrict__ E, T* __restrict__ C,
                                       const T* __restrict__ U, const T* __restrict__ scale,
                                       const T* __restrict__ zero, const int64_t* __restrict__ group_of,
                                       int64_t rows, int64_t rows_per_matrix, int64_t B, int64_t G, bool shared_U,
                                       T maxq, int64_t start, int64_t stop, bool row_in_shared) {
  extern __shared__ __align__(16) unsigned char tile_bytes[];
  const int lane = threadIdx.x;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (r >= rows) return;  // the whole warp leaves together: no __syncwarp is left waiting

  const CompensationRow<T> row(W, E, C, U, scale, zero, r, rows_per_matrix, B, G, shared_U);
  T* w = row_in_shared ? reinterpret_cast<T*>(tile_bytes) + threadIdx.y * B : row.w;
  if (row_in_shared) {
    for (int64_t k = lane; k < B; k += kWarpSize) w[k] = row.w[k];
    __syncwarp();
  }

  for (int64_t j = start; j < stop; ++j) {
    const int64_t g = group_of[j];
    assert(0 <= g && g < G);  // not checked on the host: that would cost a device sync per call
    T code;
    const T e = row.quantize_column(w[j], j, g, maxq, &code);
    if (lane == 0) {
      row.c[j] = code;
      row.e[j] = e;
    }
    __syncwarp();  // every lane has read w[j] before the update below rewrites it
    const T* u_j = row.u_row(j);
    for (int64_t k = j + lane; k < B; k += kWarpSize) w[k] = compensate(w[k], e, u_j[k]);
    __syncwarp();  // column j+1 is read only once its update has landed
  }

  if (row_in_shared)
    for (int64_t k = lane; k < B; k += kWarpSize) row.w[k] = w[k];
}

}  // namespace

// Runs columns start..stop−1 on `stream`; returns the launch's error (cudaSuccess when there is nothing to do).
template <typename T>
cudaError_t launch_compensate_block(T* W, T* E, T* C, const T* U, const T* scale, const T* zero,
                                    const int64_t* group_of, int64_t rows, int64_t rows_per_matrix, int64_t B,
                                    int64_t G, bool shared_U, T maxq, int64_t start, int64_t stop,
                                    cudaStream_t stream) {
  if (rows == 0 || start >= stop) return cudaSuccess;
  const size_t row_bytes = static_cast<size_t>(B) * sizeof(T);
  const int rows_fitting = static_cast<int>(kSharedBytes / row_bytes);
  const bool row_in_shared = rows_fitting > 0;
  const int rows_per_block = row_in_shared ? (rows_fitting < kMaxRowsPerBlock ? rows_fitting : kMaxRowsPerBlock)
                                           : kMaxRowsPerBlock;
  const dim3 threads(kWarpSize, rows_per_block);
  const dim3 blocks(static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block));
  const size_t shared_bytes = row_in_shared ? rows_per_block * row_bytes : 0;
  compensate_rows_kernel<T><<<blocks, threads, shared_bytes, stream>>>(
      W, E, C, U, scale, zero, group_of, rows, rows_per_matrix, B, G, shared_U, maxq, start, stop, row_in_shared);
  return cudaGetLastError();
}

template cudaError_t launch_compensate_block<float>(float*, float*, float*, const float*, const float*,
                                                    const float*, const int64_t*, int64_t, int64_t, int64_t,
                                                    int64_t, bool, float, int64_t, int64_t, cudaStream_t);
template cudaError_t launch_compensate_block<double>(double*, double*, double*, const double*, const double*,
                                                     const double*, const int64_t*, int64_t, int64_t, int64_t,
                                                     int64_t, bool, double, int64_t, int64_t, cudaStream_t);

}  // namespace boa
