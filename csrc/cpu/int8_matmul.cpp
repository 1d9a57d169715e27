// Packed low-bit weights times low-bit activations on the CPU, in integers:
//   y[t, o] = s_a[t] · Σ_g s_w[o, g] · (Σ_{c∈g} q[o, c] · a[t, c] − z[o, g] · Σ_{c∈g} a[t, c])  (+ bias[o])
// with both inner sums exact in int32 per weight group and the groups combined in float32.
//
// Sizes: x (batch, in) any float dtype; qweight uint8 (out, in_pad·bits/8), in_pad = in rounded up to 64; scales
// float32 / zeros uint8 (out, groups), groups of a multiple of 4 columns (or per-channel); perm int32 (in,) or none;
// y (batch, out) in x's dtype. Weights in boa's packed layout (boa/core/packed.py), bits 2, 3, 4 or 8, codes unsigned.
// Activations: a_bits 8 or 4, quantized per token on the fly (boa/int8_math.h); 4-bit codes ride in int8 lanes, as
// no CPU multiplies 4-bit integers. Torch reference: boa_kernels/int8_matmul.py.
//
// 1. Once per call, per token: its scale s_a, its codes in packed column order (gathered by perm; padding 0) as int8
//    (batch, in_pad; rows in_pad + 64 bytes apart), and each group's code sum Σ a (batch, groups) int32.
// 2. Per block of kLanes output rows, once per call: the rows' codes unpacked to bytes and transposed into a panel,
//    panel[k] lane r = row r's codes of columns 4k … 4k+3: the operand layout of vpdpbusd, which multiplies
//    unsigned by signed bytes and sums each quad into an int32 lane (u8 × s8 → i32, exactly the product here).
// 3. A register tile of kTokens tokens × kLanes rows: acc[t] += vpdpbusd(panel[k], broadcast(a[t, 4k … 4k+3])) over
//    a group's quads, then total[t] += s_w · float(acc[t] − z · Σ a) per group; y = s_a · total + bias.
// A decode step (a few tokens, one tile) reads each packed row once; a prefill is a tiled GEMM: each thread task
// unpacks kPanels panels, then multiplies every block of tokens into them, so the weights are unpacked once per call
// and a token block's codes are reused across the panels from cache.
// AMX (where the build has AMX-INT8 and Linux grants the tiles), prefills of kAmxMinBatch tokens or more, groups a
// multiple of 32 columns (or per-channel): the same panels are the B tiles as they stand (16 rows × 4 codes per
// 64-byte tile row); the codes are copied once per call into A tiles (per 16 tokens and 64 columns, 1 KiB
// contiguous). Per group, a 2 × 2 block of C tiles (32 tokens × 32 rows) accumulates tdpbssd / tdpbsud over the
// group's steps of 64 (or 32) columns; C is stored and the group's float epilogue adds s_w · float(C) (8-bit
// weights: C − z · Σ a) into float totals in L1. Weights below 8 bits enter the tiles as signed q − z (|q − z| ≤ 15),
// so their epilogue has no zero term. The group sums stay exact int32 on every path.
// Instruction set (compile time, -march=native): AVX-512 VNNI (64 codes per vpdpbusd) with or without AMX,
// AVX-VNNI (32), AVX2 (32, exact 16-bit multiplies: vpmaddubsw saturates on 8-bit codes), else portable C++ (one
// quad per step). Panels are spread over threads (at::parallel_for; this file is compiled with -fopenmp).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && \
    defined(__linux__)
#define BOA_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define BOA_AMX 0
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <vector>

#include "boa/int8_math.h"
#include "boa/packed_args.h"
#include "boa/packed_math.h"
#include "ops.h"

namespace {

// 64-byte aligned storage: an AMX tile row or a zmm register is then one whole cache line (split lines halve the
// tile loads' speed).
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, CacheLineAllocator<T>>;

int32_t load_quad(const void* p) {
  int32_t quad;
  std::memcpy(&quad, p, sizeof(quad));
  return quad;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
struct Lanes {
  static constexpr int kLanes = 16;  // int32 lanes: output rows per panel
  static constexpr int kTokens = 8;  // tokens per register tile: 8 int32 and 8 float accumulators
  static constexpr const char* kName = "avx512-vnni";
  using I = __m512i;
  using F = __m512;
  static I zero() { return _mm512_setzero_si512(); }
  static I load(const void* p) { return _mm512_loadu_si512(p); }
  static void store(void* p, I v) { _mm512_storeu_si512(p, v); }
  static I set1(int32_t v) { return _mm512_set1_epi32(v); }
  static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I mul(I a, I b) { return _mm512_mullo_epi32(a, b); }
  template <int BITS>
  static I dot(I acc, I codes, I acts) { return _mm512_dpbusd_epi32(acc, codes, acts); }
  static F to_float(I v) { return _mm512_cvtepi32_ps(v); }
  static F fzero() { return _mm512_setzero_ps(); }
  static F fload(const float* p) { return _mm512_loadu_ps(p); }
  static void fstore(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }

  // The tile's 64 codes as bytes in column order: one register.
  template <int BITS>
  static void unpack(const uint8_t* t, I* c) {
    if constexpr (BITS == 8) {
      c[0] = load(t);
    } else if constexpr (BITS == 4) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t)), mask = _mm256_set1_epi8(15);
      c[0] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, mask)),
                                _mm256_and_si256(_mm256_srli_epi16(v, 4), mask), 1);
    } else {  // the 2-bit plane in each 128-bit lane m, shifted right by 2m: byte i of lane m is c_{16m+i}
      const __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
      c[0] = _mm512_and_si512(_mm512_srlv_epi64(v, _mm512_setr_epi64(0, 0, 2, 2, 4, 4, 6, 6)), _mm512_set1_epi8(3));
      if constexpr (BITS == 3) {  // bit i of the 1-bit plane is a byte-lane mask as it stands
        uint64_t high;
        std::memcpy(&high, t + 16, 8);
        c[0] = _mm512_mask_add_epi8(c[0], high, c[0], _mm512_set1_epi8(4));
      }
    }
  }

  // r[i] lane j ↔ r[j] lane i (16 × 16 int32): pairs, then quads within 128-bit lanes, then the 128-bit blocks.
  static void transpose(I* r) {
    I t[16], u[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {  // u[4i + c], 128-bit lane L: rows 4i … 4i+3 at column 4L + c
      u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
      u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
      u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
      u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int c = 0; c < 4; ++c) {  // column 4L + c gathers lane L of u[c], u[4 + c], u[8 + c], u[12 + c]
      const I lo01 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), hi01 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
      const I lo23 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
      const I hi23 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
      r[c] = _mm512_shuffle_i32x4(lo01, lo23, 0x88);
      r[4 + c] = _mm512_shuffle_i32x4(lo01, lo23, 0xDD);
      r[8 + c] = _mm512_shuffle_i32x4(hi01, hi23, 0x88);
      r[12 + c] = _mm512_shuffle_i32x4(hi01, hi23, 0xDD);
    }
  }
};
#elif defined(__AVX2__)
struct Lanes {
  static constexpr int kLanes = 8;
  static constexpr int kTokens = 4;  // 16 registers: 4 int32 and 4 float accumulators leave room for the products
#if defined(__AVXVNNI__)
  static constexpr const char* kName = "avx-vnni";
#else
  static constexpr const char* kName = "avx2";
#endif
  using I = __m256i;
  using F = __m256;
  static I zero() { return _mm256_setzero_si256(); }
  static I load(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static void store(void* p, I v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static I set1(int32_t v) { return _mm256_set1_epi32(v); }
  static I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I mul(I a, I b) { return _mm256_mullo_epi32(a, b); }
  template <int BITS>
  static I dot(I acc, I codes, I acts) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, codes, acts);
#else
    if constexpr (BITS < 8) {
      // codes below 128: a vpmaddubsw pair, |c·a + c'·a'| ≤ 2 · 127 · 128, never saturates int16
      const I pairs = _mm256_maddubs_epi16(codes, acts);
      return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
    } else {  // each quad's even and odd bytes widened to int16 (codes zero-, activations sign-extended)
      const I even_codes = _mm256_and_si256(codes, _mm256_set1_epi16(0xFF)), odd_codes = _mm256_srli_epi16(codes, 8);
      const I even_acts = _mm256_srai_epi16(_mm256_slli_epi16(acts, 8), 8), odd_acts = _mm256_srai_epi16(acts, 8);
      const I sum = _mm256_add_epi32(_mm256_madd_epi16(even_codes, even_acts), _mm256_madd_epi16(odd_codes, odd_acts));
      return _mm256_add_epi32(acc, sum);
    }
#endif
  }
  static F to_float(I v) { return _mm256_cvtepi32_ps(v); }
  static F fzero() { return _mm256_setzero_ps(); }
  static F fload(const float* p) { return _mm256_loadu_ps(p); }
  static void fstore(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }

  // Adds 4 to the bytes whose bit is set in `high`, 32 bits of the 1-bit plane.
  static I add_bit2(I v, uint32_t high) {
    const I bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int32_t>(high)),
                                        _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                         2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const I bit = _mm256_set1_epi64x(0x8040201008040201);
    const I set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    return _mm256_add_epi8(v, _mm256_and_si256(set, _mm256_set1_epi8(4)));
  }

  // The tile's 64 codes as bytes in column order: two registers.
  template <int BITS>
  static void unpack(const uint8_t* t, I* c) {
    if constexpr (BITS == 8) {
      c[0] = load(t);
      c[1] = load(t + 32);
    } else if constexpr (BITS == 4) {
      const I v = load(t), mask = _mm256_set1_epi8(15);
      c[0] = _mm256_and_si256(v, mask);
      c[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    } else {  // the 2-bit plane in both 128-bit lanes, shifted right by 0, 2 (c[0]) and 4, 6 (c[1])
      const I v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
      const I mask = _mm256_set1_epi8(3);
      c[0] = _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 2, 2)), mask);
      c[1] = _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(4, 4, 6, 6)), mask);
      if constexpr (BITS == 3) {
        uint64_t high;
        std::memcpy(&high, t + 16, 8);
        c[0] = add_bit2(c[0], static_cast<uint32_t>(high));
        c[1] = add_bit2(c[1], static_cast<uint32_t>(high >> 32));
      }
    }
  }

  // r[i] lane j ↔ r[j] lane i (8 × 8 int32): pairs, then quads within 128-bit lanes, then the 128-bit halves.
  static void transpose(I* r) {
    I t[8], u[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {  // u[4i + c], 128-bit lane L: rows 4i … 4i+3 at column 4L + c
      u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
      u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
      u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
      u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int c = 0; c < 4; ++c) {
      r[c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x20);
      r[4 + c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x31);
    }
  }
};
#else
struct Lanes {
  static constexpr int kLanes = 1;  // one quad of 4 bytes in an int32
  static constexpr int kTokens = 4;
  static constexpr const char* kName = "portable";
  using I = int32_t;
  using F = float;
  static I zero() { return 0; }
  static I load(const void* p) { return load_quad(p); }
  static void store(void* p, I v) { std::memcpy(p, &v, sizeof(v)); }
  static I set1(int32_t v) { return v; }
  static I sub(I a, I b) { return a - b; }
  static I mul(I a, I b) { return a * b; }
  template <int BITS>
  static I dot(I acc, I codes, I acts) {
    const uint32_t c = static_cast<uint32_t>(codes), a = static_cast<uint32_t>(acts);
    for (int j = 0; j < 4; ++j)
      acc += static_cast<int32_t>((c >> (8 * j)) & 255u) * static_cast<int8_t>(a >> (8 * j));
    return acc;
  }
  static F to_float(I v) { return static_cast<float>(v); }
  static F fzero() { return 0.f; }
  static F fload(const float* p) { return *p; }
  static void fstore(float* p, F v) { *p = v; }
  static F fma(F a, F b, F c) { return a * b + c; }

  // The tile's 64 codes as 16 quads (boa/packed_math.h).
  template <int BITS>
  static void unpack(const uint8_t* t, I* c) {
    for (int k = 0; k < 16; ++k) {
      uint32_t quad = 0;
      for (int j = 0; j < 4; ++j) quad |= boa::unpack_code(t, BITS, 4 * k + j) << (8 * j);
      c[k] = static_cast<int32_t>(quad);
    }
  }

  static void transpose(I*) {}
};
#endif

using L = Lanes;
constexpr int kQuadsPerTile = boa::kTile / 4;
constexpr int kRegsPerTile = kQuadsPerTile / L::kLanes;
constexpr int64_t kPanels = 4;  // panels per thread task: a token block's codes are read from cache for 3 of them
#if BOA_AMX
constexpr int64_t kAmxPanels = 8;    // panels per thread task on AMX: 128 rows
constexpr int64_t kAmxTokens = 32;   // tokens per block on AMX: two A tiles
constexpr int64_t kAmxMinBatch = 16; // smaller batches read the weights once through vpdpbusd
#endif

struct PackedRows {
  const uint8_t* qweight;
  const float* scales;
  const uint8_t* zeros;
  int64_t out, in, in_pad, groups, group_size, row_bytes;

  // Quads [first, end) of group g; the last group ends at the last real column (its padding multiplies zeros).
  int64_t first_quad(int64_t g) const { return g * group_size / 4; }
  int64_t end_quad(int64_t g) const { return g == groups - 1 ? (in + 3) / 4 : (g + 1) * group_size / 4; }
};

// Per token, in packed column order: int8 codes (batch, stride), scales (batch,), group code sums (batch, groups).
// A row of codes is in_pad + 64 bytes apart, so that a tile's or a register tile's 16 tokens do not share one cache
// set (in_pad is often a multiple of 4096); codes and sums have zero rows up to a multiple of 16 tokens.
struct Activations {
  std::vector<int8_t> codes;
  std::vector<float> scales;
  std::vector<int32_t> sums;
  int64_t stride;
};

Activations quantize_activations(const torch::Tensor& xf, const int32_t* perm, const PackedRows& w, int a_bits,
                                 double clip_ratio) {
  const int64_t batch = xf.size(0), stride = w.in_pad + 64;
  const int64_t padded = (batch + 15) / 16 * 16;  // whole AMX tiles of 16 tokens, the extra ones zero
  Activations a{std::vector<int8_t>(padded * stride, 0), std::vector<float>(batch),
                std::vector<int32_t>(padded * w.groups, 0), stride};
  const float factor = boa::activation_factor(clip_ratio, a_bits);
  const float* x = xf.data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> gathered(perm ? w.in : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const float* row = x + t * w.in;
      float amax = 0.f;
#pragma omp simd reduction(max : amax)
      for (int64_t j = 0; j < w.in; ++j) amax = std::max(amax, std::fabs(row[j]));
      const float scale = boa::activation_scale(amax, factor);
      a.scales[t] = scale;
      if (perm) {
        for (int64_t j = 0; j < w.in; ++j) gathered[j] = row[perm[j]];
        row = gathered.data();
      }
      int8_t* codes = a.codes.data() + t * stride;
      for (int64_t g = 0; g < w.groups; ++g) {  // the last group ends at the last column (boa::group_of_column)
        const int64_t end = g == w.groups - 1 ? w.in : (g + 1) * w.group_size;
        int32_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = g * w.group_size; j < end; ++j) {
          const int32_t code = boa::activation_code(row[j], scale, a_bits);
          codes[j] = static_cast<int8_t>(code);
          sum += code;
        }
        a.sums[t * w.groups + g] = sum;
      }
    }
  });
  return a;
}

// kLanes output rows in vpdpbusd's layout: quads (in_pad / 4, kLanes), lane r of quad k holding row r's codes of
// columns 4k … 4k+3; scales and zeros (groups, kLanes). Rows past the layer's end are zero.
struct Panel {
  Buffer<int32_t> quads;
  Buffer<float> scales;
  Buffer<int32_t> zeros;
  int64_t row0 = 0, rows = 0;
  explicit Panel(const PackedRows& w)
      : quads(w.in_pad / 4 * L::kLanes), scales(w.groups * L::kLanes), zeros(w.groups * L::kLanes) {}
};

template <int BITS>
void build_panel(const PackedRows& w, int64_t row0, Panel& p) {
  p.row0 = row0;
  p.rows = std::min<int64_t>(L::kLanes, w.out - row0);
  for (int64_t t = 0; t < w.in_pad / boa::kTile; ++t) {
    L::I columns[kRegsPerTile][L::kLanes];  // [register of the tile][row]
    for (int r = 0; r < L::kLanes; ++r) {
      L::I regs[kRegsPerTile];
      if (r < p.rows)
        L::unpack<BITS>(w.qweight + (row0 + r) * w.row_bytes + t * boa::tile_bytes(BITS), regs);
      else
        std::fill(regs, regs + kRegsPerTile, L::zero());
      for (int q = 0; q < kRegsPerTile; ++q) columns[q][r] = regs[q];
    }
    for (int q = 0; q < kRegsPerTile; ++q) {
      L::transpose(columns[q]);
      for (int k = 0; k < L::kLanes; ++k)
        L::store(p.quads.data() + (t * kQuadsPerTile + q * L::kLanes + k) * L::kLanes, columns[q][k]);
    }
  }
  for (int64_t g = 0; g < w.groups; ++g)
    for (int r = 0; r < L::kLanes; ++r) {
      const bool real = r < p.rows;
      p.scales[g * L::kLanes + r] = real ? w.scales[(row0 + r) * w.groups + g] : 0.f;
      p.zeros[g * L::kLanes + r] = real ? w.zeros[(row0 + r) * w.groups + g] : 0;
    }
}

// y[t0 … t0+NT−1, the panel's rows]: the register tile of step 3.
template <int BITS, int NT>
void multiply_panel(const Panel& p, const Activations& a, const PackedRows& w, int64_t t0, const float* bias,
                    float* y) {
  L::I acc[NT];
  L::F total[NT];
  for (int t = 0; t < NT; ++t) {
    acc[t] = L::zero();
    total[t] = L::fzero();
  }
  const int8_t* codes = a.codes.data() + t0 * a.stride;
  for (int64_t g = 0; g < w.groups; ++g) {
    for (int64_t k = w.first_quad(g); k < w.end_quad(g); ++k) {
      const L::I quad = L::load(p.quads.data() + k * L::kLanes);
      for (int t = 0; t < NT; ++t)
        acc[t] = L::dot<BITS>(acc[t], quad, L::set1(load_quad(codes + t * a.stride + 4 * k)));
    }
    const L::I zero = L::load(p.zeros.data() + g * L::kLanes);
    const L::F scale = L::fload(p.scales.data() + g * L::kLanes);
    for (int t = 0; t < NT; ++t) {
      const L::I exact = L::sub(acc[t], L::mul(zero, L::set1(a.sums[(t0 + t) * w.groups + g])));
      total[t] = L::fma(L::to_float(exact), scale, total[t]);
      acc[t] = L::zero();
    }
  }
  for (int t = 0; t < NT; ++t) {
    float lanes[L::kLanes];
    L::fstore(lanes, total[t]);
    const float s = a.scales[t0 + t];
    float* out = y + (t0 + t) * w.out + p.row0;
    for (int64_t r = 0; r < p.rows; ++r) out[r] = lanes[r] * s + (bias ? bias[p.row0 + r] : 0.f);
  }
}

// The tile for the `count` (≤ NT) tokens from t0.
template <int BITS, int NT = L::kTokens>
void multiply_tokens(const Panel& p, const Activations& a, const PackedRows& w, int64_t t0, int64_t count,
                     const float* bias, float* y) {
  if constexpr (NT > 1)
    if (count < NT) return multiply_tokens<BITS, NT - 1>(p, a, w, t0, count, bias, y);
  multiply_panel<BITS, NT>(p, a, w, t0, bias, y);
}

#if BOA_AMX
// Linux grants the AMX tile registers only to a process that asks (arch_prctl ARCH_REQ_XCOMP_PERM for the
// XTILEDATA state component); where it refuses, every batch takes the vpdpbusd path.
bool amx_usable() {
  constexpr int kReqXcompPerm = 0x1023, kXtileData = 18;
  static const bool granted = syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  return granted;
}

// Columns per tile step: 64, or 32 where the groups are multiples of 32 only (no step straddles two groups; a
// step costs the same at any width), or 0 (no AMX) for other groups.
int amx_step(const PackedRows& w) { return w.group_size % 64 == 0 ? 64 : (w.group_size % 32 == 0 ? 32 : 0); }

// tmm0 … 3: C, 16 tokens × 16 rows int32, C[2i + j] = token half i × panel j; tmm4, 5: A, 16 tokens × step
// activation codes; tmm6, 7: B, step / 4 quads of a panel (16 rows × 4 codes each), as build_panel lays them out.
void configure_tiles(int step) {
  struct {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  } config;
  for (int i = 0; i < 8; ++i) {
    config.rows[i] = i >= 6 ? step / 4 : 16;
    config.colsb[i] = i == 4 || i == 5 ? step : 64;
  }
  _tile_loadconfig(&config);
}

// Weight codes below 8 bits minus their group's zero, in place: signed bytes (|q − z| ≤ 127), so that the tiles sum
// Σ (q − z)·a and the epilogue has no zero term.
void subtract_zeros(const PackedRows& w, Panel& p) {
  for (int64_t g = 0; g < w.groups; ++g) {
    const __m512i zero = _mm512_mullo_epi32(_mm512_loadu_si512(p.zeros.data() + g * L::kLanes),
                                            _mm512_set1_epi32(0x01010101));  // each lane's z in its 4 bytes
    const int64_t end = std::min((g + 1) * w.group_size, w.in_pad);
    for (int64_t k = g * w.group_size / 4; k < end / 4; ++k) {
      int32_t* quad = p.quads.data() + k * L::kLanes;
      _mm512_storeu_si512(quad, _mm512_sub_epi8(_mm512_loadu_si512(quad), zero));
    }
  }
}

// totals[t, the NB panels' rows] += s_w · float(Σ (q − z)·a) for group g of NA · 16 tokens from t0 (their codes in
// `codes`, laid out as A tiles) and NB panels from p: the group's tile steps, then its float epilogue through
// memory (C leaves the tiles only by a store); `stride` floats between two tokens' totals.
template <int BITS, int NA, int NB>
void amx_group(const Panel* p, const Activations& a, const int8_t* codes, const PackedRows& w, int64_t t0,
               int64_t g, int step, float* totals, int64_t stride) {
  _tile_zero(0);
  if constexpr (NB == 2) _tile_zero(1);
  if constexpr (NA == 2) _tile_zero(2);
  if constexpr (NA == 2 && NB == 2) _tile_zero(3);
  const int64_t end = std::min((g + 1) * w.group_size, w.in_pad);
  for (int64_t k = g * w.group_size; k < end; k += step) {
    const int8_t* chunk = codes + k / 64 * (16 * 64) + k % 64;
    _tile_loadd(4, chunk, 64);
    if constexpr (NA == 2) _tile_loadd(5, chunk + 16 * w.in_pad, 64);
    _tile_loadd(6, p[0].quads.data() + k / 4 * L::kLanes, 64);
    if constexpr (NB == 2) _tile_loadd(7, p[1].quads.data() + k / 4 * L::kLanes, 64);
    if constexpr (BITS < 8) {  // signed codes q − z
      _tile_dpbssd(0, 4, 6);
      if constexpr (NB == 2) _tile_dpbssd(1, 4, 7);
      if constexpr (NA == 2) _tile_dpbssd(2, 5, 6);
      if constexpr (NA == 2 && NB == 2) _tile_dpbssd(3, 5, 7);
    } else {  // unsigned codes q
      _tile_dpbsud(0, 4, 6);
      if constexpr (NB == 2) _tile_dpbsud(1, 4, 7);
      if constexpr (NA == 2) _tile_dpbsud(2, 5, 6);
      if constexpr (NA == 2 && NB == 2) _tile_dpbsud(3, 5, 7);
    }
  }
  alignas(64) int32_t c[4][16 * 16];
  _tile_stored(0, c[0], 64);
  if constexpr (NB == 2) _tile_stored(1, c[1], 64);
  if constexpr (NA == 2) _tile_stored(2, c[2], 64);
  if constexpr (NA == 2 && NB == 2) _tile_stored(3, c[3], 64);
  for (int j = 0; j < NB; ++j) {
    const L::I zero = L::load(p[j].zeros.data() + g * L::kLanes);
    const L::F scale = L::fload(p[j].scales.data() + g * L::kLanes);
    for (int i = 0; i < NA; ++i)
      for (int r = 0; r < 16; ++r) {
        const int64_t t = 16 * i + r;
        float* total = totals + t * stride + j * L::kLanes;
        L::I exact = L::load(c[2 * i + j] + 16 * r);
        if constexpr (BITS == 8) exact = L::sub(exact, L::mul(zero, L::set1(a.sums[(t0 + t) * w.groups + g])));
        L::fstore(total, L::fma(L::to_float(exact), scale, L::fload(total)));
      }
  }
}

// The prefill on AMX. Each thread task unpacks kAmxPanels panels once, then for every block of 32 tokens runs the
// groups in order and, per group, the panels in pairs: the group's A tiles (32 × group_size bytes) stay in L1
// across the pairs, the task's panels in L2 across the token blocks.
template <int BITS>
void amx_gemm(const PackedRows& w, const Activations& a, int64_t batch, const float* bias, float* y) {
  const int step = amx_step(w);
  // The codes as A tiles: per 16 tokens, per 64 columns, 16 rows of 64 bytes (1 KiB, contiguous; rows of the
  // codes themselves are a multiple of 4 KiB apart for many layers, which makes a tile load's rows share a cache set).
  const int64_t padded = (batch + 15) / 16 * 16, chunks = w.in_pad / 64;
  Buffer<int8_t> tiles(padded * w.in_pad);
  at::parallel_for(0, padded / 16, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t c = 0; c < chunks; ++c)
        for (int64_t r = 0; r < 16; ++r)
          std::memcpy(&tiles[((b * chunks + c) * 16 + r) * 64], &a.codes[(16 * b + r) * a.stride + 64 * c], 64);
  });
  const int64_t blocks = (w.out + L::kLanes - 1) / L::kLanes;
  at::parallel_for(0, blocks, kAmxPanels, [&](int64_t b0, int64_t b1) {
    configure_tiles(step);
    std::vector<Panel> panels(kAmxPanels, Panel(w));
    const int64_t stride = kAmxPanels * L::kLanes;
    Buffer<float> totals(kAmxTokens * stride);
    for (int64_t b = b0; b < b1; b += kAmxPanels) {
      const int64_t n = std::min(kAmxPanels, b1 - b);
      for (int64_t i = 0; i < n; ++i) {
        build_panel<BITS>(w, (b + i) * L::kLanes, panels[i]);
        if constexpr (BITS < 8) subtract_zeros(w, panels[i]);
      }
      for (int64_t t0 = 0; t0 < batch; t0 += kAmxTokens) {
        const int64_t count = std::min<int64_t>(kAmxTokens, batch - t0);
        const int8_t* codes = tiles.data() + t0 * w.in_pad;
        std::fill(totals.begin(), totals.end(), 0.f);
        for (int64_t g = 0; g < w.groups; ++g)
          for (int64_t i = 0; i < n; i += 2) {
            const Panel* p = &panels[i];
            float* t = totals.data() + i * L::kLanes;
            if (count > 16)
              n - i > 1 ? amx_group<BITS, 2, 2>(p, a, codes, w, t0, g, step, t, stride)
                        : amx_group<BITS, 2, 1>(p, a, codes, w, t0, g, step, t, stride);
            else
              n - i > 1 ? amx_group<BITS, 1, 2>(p, a, codes, w, t0, g, step, t, stride)
                        : amx_group<BITS, 1, 1>(p, a, codes, w, t0, g, step, t, stride);
          }
        const int64_t row0 = b * L::kLanes, rows = std::min(n * L::kLanes, w.out - row0);
        for (int64_t t = 0; t < count; ++t) {
          const float s = a.scales[t0 + t];
          float* out = y + (t0 + t) * w.out + row0;
          for (int64_t r = 0; r < rows; ++r) out[r] = totals[t * stride + r] * s + (bias ? bias[row0 + r] : 0.f);
        }
      }
    }
    _tile_release();
  });
}
#endif

template <int BITS>
void int8_gemm(const PackedRows& w, const Activations& a, int64_t batch, const float* bias, float* y) {
#if BOA_AMX
  if (batch >= kAmxMinBatch && amx_step(w) && amx_usable()) return amx_gemm<BITS>(w, a, batch, bias, y);
#endif
  const int64_t blocks = (w.out + L::kLanes - 1) / L::kLanes;
  at::parallel_for(0, blocks, kPanels, [&](int64_t b0, int64_t b1) {
    std::vector<Panel> panels(kPanels, Panel(w));
    for (int64_t b = b0; b < b1; b += kPanels) {
      const int64_t n = std::min(kPanels, b1 - b);
      for (int64_t i = 0; i < n; ++i) build_panel<BITS>(w, (b + i) * L::kLanes, panels[i]);
      for (int64_t t0 = 0; t0 < batch; t0 += L::kTokens)
        for (int64_t i = 0; i < n; ++i)
          multiply_tokens<BITS>(panels[i], a, w, t0, std::min<int64_t>(L::kTokens, batch - t0), bias, y);
    }
  });
}

}  // namespace

torch::Tensor boa::int8_matmul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                               c10::optional<torch::Tensor> perm, c10::optional<torch::Tensor> bias, int64_t bits,
                               int64_t group_size, int64_t a_bits, double clip_ratio) {
  const boa::PackedSizes n = boa::check_packed_args(x, qweight, scales, zeros, perm, bias, bits, group_size, 4);
  TORCH_CHECK(x.device().is_cpu(), "this is the CPU kernel; x is on ", x.device());
  TORCH_CHECK(a_bits == 4 || a_bits == 8, "activations are quantized to 4 or 8 bits, not ", a_bits);
  TORCH_CHECK(clip_ratio > 0 && std::isfinite(clip_ratio), "clip_ratio must be a positive number, not ", clip_ratio);
  const int64_t width = n.groups == 1 ? n.in : group_size;
  TORCH_CHECK(width <= boa::kMaxExactGroup, "groups of ", width, " columns could overflow the int32 sums; the int8 ",
              "kernel takes groups of up to ", boa::kMaxExactGroup, " columns");
  const auto xf = x.to(torch::kFloat32).contiguous();
  auto y = torch::empty({n.batch, n.out}, xf.options());
  const auto bias_f = bias ? c10::optional<torch::Tensor>(bias->to(torch::kFloat32).contiguous()) : c10::nullopt;
  const PackedRows w{qweight.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<uint8_t>(), n.out, n.in,
                     n.in_pad, n.groups, n.groups == 1 ? n.in_pad : group_size, qweight.size(1)};
  if (n.batch > 0 && n.out > 0) {
    const Activations a =
        quantize_activations(xf, perm ? perm->data_ptr<int32_t>() : nullptr, w, static_cast<int>(a_bits), clip_ratio);
    const float* b = bias_f ? bias_f->data_ptr<float>() : nullptr;
    float* out = y.data_ptr<float>();
    switch (bits) {
      case 2: int8_gemm<2>(w, a, n.batch, b, out); break;
      case 3: int8_gemm<3>(w, a, n.batch, b, out); break;
      case 4: int8_gemm<4>(w, a, n.batch, b, out); break;
      default: int8_gemm<8>(w, a, n.batch, b, out); break;
    }
  }
  return y.to(x.scalar_type());
}

std::string boa::int8_isa() {
#if BOA_AMX
  if (amx_usable()) return std::string(Lanes::kName) + "+amx";
#endif
  return Lanes::kName;
}
