// Per-element math of the low-bit activation kernels (csrc/cpu/int8_matmul.cpp; reference and Triton twin in
// boa_kernels/int8_matmul.py, triton_int8_gemm.py), shared with any GPU port so that the CPU build the tests run
// proves the codes. The grid is boa/transforms/activations.py's, per token (row of x), in float32:
//   s = max(amax · f, FLT_MIN), amax = max|x|, f = float32(clip / (2^(b−1) − 1))   torch multiplies a float32 tensor
//                                                                                  by a Python float rounded so
//   a = clamp(round_half_even(x / s), −2^(b−1), 2^(b−1) − 1)                       a division, as torch's
// so the codes equal torch's bit for bit.
#pragma once

#include <cfloat>
#include <cstdint>

#include "boa/host_device.h"
#include "boa/quant_math.h"

namespace boa {

// A group's exact sum Σ (q − z)·a is at most width · 255 · 128 in size, and so are the two sums it is formed from
// (Σ q·a and z·Σ a): int32 holds them for groups of up to 65536 columns.
constexpr int64_t kMaxExactGroup = 65536;

BOA_HD float activation_factor(double clip_ratio, int bits) {
  return static_cast<float>(clip_ratio / static_cast<double>((1 << (bits - 1)) - 1));
}

BOA_HD float activation_scale(float amax, float factor) {
  const float s = amax * factor;
  return s < FLT_MIN ? FLT_MIN : s;
}

BOA_HD int32_t activation_code(float x, float scale, int bits) {
  const float maxq = static_cast<float>((1 << (bits - 1)) - 1);
  const float c = round_half_even(x / scale);
  return static_cast<int32_t>(c < -maxq - 1.f ? -maxq - 1.f : (c > maxq ? maxq : c));
}

}  // namespace boa
