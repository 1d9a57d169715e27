// Fused column pass of the OBS solver on the CPU: quantize, error, rank-1 update, for a run of columns of one block.
//
// Sizes and layout (all contiguous, row-major, float32 or float64):
//   W1, E1, codes  (b, R, B)   the block's weights (updated in place), errors and integer codes (written for the run)
//   U1             (1|b, B, B) the block's diagonal block of U = chol(H⁻¹) (upper), shared or one per batch entry
//   scale, zero    (b, R, G)   grids; group_of (B,) int64 names the grid of each block column
// Columns start..stop−1 are processed in order; each one's rank-1 update reaches every later column of the block
// (k ≥ j, as the torch reference `boa_kernels.compensate.compensate_block_torch` does). Rows are independent, so
// rows are spread over threads; within a row the update loop runs over contiguous memory and vectorises.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "boa/compensate_args.h"
#include "boa/quant_math.h"
#include "ops.h"

namespace {

template <typename T>
void compensate_rows(T* W, T* E, T* C, const T* U, const T* scale, const T* zero, const int64_t* group_of,
                     int64_t rows, int64_t rows_per_matrix, int64_t B, int64_t G, bool shared_U, T maxq,
                     int64_t start, int64_t stop) {
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const boa::CompensationRow<T> row(W, E, C, U, scale, zero, r, rows_per_matrix, B, G, shared_U);
      T* w = row.w;
      for (int64_t j = start; j < stop; ++j) {
        T code;
        const T e = row.quantize_column(w[j], j, group_of[j], maxq, &code);
        row.c[j] = code;
        row.e[j] = e;
        const T* u_j = row.u_row(j);
        for (int64_t k = j; k < B; ++k) w[k] = boa::compensate(w[k], e, u_j[k]);
      }
    }
  });
}

}  // namespace

void boa::compensate_block_(torch::Tensor W1, torch::Tensor E1, torch::Tensor codes, torch::Tensor U1,
                            torch::Tensor scale, torch::Tensor zero, torch::Tensor group_of, double maxq,
                            int64_t start, int64_t stop) {
  const boa::CompensateSizes n = boa::check_compensate_args(W1, E1, codes, U1, scale, zero, group_of, start, stop);
  const int64_t* groups = group_of.data_ptr<int64_t>();
  for (int64_t j = start; j < stop; ++j) TORCH_CHECK(0 <= groups[j] && groups[j] < n.G, "group_of out of range");
  AT_DISPATCH_FLOATING_TYPES(W1.scalar_type(), "compensate_block_", [&] {
    compensate_rows<scalar_t>(W1.data_ptr<scalar_t>(), E1.data_ptr<scalar_t>(), codes.data_ptr<scalar_t>(),
                              U1.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(), zero.data_ptr<scalar_t>(),
                              groups, n.b * n.R, n.R, n.B, n.G, U1.size(0) == 1, static_cast<scalar_t>(maxq),
                              start, stop);
  });
}
