// Packed low-bit matmul on the CPU: y = x · Wᵀ (+ bias) with W held in boa's packed layout (boa/core/packed.py).
//
// Sizes: x (batch, in) any float dtype; qweight uint8 (out, in_pad·bits/8), in_pad = in rounded up to 64;
// scales float32 / zeros uint8 (out, groups); perm int32 (in,) or none; y (batch, out) in x's dtype.
// batch ≤ 8 (decoding): a GEMV that streams each packed row once (prefetching ahead of the hardware) and multiplies
//   every unpacked register of codes into all batch rows; per group acc += code · x, then total += scale · acc.
//   Group shapes fixed at compile time where they can be (32 or 64 columns, whole tiles, per-channel). Two ways to
//   multiply (chosen per call):
//   - float lanes (AVX-512: 16 codes per register, AVX2: 8, else portable C++ through boa/packed_math.h):
//     codes widened to int32, converted, FMA with float32 x; the zero point leaves the inner loop as
//     y −= scale · zero · Σ_group x;
//   - bf16 pairs (CPUs with AVX512-BF16, 2/3/4 bits, groups of a multiple of 32): 32 codes per register, looked
//     up (vpermw) in the group's table of bf16(c − zero) (exact: small integers), multiplied by vdpbf16ps with a
//     bfloat16 x as it is, or a float32 x split into two bf16 parts, x = hi + lo (+ |x|·2⁻¹⁷ at most): ~16 bits of
//     x for half the float work. No zero-point term to cancel.
// batch > 8 (prefill): rows are dequantized a chunk at a time (float32, or bfloat16 for a bfloat16 x) by all threads,
// then multiplied by one BLAS call per chunk.
// Rows are spread over threads (at::parallel_for: OpenMP, so this file is compiled with -fopenmp). The instruction
// set is chosen at compile time (-march=native).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "boa/packed_args.h"
#include "boa/packed_math.h"
#include "ops.h"

namespace {

#if defined(__AVX512F__)
struct Vec {
  static constexpr int kLanes = 16;
  static constexpr const char* kName = "avx512";
  using F = __m512;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static float sum(F v) { return _mm512_reduce_add_ps(v); }
  static __m512i widen16(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }

  // The tile's 64 codes as 4 float registers of 16 consecutive codes.
  template <int BITS>
  static void unpack(const uint8_t* t, F* c) {
    if constexpr (BITS == 8) {
      for (int q = 0; q < 4; ++q) c[q] = _mm512_cvtepi32_ps(widen16(t + 16 * q));
    } else if constexpr (BITS == 4) {
      const __m512i mask = _mm512_set1_epi32(15), a = widen16(t), b = widen16(t + 16);
      c[0] = _mm512_cvtepi32_ps(_mm512_and_si512(a, mask));
      c[1] = _mm512_cvtepi32_ps(_mm512_and_si512(b, mask));
      c[2] = _mm512_cvtepi32_ps(_mm512_srli_epi32(a, 4));
      c[3] = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
    } else {  // 2 bits, and 3 bits = 2 bits + a mask-add of 4 from the 1-bit plane
      const __m512i mask = _mm512_set1_epi32(3), a = widen16(t);
      __m512i v[4] = {_mm512_and_si512(a, mask), _mm512_and_si512(_mm512_srli_epi32(a, 2), mask),
                      _mm512_and_si512(_mm512_srli_epi32(a, 4), mask), _mm512_srli_epi32(a, 6)};
      if constexpr (BITS == 3) {
        uint64_t high;
        std::memcpy(&high, t + 16, 8);
        const __m512i four = _mm512_set1_epi32(4);
        for (int q = 0; q < 4; ++q)
          v[q] = _mm512_mask_add_epi32(v[q], static_cast<__mmask16>(high >> (16 * q)), v[q], four);
      }
      for (int q = 0; q < 4; ++q) c[q] = _mm512_cvtepi32_ps(v[q]);
    }
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec {
  static constexpr int kLanes = 8;
  static constexpr const char* kName = "avx2";
  using F = __m256;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static float sum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static __m256i widen8(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }

  // The tile's 64 codes as 8 float registers of 8 consecutive codes.
  template <int BITS>
  static void unpack(const uint8_t* t, F* c) {
    if constexpr (BITS == 8) {
      for (int q = 0; q < 8; ++q) c[q] = _mm256_cvtepi32_ps(widen8(t + 8 * q));
    } else if constexpr (BITS == 4) {
      const __m256i mask = _mm256_set1_epi32(15);
      for (int q = 0; q < 4; ++q) {
        const __m256i a = widen8(t + 8 * q);
        c[q] = _mm256_cvtepi32_ps(_mm256_and_si256(a, mask));
        c[q + 4] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));
      }
    } else {
      const __m256i mask = _mm256_set1_epi32(3), lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
      for (int h = 0; h < 2; ++h) {
        const __m256i a = widen8(t + 8 * h);
        for (int m = 0; m < 4; ++m) {
          __m256i v = _mm256_and_si256(_mm256_srli_epi32(a, 2 * m), mask);
          if constexpr (BITS == 3) {  // lanes whose bit is set in the 1-bit plane's byte get 4
            const __m256i bits = _mm256_and_si256(_mm256_set1_epi32(t[16 + 2 * m + h]), lanes);
            v = _mm256_add_epi32(v, _mm256_and_si256(_mm256_cmpeq_epi32(bits, lanes), _mm256_set1_epi32(4)));
          }
          c[2 * m + h] = _mm256_cvtepi32_ps(v);
        }
      }
    }
  }
};
#else
struct Vec {
  static constexpr int kLanes = 1;
  static constexpr const char* kName = "portable";
  using F = float;
  static F zero() { return 0.f; }
  static F set1(float v) { return v; }
  static F load(const float* p) { return *p; }
  static void store(float* p, F v) { *p = v; }
  static F fma(F a, F b, F c) { return a * b + c; }
  static F sub(F a, F b) { return a - b; }
  static F add(F a, F b) { return a + b; }
  static F mul(F a, F b) { return a * b; }
  static float sum(F v) { return v; }

  template <int BITS>
  static void unpack(const uint8_t* t, F* c) {
    for (int i = 0; i < boa::kTile; ++i) c[i] = static_cast<float>(boa::unpack_code(t, BITS, i));
  }
};
#endif

constexpr int kVecs = boa::kTile / Vec::kLanes;

// The vpermw tables of the split path, one per zero point (made at load: a zero point is an integer < 2^BITS ≤ 16).
// vpermw reads only an index's low 5 bits, so lane k holds bf16((k mod 2^BITS) − zero) and an index may carry other
// codes' bits above its own BITS without masking.
#if defined(__AVX512BF16__)
template <int BITS>
std::array<__m512i, 16> centre_tables() {
  std::array<__m512i, 16> tables;
  const __m512i mask = _mm512_set1_epi32((1 << BITS) - 1);
  const __m512i k = _mm512_and_si512(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), mask);
  const __m512i k16 = _mm512_and_si512(_mm512_add_epi32(k, _mm512_set1_epi32(16)), mask);
  for (int zero = 0; zero < 16; ++zero) {
    const __m512 z = _mm512_set1_ps(static_cast<float>(zero));
    const __m256bh low = _mm512_cvtneps_pbh(_mm512_sub_ps(_mm512_cvtepi32_ps(k), z));
    const __m256bh high = _mm512_cvtneps_pbh(_mm512_sub_ps(_mm512_cvtepi32_ps(k16), z));
    tables[zero] = _mm512_inserti64x4(_mm512_castsi256_si512(reinterpret_cast<__m256i>(low)),
                                      reinterpret_cast<__m256i>(high), 1);
  }
  return tables;
}

template <int BITS>
const std::array<__m512i, 16> kCentreTables = centre_tables<BITS>();
#endif

// Bf16 pairs: 32 codes per register, as int16 lanes, then bf16(c − zero). x (per batch row): bf16 hi[in_pad], then
// lo[in_pad] when kSplit (float32 x); a bf16 x is its own hi, exactly, and needs half the products.
#if defined(__AVX512BF16__)
template <bool kSplit>
struct Bf16Pairs {
  static constexpr int kCodes = 32;
  // Codes looked up as bf16(c − zero) (vpermw, one instruction per 32 codes): no Σ x term to cancel afterwards,
  // which for groups of 32 would cost as much as the products (measured: a bf16(128 + c) OR-trick with that
  // epilogue ran 1.35× slower).
  static constexpr bool kCentred = true;
  using X = uint16_t;
  using Codes = __m512i;
  using Centre = __m512i;  // the group's vpermw table (kCentreTables)

  template <int BITS>
  static Centre centre_for(float zero) { return kCentreTables<BITS>[static_cast<int>(zero)]; }
  static Codes centred(Codes c, Centre table) { return _mm512_permutexvar_epi16(c, table); }

  template <int BITS>
  static void unpack(const uint8_t* t, Codes* c) {
    // Codes in the low bits of int16 lanes (higher bits: other codes, ignored by the periodic table).
    if constexpr (BITS == 4) {
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t)));
      c[0] = v;
      c[1] = _mm512_srli_epi16(v, 4);
    } else {  // lanes 0–15 hold byte i, lanes 16–31 byte i >> 2: codes 0–31 in bits 0–1, codes 32–63 in bits 4–5
      const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
      const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(w), _mm256_srli_epi16(w, 2), 1);
      c[0] = v;
      c[1] = _mm512_srli_epi16(v, 4);
      if constexpr (BITS == 3) {  // bit 2 from the 1-bit plane: the low bits must be clean first
        const __m512i mask = _mm512_set1_epi16(3);
        c[0] = _mm512_and_si512(c[0], mask);
        c[1] = _mm512_and_si512(c[1], mask);
        uint64_t high;
        std::memcpy(&high, t + 16, 8);
        const __m512i four = _mm512_set1_epi16(4);
        c[0] = _mm512_mask_add_epi16(c[0], static_cast<__mmask32>(high), c[0], four);
        c[1] = _mm512_mask_add_epi16(c[1], static_cast<__mmask32>(high >> 32), c[1], four);
      }
    }
  }

  static __m512 mac(__m512 acc, Codes c, const X* x, int64_t col, int64_t in_pad) {
    const __m512bh codes = reinterpret_cast<__m512bh>(c);
    acc = _mm512_dpbf16_ps(acc, codes, reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + col)));
    if constexpr (!kSplit) return acc;
    return _mm512_dpbf16_ps(acc, codes, reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + in_pad + col)));
  }

  // x (batch, in_pad) float32 → (batch, 1 or 2, in_pad) bf16 bits: hi = bf16(x), lo = bf16(x − hi).
  static torch::Tensor prepare(const torch::Tensor& xf) {
    const int64_t batch = xf.size(0), n = xf.size(1), parts = kSplit ? 2 : 1;
    auto out = torch::empty({batch, parts, n}, xf.options().dtype(torch::kInt16));
    const float* src = xf.data_ptr<float>();
    X* dst = reinterpret_cast<X*>(out.data_ptr<int16_t>());
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t j = 0; j < n; j += 16) {
        const __m512 v = _mm512_loadu_ps(src + b * n + j);
        const __m256bh hi = _mm512_cvtneps_pbh(v);
        const __m512 hi_f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(hi)), 16));
        const __m256bh lo = _mm512_cvtneps_pbh(_mm512_sub_ps(v, hi_f));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (parts * b) * n + j), reinterpret_cast<__m256i>(hi));
        if constexpr (kSplit)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (parts * b + 1) * n + j), reinterpret_cast<__m256i>(lo));
      }
    return out;
  }

  static int64_t x_stride(int64_t in_pad) { return (kSplit ? 2 : 1) * in_pad; }
};
#endif

// Float lanes: Vec's registers of codes, float32 x.
struct FloatLanes {
  static constexpr int kCodes = Vec::kLanes;
  static constexpr bool kCentred = false;  // y −= scale · zero · Σ_group x instead
  using X = float;
  using Codes = Vec::F;
  using Centre = int;

  template <int BITS>
  static Centre centre_for(float) { return 0; }
  static Codes centred(Codes c, Centre) { return c; }
  template <int BITS>
  static void unpack(const uint8_t* t, Codes* c) { Vec::unpack<BITS>(t, c); }
  static Vec::F mac(Vec::F acc, Codes c, const X* x, int64_t col, int64_t) { return Vec::fma(c, Vec::load(x + col), acc); }
  static torch::Tensor prepare(const torch::Tensor& xf) { return xf; }
  static int64_t x_stride(int64_t in_pad) { return in_pad; }
};

// Walks a row's groups in column order; the last group owns the padding.
struct GroupWalk {
  int64_t group = 0, next, size, last, end;
  GroupWalk(int64_t group_size, int64_t groups, int64_t in_pad)
      : next(groups == 1 ? in_pad : group_size), size(group_size), last(groups - 1), end(in_pad) {}
  // True when column col starts the next group (cols are visited in increasing order, at register boundaries).
  bool enters_next(int64_t col) {
    if (col != next) return false;
    ++group;
    next = group == last ? end : next + size;
    return true;
  }
};

constexpr int64_t kPrefetchBytes = 2048;

struct PackedRows {
  const uint8_t* qweight;
  const float* scales;
  const uint8_t* zeros;
  int64_t in_pad, groups, group_size, row_bytes;
};

// Rows o0..o1−1 of y (NB, out) for NB batch rows of x: bias + Σ_g scale_g · Σ_{j∈g} code_j · x_j, less
// Σ_g scale_g·zero_g·Σ_{j∈g} x_j (xsum: (NB, groups)) for uncentred codes.
// How a row's groups are walked is fixed at compile time where it can be, as loops the compiler unrolls:
//   kGroup > 0   every group is kGroup ≤ 64 columns (a tile holds 64 / kGroup groups) and in_pad = groups · kGroup;
//   kGroup = -1  every group is a whole number of tiles (group_size % 64 == 0, in_pad = groups · group_size;
//                per-channel grids included);
//   kGroup = 0   anything else (the last group owning several registers of padding): a GroupWalk per register.
// A group's registers feed up to kChains independent accumulators per batch row (few batch rows would otherwise
// leave one long chain of dependent multiply-adds); closing a group adds them up and multiply-adds the sum by the
// group's scale into one of kTotals running totals, so that consecutive small groups do not wait on each other.
template <class P, int BITS, int NB, int kGroup>
void gemv_rows(const PackedRows& w, const typename P::X* x, const float* xsum, const float* bias, float* y,
               int64_t out, int64_t o0, int64_t o1) {
  constexpr int kRegs = boa::kTile / P::kCodes;
  constexpr int kGroupRegs = kGroup > 0 ? kGroup / P::kCodes : kRegs;  // registers per group (per tile for -1, 0)
  constexpr int kLanesInFlight = NB >= 4 ? 1 : 4 / NB;
  constexpr int kChains = kGroupRegs < kLanesInFlight ? kGroupRegs : kLanesInFlight;
  constexpr int kTotals = kLanesInFlight;
  const int64_t stride = P::x_stride(w.in_pad), tiles = w.in_pad / boa::kTile;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = w.qweight + o * w.row_bytes;
    const float* scale = w.scales + o * w.groups;
    const uint8_t* zero = w.zeros + o * w.groups;
    Vec::F acc[NB][kChains], total[NB][kTotals];
    for (int b = 0; b < NB; ++b) {
      for (int k = 0; k < kTotals; ++k) total[b][k] = Vec::zero();
      for (int k = 0; k < kChains; ++k) acc[b][k] = Vec::zero();
    }
    // into total k (a compile-time index, so that the totals stay in registers)
    auto close_group = [&](int64_t g, int k) {
      const Vec::F s = Vec::set1(scale[g]);
      for (int b = 0; b < NB; ++b) {
        Vec::F sum = acc[b][0];
        for (int c = 1; c < kChains; ++c) sum = Vec::add(sum, acc[b][c]);
        total[b][k] = Vec::fma(sum, s, total[b][k]);
        for (int c = 0; c < kChains; ++c) acc[b][c] = Vec::zero();
      }
    };
    auto tile = [&](int64_t t, typename P::Codes* c) {
      // the hardware prefetchers alone leave the row stream waiting on memory (or on a large L3) half the time
      _mm_prefetch(reinterpret_cast<const char*>(row + t * 8 * BITS + kPrefetchBytes), _MM_HINT_T0);
      P::template unpack<BITS>(row + t * 8 * BITS, c);
    };
    auto mac = [&](typename P::Codes cq, int64_t col, int chain) {
      for (int b = 0; b < NB; ++b) acc[b][chain] = P::mac(acc[b][chain], cq, x + b * stride, col, w.in_pad);
    };
    typename P::Codes c[kRegs];
    if constexpr (kGroup > 0) {
      constexpr int kGroupsPerTile = kRegs / kGroupRegs;
      for (int64_t t = 0; t < tiles; ++t) {
        tile(t, c);
        for (int h = 0; h < kGroupsPerTile; ++h) {
          const int64_t g = t * kGroupsPerTile + h;
          const typename P::Centre centre = P::template centre_for<BITS>(zero[g]);
          for (int r = 0; r < kGroupRegs; ++r)
            mac(P::centred(c[h * kGroupRegs + r], centre), g * kGroup + r * P::kCodes, r % kChains);
          close_group(g, h % kTotals);
        }
      }
    } else if constexpr (kGroup < 0) {
      const int64_t group_tiles = w.group_size / boa::kTile;
      for (int64_t g = 0; g < w.groups; ++g) {
        const typename P::Centre centre = P::template centre_for<BITS>(zero[g]);
        for (int64_t t = g * group_tiles; t < (g + 1) * group_tiles; ++t) {
          tile(t, c);
          for (int q = 0; q < kRegs; ++q) mac(P::centred(c[q], centre), t * boa::kTile + q * P::kCodes, q % kChains);
        }
        close_group(g, 0);
      }
    } else {
      GroupWalk walk(w.group_size, w.groups, w.in_pad);
      typename P::Centre centre = P::template centre_for<BITS>(zero[walk.group]);
      for (int64_t t = 0; t < tiles; ++t) {
        tile(t, c);
        for (int q = 0; q < kRegs; ++q) {
          const int64_t col = t * boa::kTile + q * P::kCodes;
          if (walk.enters_next(col)) {
            close_group(walk.group - 1, q % kTotals);
            centre = P::template centre_for<BITS>(zero[walk.group]);
          }
          mac(P::centred(c[q], centre), col, q % kChains);
        }
      }
      close_group(walk.group, 0);
    }
    for (int b = 0; b < NB; ++b) {
      Vec::F all = total[b][0];
      for (int k = 1; k < kTotals; ++k) all = Vec::add(all, total[b][k]);
      float sum = Vec::sum(all);
      if constexpr (!P::kCentred)
        for (int64_t g = 0; g < w.groups; ++g)
          sum -= scale[g] * static_cast<float>(zero[g]) * xsum[b * w.groups + g];
      y[b * out + o] = sum + (bias ? bias[o] : 0.f);
    }
  }
}

template <class P, int BITS, int NB>
void gemv(const PackedRows& w, const torch::Tensor& xf, const float* bias, torch::Tensor& y) {
  const auto xp = P::prepare(xf);
  const auto* x = reinterpret_cast<const typename P::X*>(xp.data_ptr());
  // Each batch row's sum over each group's columns, for the zero-point term of uncentred codes.
  std::vector<float> xsum(P::kCentred ? 0 : NB * w.groups, 0.f);
  const float* xv = xf.data_ptr<float>();
  if constexpr (!P::kCentred)
    for (int b = 0; b < NB; ++b)
      for (int64_t j = 0; j < w.in_pad; ++j)
        xsum[b * w.groups + boa::group_of_column(j, w.group_size, w.groups)] += xv[b * w.in_pad + j];
  float* out = y.data_ptr<float>();
  const int64_t rows = y.size(1);
  const bool regular = w.in_pad == w.groups * w.group_size;
  at::parallel_for(0, rows, 16, [&](int64_t o0, int64_t o1) {
    const auto run = [&](auto shape) {
      gemv_rows<P, BITS, NB, decltype(shape)::value>(w, x, xsum.data(), bias, out, rows, o0, o1);
    };
    if (regular && w.group_size == 32) return run(std::integral_constant<int, 32>());
    if (regular && w.group_size == 64) return run(std::integral_constant<int, 64>());
    if (regular && w.group_size % boa::kTile == 0) return run(std::integral_constant<int, -1>());
    run(std::integral_constant<int, 0>());
  });
}

// Row o of W (in_pad,) as float32, or as bfloat16 (rounded to nearest even) for a bfloat16 BLAS call.
#if defined(__AVX512BF16__)
inline void store_row(uint16_t* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}
#else
inline void store_row(uint16_t* dst, Vec::F v) {
  float lanes[Vec::kLanes];
  Vec::store(lanes, v);
  for (int i = 0; i < Vec::kLanes; ++i) dst[i] = c10::BFloat16(lanes[i]).x;
}
#endif
inline void store_row(float* dst, Vec::F v) { Vec::store(dst, v); }

template <int BITS, typename Out>
void dequant_row(const PackedRows& w, int64_t o, Out* dst) {
  const uint8_t* row = w.qweight + o * w.row_bytes;
  const float* scale = w.scales + o * w.groups;
  const uint8_t* zero = w.zeros + o * w.groups;
  GroupWalk walk(w.group_size, w.groups, w.in_pad);
  Vec::F s = Vec::set1(scale[0]), z = Vec::set1(zero[0]);
  for (int64_t t = 0; t < w.in_pad / boa::kTile; ++t) {
    Vec::F c[kVecs];
    Vec::unpack<BITS>(row + t * 8 * BITS, c);
    for (int q = 0; q < kVecs; ++q) {
      const int64_t col = t * boa::kTile + q * Vec::kLanes;
      if (walk.enters_next(col)) {
        s = Vec::set1(scale[walk.group]);
        z = Vec::set1(zero[walk.group]);
      }
      store_row(dst + col, Vec::mul(Vec::sub(c[q], z), s));
    }
  }
}

// Rows dequantized per BLAS call: about 4 MiB of float32 (at least 64 rows) — dequantized by all threads, then one
// BLAS call, itself threaded, on the whole chunk (many small calls, one per thread, ran at a fraction of the rate).
int64_t gemm_rows(int64_t in_pad) { return std::max<int64_t>(64, (int64_t{1} << 20) / in_pad); }

// x_dtype: the caller's; a bfloat16 x is multiplied by bfloat16 rows (twice the BLAS rate of float32 or more: AMX).
template <int BITS>
void gemm(const PackedRows& w, const torch::Tensor& x, torch::ScalarType x_dtype, const float* bias,
          torch::Tensor& y) {
  const bool bf16 = x_dtype == torch::kBFloat16;
  const auto xm = bf16 ? x.to(torch::kBFloat16) : x;
  const int64_t out = y.size(1), chunk = std::min(out, gemm_rows(w.in_pad));
  auto buffer = torch::empty({chunk, w.in_pad}, x.options().dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  for (int64_t o0 = 0; o0 < out; o0 += chunk) {
    const int64_t rows = std::min(chunk, out - o0);
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (bf16)
          dequant_row<BITS>(w, o0 + r, reinterpret_cast<uint16_t*>(buffer.data_ptr<at::BFloat16>()) + r * w.in_pad);
        else
          dequant_row<BITS>(w, o0 + r, buffer.data_ptr<float>() + r * w.in_pad);
      }
    });
    auto part = at::mm(xm, buffer.narrow(0, 0, rows).t());
    if (bias)
      part = part.to(torch::kFloat32).add_(torch::from_blob(const_cast<float*>(bias) + o0, {rows}, torch::kFloat32));
    y.narrow(1, o0, rows).copy_(part);
  }
}

template <class P, int BITS>
void gemv_batch(const PackedRows& w, const torch::Tensor& xf, const float* bias, torch::Tensor& y) {
  switch (xf.size(0)) {
    case 1: return gemv<P, BITS, 1>(w, xf, bias, y);
    case 2: return gemv<P, BITS, 2>(w, xf, bias, y);
    case 3: return gemv<P, BITS, 3>(w, xf, bias, y);
    case 4: return gemv<P, BITS, 4>(w, xf, bias, y);
    case 5: return gemv<P, BITS, 5>(w, xf, bias, y);
    case 6: return gemv<P, BITS, 6>(w, xf, bias, y);
    case 7: return gemv<P, BITS, 7>(w, xf, bias, y);
    default: return gemv<P, BITS, 8>(w, xf, bias, y);
  }
}

// x_bf16: the caller's x was bfloat16 (so xf holds bf16 values exactly).
template <int BITS>
void packed_matmul_bits(const PackedRows& w, const torch::Tensor& xf, bool x_bf16, const float* bias,
                        torch::Tensor& y) {
  if (xf.size(0) > boa::kGemvMaxBatch) return gemm<BITS>(w, xf, x_bf16 ? torch::kBFloat16 : torch::kFloat32, bias, y);
#if defined(__AVX512BF16__)
  if constexpr (BITS != 8)
    if (w.groups == 1 || w.group_size % 32 == 0)
      return x_bf16 ? gemv_batch<Bf16Pairs<false>, BITS>(w, xf, bias, y)
                    : gemv_batch<Bf16Pairs<true>, BITS>(w, xf, bias, y);
#else
  (void)x_bf16;
#endif
  gemv_batch<FloatLanes, BITS>(w, xf, bias, y);
}

// x as float32 (batch, in_pad): columns gathered by perm, padding zeroed.
torch::Tensor packed_input(const torch::Tensor& x, const c10::optional<torch::Tensor>& perm, int64_t in_pad) {
  auto xf = x.to(torch::kFloat32).contiguous();
  const int64_t batch = x.size(0), in = x.size(1);
  if (!perm && in == in_pad) return xf;
  auto padded = torch::zeros({batch, in_pad}, xf.options());
  const float* src = xf.data_ptr<float>();
  float* dst = padded.data_ptr<float>();
  const int32_t* p = perm ? perm->data_ptr<int32_t>() : nullptr;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < in; ++j) dst[b * in_pad + j] = src[b * in + (p ? p[j] : j)];
  return padded;
}

}  // namespace

torch::Tensor boa::packed_matmul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                                 c10::optional<torch::Tensor> perm, c10::optional<torch::Tensor> bias, int64_t bits,
                                 int64_t group_size) {
  const boa::PackedSizes n = boa::check_packed_args(x, qweight, scales, zeros, perm, bias, bits, group_size);
  TORCH_CHECK(x.device().is_cpu(), "this is the CPU kernel; x is on ", x.device());
  const auto xf = packed_input(x, perm, n.in_pad);
  const bool x_bf16 = x.scalar_type() == torch::kBFloat16;
  auto y = torch::empty({n.batch, n.out}, xf.options());
  const auto bias_f = bias ? c10::optional<torch::Tensor>(bias->to(torch::kFloat32).contiguous()) : c10::nullopt;
  const float* b = bias_f ? bias_f->data_ptr<float>() : nullptr;
  const PackedRows w{qweight.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<uint8_t>(), n.in_pad,
                     n.groups, n.groups == 1 ? n.in_pad : group_size, qweight.size(1)};
  if (n.batch > 0) {
    switch (bits) {
      case 2: packed_matmul_bits<2>(w, xf, x_bf16, b, y); break;
      case 3: packed_matmul_bits<3>(w, xf, x_bf16, b, y); break;
      case 4: packed_matmul_bits<4>(w, xf, x_bf16, b, y); break;
      default: packed_matmul_bits<8>(w, xf, x_bf16, b, y); break;
    }
  }
  return y.to(x.scalar_type());
}

std::string boa::packed_isa() {
#if defined(__AVX512BF16__)
  return std::string(Vec::kName) + "+bf16";
#else
  return Vec::kName;
#endif
}

torch::Tensor boa::unpack_codes(torch::Tensor qweight, int64_t bits) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == torch::kUInt8 && qweight.is_contiguous() &&
                  qweight.size(1) % (8 * bits) == 0,
              "qweight must be contiguous uint8 (out, tiles·8·bits)");
  const int64_t out = qweight.size(0), tiles = qweight.size(1) / (8 * bits);
  auto codes = torch::empty({out, tiles * boa::kTile}, qweight.options());
  const uint8_t* src = qweight.data_ptr<uint8_t>();
  uint8_t* dst = codes.data_ptr<uint8_t>();
  for (int64_t r = 0; r < out * tiles; ++r)
    for (int i = 0; i < boa::kTile; ++i)
      dst[r * boa::kTile + i] = static_cast<uint8_t>(boa::unpack_code(src + r * 8 * bits, static_cast<int>(bits), i));
  return codes;
}
