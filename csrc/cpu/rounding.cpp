// aespa's learned-rounding step on the CPU, fused: the relaxed weights' error E, and (after the caller's GEMM
// G = H_out E H) the gradient with one Adam update, each in one pass over the elements.
//
// Sizes and layout: every tensor contiguous, the same shape (any; typically (heads, d, cols)) and dtype (float32 or
// float64). V, m, v are updated in place. Per-element math: csrc/include/boa/rounding_math.h; torch reference:
// boa_kernels/rounding.py. Elements are independent: chunks over threads, a vectorised loop within each.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>

// glibc's libmvec has vector exp/log; its headers announce them only under -ffast-math, which the other kernels
// must not be built with (bit-identical fp64), so they are declared here: `omp simd` loops then call them.
// Elsewhere (clang, other C libraries) the loops call the scalar functions.
#if defined(__GLIBC__) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
extern "C" {
#pragma omp declare simd notinbranch
float expf(float);
#pragma omp declare simd notinbranch
float logf(float);
#pragma omp declare simd notinbranch
double exp(double);
#pragma omp declare simd notinbranch
double log(double);
}
#endif

#include "boa/rounding_math.h"
#include "ops.h"

namespace {

constexpr int64_t kGrain = 16384;

void check_same(const std::vector<torch::Tensor>& tensors, const char* op) {
  const auto& first = tensors.front();
  TORCH_CHECK(first.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(first.scalar_type() == torch::kFloat || first.scalar_type() == torch::kDouble, op,
              ": float32 or float64 only");
  for (const auto& t : tensors) {
    TORCH_CHECK(t.is_contiguous(), op, ": every tensor must be contiguous");
    TORCH_CHECK(t.sizes() == first.sizes(), op, ": every tensor must have the same shape");
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), op, ": every tensor must have the same dtype");
  }
}

template <typename T>
void error_kernel(const T* V, const T* base, const T* scale, const T* offset, T* E, int64_t n, T maxq) {
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) E[i] = boa::relaxed_error(V[i], base[i], scale[i], offset[i], maxq);
  });
}

template <bool Regularise, typename T>
void step_kernel(T* V, const T* G, const T* base, const T* scale, T* m, T* v, int64_t n, T maxq, T beta,
                 T round_weight, T lr_over_bc1, T beta1, T beta2, T eps, T sqrt_bc2) {
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) {
      const T grad = boa::relaxed_gradient<Regularise>(V[i], base[i], scale[i], G[i], maxq, beta, round_weight);
      V[i] = boa::adam_update(V[i], grad, m[i], v[i], lr_over_bc1, beta1, beta2, eps, sqrt_bc2);
    }
  });
}

}  // namespace

torch::Tensor boa::relaxed_error(torch::Tensor V, torch::Tensor base, torch::Tensor scale, torch::Tensor offset,
                                 double maxq) {
  check_same({V, base, scale, offset}, "relaxed_error");
  auto E = torch::empty_like(V);
  AT_DISPATCH_FLOATING_TYPES(V.scalar_type(), "relaxed_error", [&] {
    error_kernel<scalar_t>(V.data_ptr<scalar_t>(), base.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
                           offset.data_ptr<scalar_t>(), E.data_ptr<scalar_t>(), V.numel(),
                           static_cast<scalar_t>(maxq));
  });
  return E;
}

void boa::rounding_adam_step_(torch::Tensor V, torch::Tensor G, torch::Tensor base, torch::Tensor scale,
                              torch::Tensor m, torch::Tensor v, double maxq, double beta, double round_weight,
                              double lr, double beta1, double beta2, double eps, int64_t step) {
  check_same({V, G, base, scale, m, v}, "rounding_adam_step_");
  TORCH_CHECK(step >= 1, "rounding_adam_step_: step counts from 1");
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const bool regularise = beta > 0;  // β ≤ 0: the regulariser is off (warm-up)
  AT_DISPATCH_FLOATING_TYPES(V.scalar_type(), "rounding_adam_step_", [&] {
    using T = scalar_t;
    auto kernel = regularise ? step_kernel<true, T> : step_kernel<false, T>;
    kernel(V.data_ptr<T>(), G.data_ptr<T>(), base.data_ptr<T>(), scale.data_ptr<T>(), m.data_ptr<T>(),
           v.data_ptr<T>(), V.numel(), static_cast<T>(maxq), static_cast<T>(beta), static_cast<T>(round_weight),
           static_cast<T>(lr / bc1), static_cast<T>(beta1), static_cast<T>(beta2), static_cast<T>(eps),
           static_cast<T>(std::sqrt(bc2)));
  });
}
