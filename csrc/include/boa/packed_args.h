// Argument checks of the packed matmuls, shared by their CPU (csrc/cpu/packed_matmul.cpp, int8_matmul.cpp) and CUDA
// (csrc/cuda/bindings.cpp) bindings: the layout contract of boa/core/packed.py, with errors naming the fix.
// group_multiple: the group sizes a kernel takes (16: a register of float codes never straddles two groups; 4: the int8
// kernel sums whole quads of 4 columns per int32 lane).
#pragma once

#include <torch/extension.h>

namespace boa {

struct PackedSizes {
  int64_t batch, in, in_pad, out, groups;
};

inline PackedSizes check_packed_args(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                                     const torch::Tensor& zeros, const c10::optional<torch::Tensor>& perm,
                                     const c10::optional<torch::Tensor>& bias, int64_t bits, int64_t group_size,
                                     int64_t group_multiple = 16) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "packed weights have 2, 3, 4 or 8 bits, not ", bits);
  TORCH_CHECK(x.dim() == 2 && x.is_floating_point(), "x must be a 2-D float tensor (batch, in); flatten it first");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == torch::kUInt8 && qweight.is_contiguous(),
              "qweight must be contiguous uint8 (out, in_pad·bits/8)");
  const int64_t out = qweight.size(0), in = x.size(1);
  const int64_t in_pad = (in + 63) / 64 * 64;
  TORCH_CHECK(qweight.size(1) * 8 == in_pad * bits, "qweight holds ", qweight.size(1) * 8 / bits,
              " packed columns but x has ", in, " (padded to ", in_pad, ")");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && zeros.scalar_type() == torch::kUInt8 &&
                  scales.is_contiguous() && zeros.is_contiguous() && scales.dim() == 2 &&
                  scales.sizes() == zeros.sizes() && scales.size(0) == out,
              "scales (float32) and zeros (uint8) must be contiguous (out, groups)");
  const int64_t groups = scales.size(1);
  TORCH_CHECK((group_size > 0 && group_size % group_multiple == 0) || groups == 1,
              "this packed kernel needs groups of a multiple of ", group_multiple, " columns (or per-channel grids)");
  TORCH_CHECK(((groups - 1) * group_size < in && groups * group_size >= in) || groups == 1,
              groups, " groups of ", group_size, " columns do not cover ", in, " input columns");
  for (const auto& t : {qweight, scales, zeros})
    TORCH_CHECK(t.device() == x.device(), "all tensors must be on x's device");
  if (perm)
    TORCH_CHECK(perm->scalar_type() == torch::kInt32 && perm->numel() == in && perm->is_contiguous() &&
                    perm->device() == x.device(),
                "perm must be a contiguous int32 tensor of in entries on x's device");
  if (bias)
    TORCH_CHECK(bias->numel() == out && bias->device() == x.device(), "bias must hold out entries on x's device");
  return {x.size(0), in, in_pad, out, groups};
}

}  // namespace boa
