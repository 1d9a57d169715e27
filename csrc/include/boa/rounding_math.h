// Per-element math of aespa's learned rounding (boa/algorithms/aespa.py, boa_kernels/rounding.py), shared by the C++
// CPU kernel and any GPU port, so that the CPU build the tests run proves the arithmetic.
//
//   h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1)            rectified sigmoid, γ = −0.1, ζ = 1.1
//   E    = s · clamp(base + h, 0, maxq) − offset    offset = s·z + T: the relaxed weight's error against the target
//   ∂/∂V of L + λ Σ(1 − |2h − 1|^β), given g = [H_out E H] at the element (∂L/∂Q = 2g):
//        (2 s g · [0 ≤ base + h ≤ maxq] − [reg] 2βλ sign(t)|t|^(β−1), t = 2h − 1) · (ζ − γ) σ(1 − σ) · [0 < h < 1]
//   Adam, torch.optim.Adam's formula: m += (1 − β1)(grad − m); v = β2 v + (1 − β2) grad²;
//        V −= (lr / bc1) · m / (√v / √bc2 + ε),  bc_i = 1 − β_i^step
// exp and log call the C library's expf/logf (exp/log in fp64) by name, so that the CPU kernel can declare their
// libmvec vector variants and GCC vectorises its `omp simd` loops (csrc/cpu/rounding.cpp).
#pragma once

#include <cmath>

#include "boa/host_device.h"

namespace boa {

constexpr double kRectGamma = -0.1;
constexpr double kRectZeta = 1.1;

BOA_HD float exp_of(float x) { return expf(x); }
BOA_HD double exp_of(double x) { return exp(x); }
BOA_HD float log_of(float x) { return logf(x); }
BOA_HD double log_of(double x) { return log(x); }
BOA_HD float abs_of(float x) { return fabsf(x); }
BOA_HD double abs_of(double x) { return fabs(x); }

// Arguments of exp are kept above −80: below it exp is under 2e-35 (zero for every use here), and vector exp
// leaves its fast path on underflow (measured 8× slower per call on inputs that underflow).
constexpr double kExpFloor = -80.0;

template <typename T>
BOA_HD T clamp_to(T x, T lo, T hi);

template <typename T>
BOA_HD T logistic(T x) {
  return T(1) / (T(1) + exp_of(clamp_to(-x, T(kExpFloor), T(-kExpFloor))));
}

template <typename T>
BOA_HD T clamp_to(T x, T lo, T hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

template <typename T>
BOA_HD T relaxed_error(T V, T base, T scale, T offset, T maxq) {
  const T h = clamp_to(logistic(V) * T(kRectZeta - kRectGamma) + T(kRectGamma), T(0), T(1));
  return scale * clamp_to(base + h, T(0), maxq) - offset;
}

// Regularise is a template parameter: a loop-invariant branch inside the element loop stops GCC vectorising it.
template <bool Regularise, typename T>
BOA_HD T relaxed_gradient(T V, T base, T scale, T g, T maxq, T beta, T round_weight) {
  const T u = logistic(V);
  const T h = u * T(kRectZeta - kRectGamma) + T(kRectGamma);
  const T c = base + h;
  T grad_h = (c >= T(0) && c <= maxq) ? T(2) * scale * g : T(0);
  if (Regularise) {
    const T t = T(2) * h - T(1);
    // |t|^(β−1), β > 1. fabs, not a select: GCC would split log(t < 0 ? −t : t) into two logs, one of them of a
    // negative number, whose NaN sends vector log down its slow path.
    const T log_magnitude = (beta - T(1)) * log_of(abs_of(t));
    const T magnitude = exp_of(log_magnitude < T(kExpFloor) ? T(kExpFloor) : log_magnitude);
    grad_h -= T(2) * beta * round_weight * (t < T(0) ? -magnitude : magnitude);
  }
  const T inside = (h > T(0) && h < T(1)) ? T(1) : T(0);
  return grad_h * T(kRectZeta - kRectGamma) * u * (T(1) - u) * inside;
}

template <typename T>
BOA_HD T adam_update(T param, T grad, T& m, T& v, T lr_over_bc1, T beta1, T beta2, T eps, T sqrt_bc2) {
  m = m + (T(1) - beta1) * (grad - m);
  v = beta2 * v + (T(1) - beta2) * grad * grad;
  return param - lr_over_bc1 * m / (std::sqrt(v) / sqrt_bc2 + eps);
}

}  // namespace boa
