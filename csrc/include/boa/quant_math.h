// Per-element math of the quantization hot loop, shared by the C++ CPU kernels and the CUDA kernels so that the CPU
// build (which the tests run) proves the arithmetic the GPU runs; only the thread mapping differs.
//
// Uniform asymmetric/symmetric grid (boa/core/quantizer.py):  code = clamp(rint(w / s) + z, 0, maxq),
// q = s · (code − z).  Compensation step of the column pass (boa/algorithms/solver.py):  e = (w − q) / U_jj.
// Each function is one expression in the order torch evaluates it, so that fp64 results are bit-identical to the
// torch reference (build with -ffp-contract=off / --fmad=false on the host; the GPU may contract to FMA).
#pragma once

#include <cmath>
#include <cstdint>

#include "boa/host_device.h"

namespace boa {

// Round half to even (torch.round), i.e. rint under the default rounding mode.
template <typename T>
BOA_HD T round_half_even(T x) {
#if defined(__CUDA_ARCH__)
  return rint(x);
#else
  return std::nearbyint(x);
#endif
}

template <typename T>
BOA_HD T quant_code(T w, T scale, T zero, T maxq) {
  T c = round_half_even(w / scale) + zero;
  return c < T(0) ? T(0) : (c > maxq ? maxq : c);
}

template <typename T>
BOA_HD T dequant(T code, T scale, T zero) {
  return scale * (code - zero);
}

// The error that the rank-1 update spreads over the later columns: (w − q) / U_jj.
template <typename T>
BOA_HD T compensation_error(T w, T q, T u_jj) {
  return (w - q) / u_jj;
}

// One element of the rank-1 update w_k −= e · U_jk (a product, then a difference: two roundings, as in torch).
template <typename T>
BOA_HD T compensate(T w, T e, T u_jk) {
  T step = e * u_jk;
  return w - step;
}

// Row r of the compensation op's tensors (layout: boa_kernels/compensate.py) and its per-column step; the CPU and
// CUDA kernels differ only in how rows and the update loop map onto threads.
template <typename T>
struct CompensationRow {
  T* w;             // the row's B weights
  T* e;             // its errors
  T* c;             // its codes
  const T* u;       // the row's U1 matrix (B × B): shared, or the one of its batch entry
  const T* scale;   // its G grids
  const T* zero;
  int64_t B;

  BOA_HD CompensationRow(T* W, T* E, T* C, const T* U, const T* S, const T* Z, int64_t r, int64_t rows_per_matrix,
                         int64_t B_, int64_t G, bool shared_U)
      : w(W + r * B_), e(E + r * B_), c(C + r * B_), u(U + (shared_U ? 0 : (r / rows_per_matrix) * B_ * B_)),
        scale(S + r * G), zero(Z + r * G), B(B_) {}

  // Column j (current value w_j, grid g): its code into *code, and the error the update spreads.
  BOA_HD T quantize_column(T w_j, int64_t j, int64_t g, T maxq, T* code) const {
    const T s = scale[g], z = zero[g];
    *code = quant_code(w_j, s, z, maxq);
    return compensation_error(w_j, dequant(*code, s, z), u[j * B + j]);
  }

  BOA_HD const T* u_row(int64_t j) const { return u + j * B; }
};

}  // namespace boa
