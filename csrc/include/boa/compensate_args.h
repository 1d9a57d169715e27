// Argument checks of the fused column-compensation op, shared by its CPU (csrc/cpu/compensate.cpp) and CUDA
// (csrc/cuda/bindings.cpp) bindings: the layout contract of boa_kernels/compensate.py, with errors naming the fix.
#pragma once

#include <torch/extension.h>

namespace boa {

struct CompensateSizes {
  int64_t b, R, B, G;
};

inline CompensateSizes check_compensate_args(const torch::Tensor& W1, const torch::Tensor& E1,
                                             const torch::Tensor& codes, const torch::Tensor& U1,
                                             const torch::Tensor& scale, const torch::Tensor& zero,
                                             const torch::Tensor& group_of, int64_t start, int64_t stop) {
  for (const auto& t : {E1, codes, U1, scale, zero, group_of})
    TORCH_CHECK(t.device() == W1.device(), "all tensors must be on W1's device");
  TORCH_CHECK(W1.dim() == 3 && W1.is_contiguous() && E1.is_contiguous() && codes.is_contiguous(),
              "W1, E1, codes must be contiguous (b, R, B)");
  TORCH_CHECK(E1.sizes() == W1.sizes() && codes.sizes() == W1.sizes(), "E1 and codes must be shaped like W1");
  const int64_t b = W1.size(0), R = W1.size(1), B = W1.size(2);
  TORCH_CHECK(U1.dim() == 3 && U1.is_contiguous() && U1.size(1) == B && U1.size(2) == B &&
                  (U1.size(0) == 1 || U1.size(0) == b),
              "U1 must be contiguous (1 or b, B, B)");
  TORCH_CHECK(scale.is_contiguous() && zero.is_contiguous() && scale.dim() == 3 && scale.sizes() == zero.sizes() &&
                  scale.size(0) == b && scale.size(1) == R,
              "scale and zero must be contiguous (b, R, G)");
  TORCH_CHECK(group_of.scalar_type() == torch::kInt64 && group_of.is_contiguous() && group_of.numel() == B,
              "group_of must be a contiguous int64 tensor of B entries");
  TORCH_CHECK(0 <= start && start <= stop && stop <= B, "need 0 <= start <= stop <= B");
  for (const auto& t : {E1, codes, U1, scale, zero})
    TORCH_CHECK(t.scalar_type() == W1.scalar_type(), "all float tensors must share W1's dtype");
  return {b, R, B, scale.size(2)};
}

}  // namespace boa
