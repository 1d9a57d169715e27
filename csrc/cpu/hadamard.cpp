// The online Hadamard rotation on the CPU: y = (x · diag(signs)) · (K ⊗ S) · scale along the last axis, the math of
// boa.transforms.hadamard.Rotation.apply (K its core, scale 1/√n) in float32; torch reference boa_kernels/hadamard.py.
//
// Sizes: x (rows, n) float32, bfloat16 or float16, n = m · p with p a power of two; signs float32 (n,) or none; core
// K float32 (m, m); y (rows, n) in x's dtype. Each row is read in x's dtype into a float32 buffer z (n,) (no float32
// copy of x, no float32 y: only one row's buffer, in L1/L2), viewed as (m, p):
// 1. the signs, then the p-point Walsh–Hadamard transform of each of the m blocks in its passes h = 1, 2, 4, …
//    (boa/hadamard_math.h: each output the same chain of float additions as the reference's butterflies, so with
//    m = 1 y is bit-identical). With AVX-512 and p ≥ 16 the passes h < 16 run inside one zmm register (a lane
//    permute, an add and a subtract, a blend per pass) and the passes h ≥ 16 on whole registers.
// 2. y_b = Σ_a (scale · K[a, b]) · z_a over whole blocks: per 16 columns of the blocks, 8 outputs b at a time, each
//    z_a loaded once for 8 fused multiply-adds (K's entries broadcast from memory); with AVX-512 and p ≥ 16, else
//    m² plain runs of p multiply-adds. This sums in another order than the reference's einsum (and multiplies the
//    scale in first): for m > 1 the two agree to fp32 rounding, as both do with Rotation.apply, whose transform is
//    products with Sylvester factors; for a core of 0s and 1s (K = I) y is z · scale bit for bit. m = 1: y = z · scale.
// Rows are spread over threads (at::parallel_for).
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "boa/hadamard_math.h"
#include "ops.h"

namespace {

#if defined(__AVX512F__)
// One pass h < 16 inside a register: lane l pairs with lane l ^ h; the lower of the two gets a + b, the upper
// a − b, a being the lower lane's value (the same two operations as the scalar butterfly).
template <int H>
__m512 butterfly_in_register(__m512 v) {
  static_assert(H == 1 || H == 2 || H == 4 || H == 8, "in-register passes are h = 1, 2, 4, 8");
  constexpr __mmask16 upper = H == 1 ? 0xAAAA : H == 2 ? 0xCCCC : H == 4 ? 0xF0F0 : 0xFF00;
  __m512 partner;
  if constexpr (H == 1) partner = _mm512_permute_ps(v, 0xB1);
  if constexpr (H == 2) partner = _mm512_permute_ps(v, 0x4E);
  if constexpr (H == 4) partner = _mm512_shuffle_f32x4(v, v, 0xB1);
  if constexpr (H == 8) partner = _mm512_shuffle_f32x4(v, v, 0x4E);
  return _mm512_mask_blend_ps(upper, _mm512_add_ps(v, partner), _mm512_sub_ps(partner, v));
}

// boa::walsh_hadamard of one block of p ≥ 16 floats.
void walsh_hadamard_avx512(float* x, int64_t p) {
  for (int64_t i = 0; i < p; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    v = butterfly_in_register<1>(v);
    v = butterfly_in_register<2>(v);
    v = butterfly_in_register<4>(v);
    v = butterfly_in_register<8>(v);
    _mm512_storeu_ps(x + i, v);
  }
  for (int64_t h = 16; h < p; h *= 2)
    for (int64_t i = 0; i < p; i += 2 * h)
      for (int64_t j = i; j < i + h; j += 16) {
        const __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + h);
        _mm512_storeu_ps(x + j, _mm512_add_ps(a, b));
        _mm512_storeu_ps(x + j + h, _mm512_sub_ps(a, b));
      }
}

// y_b = Σ_a k[a, b] · z_a for outputs b0 … b0 + C − 1, 16 columns from i, of blocks of p floats: C independent
// accumulators in registers, each z_a loaded once for all of them.
template <int C>
void mix_columns(const float* z, const float* k, int64_t m, int64_t p, int64_t b0, int64_t i, float* y) {
  __m512 acc[C];
  for (int j = 0; j < C; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t a = 0; a < m; ++a) {
    const __m512 za = _mm512_loadu_ps(z + a * p + i);
    for (int j = 0; j < C; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(k[a * m + b0 + j]), za, acc[j]);
  }
  for (int j = 0; j < C; ++j) _mm512_storeu_ps(y + (b0 + j) * p + i, acc[j]);
}

// y_b = Σ_a k[a, b] · z_a for the m blocks of p ≥ 16 floats (k already scaled): 8 outputs at a time (8 chains of
// fused multiply-adds keep both FMA units busy), then the m mod 8 left.
void mix_blocks_avx512(const float* z, const float* k, int64_t m, int64_t p, float* y) {
  constexpr int kOutputs = 8;
  for (int64_t i = 0; i < p; i += 16) {
    int64_t b0 = 0;
    for (; b0 + kOutputs <= m; b0 += kOutputs) mix_columns<kOutputs>(z, k, m, p, b0, i, y);
    switch (m - b0) {
      case 7: mix_columns<7>(z, k, m, p, b0, i, y); break;
      case 6: mix_columns<6>(z, k, m, p, b0, i, y); break;
      case 5: mix_columns<5>(z, k, m, p, b0, i, y); break;
      case 4: mix_columns<4>(z, k, m, p, b0, i, y); break;
      case 3: mix_columns<3>(z, k, m, p, b0, i, y); break;
      case 2: mix_columns<2>(z, k, m, p, b0, i, y); break;
      case 1: mix_columns<1>(z, k, m, p, b0, i, y); break;
      default: break;
    }
  }
}
#endif

void walsh_hadamard_blocks(float* z, int64_t m, int64_t p) {
#if defined(__AVX512F__)
  if (p >= 16) {
    for (int64_t a = 0; a < m; ++a) walsh_hadamard_avx512(z + a * p, p);
    return;
  }
#endif
  for (int64_t a = 0; a < m; ++a) boa::walsh_hadamard(z + a * p, p);
}

void mix_blocks(const float* z, const float* k, int64_t m, int64_t p, float* y) {
#if defined(__AVX512F__)
  if (p >= 16) return mix_blocks_avx512(z, k, m, p, y);
#endif
  for (int64_t b = 0; b < m; ++b) {
    float* yb = y + b * p;
    std::fill(yb, yb + p, 0.f);
    for (int64_t a = 0; a < m; ++a) {
      const float kab = k[a * m + b];
      const float* za = z + a * p;
      for (int64_t i = 0; i < p; ++i) yb[i] += kab * za[i];
    }
  }
}

// z = float(x row) · signs and out = T(v · scale), in loops the compiler vectorises. bfloat16 by its bits: a float
// is its bf16 bits shifted up (exact), and the way back rounds half to even with c10::BFloat16's arithmetic.
template <typename T>
void load_row(const T* row, const float* sign, int64_t n, float* z) {
  for (int64_t j = 0; j < n; ++j) z[j] = sign ? static_cast<float>(row[j]) * sign[j] : static_cast<float>(row[j]);
}

template <>
void load_row(const c10::BFloat16* row, const float* sign, int64_t n, float* z) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t u = static_cast<uint32_t>(bits[j]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    z[j] = sign ? f * sign[j] : f;
  }
}

template <typename T>
void store_row(const float* v, float scale, int64_t n, T* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(v[j] * scale);
}

template <>
void store_row(const float* v, float scale, int64_t n, c10::BFloat16* out) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(out);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float f = v[j] * scale;
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    bits[j] = f != f ? uint16_t{0x7FC0} : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
}

template <typename T>
void rotate_rows(const T* src, const float* sign, const float* k, float scale, int64_t rows, int64_t m, int64_t p,
                 T* dst) {
  const int64_t n = m * p;
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> z(n), y(m > 1 ? n : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = src + r * n;
      T* out = dst + r * n;
      load_row(row, sign, n, z.data());
      if (r + 1 < r1)  // the next row arrives while this one is transformed
        for (int64_t byte = 0; byte < n * static_cast<int64_t>(sizeof(T)); byte += 64)
          __builtin_prefetch(reinterpret_cast<const char*>(row + n) + byte);
      walsh_hadamard_blocks(z.data(), m, p);
      if (m == 1) {  // Rotation skips the product with a 1 × 1 core
        store_row(z.data(), scale, n, out);
        continue;
      }
      mix_blocks(z.data(), k, m, p, y.data());
      store_row(y.data(), 1.f, n, out);
    }
  });
}

}  // namespace

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
  const auto xc = x.contiguous();
  const auto sf = signs ? c10::optional<torch::Tensor>(signs->contiguous()) : c10::nullopt;
  const float s = static_cast<float>(scale);
  const auto kf = (core.contiguous() * s).contiguous();  // the scale multiplied into the core: one product per y
  auto y = torch::empty_like(xc);
  const float* sign = sf ? sf->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "hadamard_transform", [&] {
    rotate_rows<scalar_t>(xc.data_ptr<scalar_t>(), sign, kf.data_ptr<float>(), s, rows, m, n / m,
                          y.data_ptr<scalar_t>());
  });
  return y;
}
