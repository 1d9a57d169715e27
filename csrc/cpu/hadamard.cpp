// The online Hadamard rotation on the CPU: y = (x · diag(signs)) · (K ⊗ S) · scale along the last axis, the math of
// boa.transforms.hadamard.Rotation.apply (K its core, scale 1/√n) in float32; torch reference boa_kernels/hadamard.py.
//
// Sizes: x (rows, n) float32, bfloat16 or float16, n = m · p with p a power of two; signs float32 (n,) or none; core
// K float32 (m, m); y (rows, n) in x's dtype. Per row, viewed as (m, p): the signs, the p-point Walsh–Hadamard
// transform of each of the m blocks (boa/hadamard_math.h: bit-identical to the reference's butterflies, so with
// m = 1 so is y), then y_b = scale · Σ_a K[a, b] · z_a over whole blocks, m² runs of p multiply-adds (the
// reference's einsum sums in another order: for m > 1 the two agree to fp32 rounding, as both do with
// Rotation.apply, whose transform is products with Sylvester factors). Rows are spread over threads
// (at::parallel_for).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "boa/hadamard_math.h"
#include "ops.h"

torch::Tensor boa::hadamard_transform(torch::Tensor x, c10::optional<torch::Tensor> signs, torch::Tensor core,
                                      double scale) {
  TORCH_CHECK(x.dim() == 2 && x.is_floating_point() && x.device().is_cpu(),
              "x must be a 2-D float CPU tensor (rows, n); flatten it first");
  TORCH_CHECK(core.dim() == 2 && core.size(0) == core.size(1) && core.scalar_type() == torch::kFloat32 &&
                  core.device().is_cpu(),
              "core must be a square float32 CPU matrix (m, m)");
  const int64_t rows = x.size(0), n = x.size(1), m = core.size(0);
  TORCH_CHECK(n % m == 0 && boa::is_power_of_two(n / m), "rows of ", n, " columns are not ", m,
              " blocks of a power of two");
  if (signs)
    TORCH_CHECK(signs->scalar_type() == torch::kFloat32 && signs->numel() == n && signs->device().is_cpu(),
                "signs must be a float32 CPU tensor of n entries");
  const auto xf = x.to(torch::kFloat32).contiguous();
  const auto kf = core.contiguous();
  const auto sf = signs ? c10::optional<torch::Tensor>(signs->contiguous()) : c10::nullopt;
  auto y = torch::empty_like(xf);
  const int64_t p = n / m;
  const float s = static_cast<float>(scale);
  const float* src = xf.data_ptr<float>();
  const float* K = kf.data_ptr<float>();
  const float* sign = sf ? sf->data_ptr<float>() : nullptr;
  float* dst = y.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> z(n);
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = src + r * n;
      float* out = dst + r * n;
      for (int64_t j = 0; j < n; ++j) z[j] = sign ? row[j] * sign[j] : row[j];
      for (int64_t a = 0; a < m; ++a) boa::walsh_hadamard(z.data() + a * p, p);
      if (m == 1) {  // Rotation skips the product with a 1 × 1 core
        for (int64_t j = 0; j < n; ++j) out[j] = z[j] * s;
        continue;
      }
      for (int64_t b = 0; b < m; ++b) {
        float* yb = out + b * p;
        std::fill(yb, yb + p, 0.f);
        for (int64_t a = 0; a < m; ++a) {
          const float k = K[a * m + b];
          const float* za = z.data() + a * p;
          for (int64_t i = 0; i < p; ++i) yb[i] += k * za[i];
        }
        for (int64_t i = 0; i < p; ++i) yb[i] *= s;
      }
    }
  });
  return y.to(x.scalar_type());
}
