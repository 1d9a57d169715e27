// One decoder layer of a Llama-family model for one new token in one call (boa/decode.py's fast path):
//
//   h = rmsnorm(x) · w_attn ; q | k | v = qkv(h)                 q (heads·d), k and v (kv_heads·d), d = head_dim
//   q, k = rope(q, k at pos) ; keys[:, pos] = k ; values[:, pos] = v
//   x += o(softmax(q · keys[g]ᵀ · scale) · values[g])          g = the KV head of each query head (GQA)
//   h = rmsnorm(x) · w_mlp ; g | u = gate_up(h) ; x += down(silu(g) · u)
//
// Sizes: x (hidden) float32, updated in place; norms (hidden) float32; keys/values (kv_heads, max_len, d) float32,
// positions 0..pos−1 already filled; cos/sin (d) the rotary rows at pos. A linear is 5 optional tensors (weight or
// packed qweight, scales, zeros, perm, bias) and 2 ints (bits: 0 for a dense weight; group_size): packed ones run
// boa::packed_matmul (its GEMV path), dense ones at::linear in the weight's dtype. bf16: a bfloat16 model; the linears
// take x rounded to bfloat16 (the packed kernel's one-product path) and give bfloat16, the rest stays float32.
// transformers' per-op Python is what a decode step of a small model spends most of its time in; here a layer is one
// Python call.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"

namespace {

using Tensors = std::vector<c10::optional<torch::Tensor>>;

// y (1, out) float32, contiguous
torch::Tensor linear(const torch::Tensor& x, const Tensors& parts, const std::vector<int64_t>& ints, int index,
                     bool bf16) {
  const auto& w = *parts[5 * index];
  const auto& bias = parts[5 * index + 4];
  const int64_t bits = ints[2 * index], group_size = ints[2 * index + 1];
  if (bits == 0) return at::linear(x.to(w.scalar_type()), w, bias).to(torch::kFloat32).contiguous();
  return boa::packed_matmul(bf16 ? x.to(torch::kBFloat16) : x, w, *parts[5 * index + 1], *parts[5 * index + 2],
                            parts[5 * index + 3], bias, bits, group_size)
      .to(torch::kFloat32)
      .contiguous();
}

// out = x / sqrt(mean(x²) + eps) · weight, as transformers' RMSNorm in float32 ((x · r) first, then the weight)
void rms_norm(const float* x, const float* weight, int64_t n, double eps, float* out) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(x[i]) * x[i];
  const float r = static_cast<float>(1.0 / std::sqrt(sum / n + eps));
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * r);
}

// transformers' rotate-half RoPE of one head's vector v (d) in place: v · cos + rotate_half(v) · sin
void rope(float* v, const float* cos, const float* sin, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = v[i], b = v[i + half];
    v[i] = a * cos[i] - b * sin[i];
    v[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

// Σ a[i]·b[i] in 16 independent lanes (one AVX-512 register, two AVX2 ones): the compiler may not reorder a single
// float sum, so a plain loop would be one serial chain of adds per key (most of a long context's attention time)
float dot(const float* a, const float* b, int64_t n) {
  constexpr int kLanes = 16;
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += a[i + j] * b[i + j];
  float sum = 0;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (int j = 0; j < kLanes; ++j) sum += lanes[j];
  return sum;
}

// out (d) = Σ_t p[t] · V[t] for V (length, d): 16 columns at a time summed in registers over all t (a loop over t
// around one over all d columns would load and store the whole output row once per key)
void weighted_rows(const float* p, const float* V, int64_t length, int64_t d, float* out) {
  constexpr int kLanes = 16;
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    float lanes[kLanes] = {};
    for (int64_t t = 0; t < length; ++t)
      for (int j = 0; j < kLanes; ++j) lanes[j] += p[t] * V[t * d + i + j];
    std::copy(lanes, lanes + kLanes, out + i);
  }
  for (; i < d; ++i) {
    float sum = 0;
    for (int64_t t = 0; t < length; ++t) sum += p[t] * V[t * d + i];
    out[i] = sum;
  }
}

}  // namespace

void boa::decode_layer_(torch::Tensor x, torch::Tensor attn_norm, torch::Tensor mlp_norm, double eps,
                        std::vector<c10::optional<torch::Tensor>> linears, std::vector<int64_t> linear_ints,
                        torch::Tensor keys, torch::Tensor values, int64_t pos, torch::Tensor cos, torch::Tensor sin,
                        int64_t heads, int64_t kv_heads, double scale, bool bf16) {
  const int64_t hidden = x.numel(), d = keys.size(2), max_len = keys.size(1);
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && keys.scalar_type() == torch::kFloat32 &&
                  keys.is_contiguous() && values.is_contiguous() && keys.sizes() == values.sizes() &&
                  keys.size(0) == kv_heads && heads % kv_heads == 0 && pos >= 0 && pos < max_len &&
                  linears.size() == 20 && linear_ints.size() == 8 && cos.numel() == d && sin.numel() == d,
              "decode_layer_: arguments of the wrong shape or dtype (see csrc/cpu/decode_layer.cpp)");
  float* xp = x.data_ptr<float>();
  auto h = torch::empty({1, hidden}, x.options());

  rms_norm(xp, attn_norm.data_ptr<float>(), hidden, eps, h.data_ptr<float>());
  auto qkv = linear(h, linears, linear_ints, 0, bf16);
  float* q = qkv.data_ptr<float>();
  float* k = q + heads * d;
  const float* v = k + kv_heads * d;
  const float *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
  float *K = keys.data_ptr<float>(), *V = values.data_ptr<float>();
  for (int64_t g = 0; g < kv_heads; ++g) {
    rope(k + g * d, c, s, d);
    std::copy(k + g * d, k + (g + 1) * d, K + (g * max_len + pos) * d);
    std::copy(v + g * d, v + (g + 1) * d, V + (g * max_len + pos) * d);
  }
  auto attended = torch::empty({1, heads * d}, x.options());
  float* out = attended.data_ptr<float>();
  const int64_t length = pos + 1, group = heads / kv_heads;
  at::parallel_for(0, heads, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> p(length);
    for (int64_t head = h0; head < h1; ++head) {
      float* qh = q + head * d;
      rope(qh, c, s, d);
      const float* Kg = K + (head / group) * max_len * d;
      const float* Vg = V + (head / group) * max_len * d;
      float top = -INFINITY;
      for (int64_t t = 0; t < length; ++t) {
        p[t] = dot(qh, Kg + t * d, d) * static_cast<float>(scale);
        top = std::max(top, p[t]);
      }
      float total = 0;
      for (int64_t t = 0; t < length; ++t) total += (p[t] = std::exp(p[t] - top));
      for (int64_t t = 0; t < length; ++t) p[t] /= total;
      weighted_rows(p.data(), Vg, length, d, out + head * d);
    }
  });
  auto projected = linear(attended, linears, linear_ints, 1, bf16);
  const float* yo = projected.data_ptr<float>();
  for (int64_t i = 0; i < hidden; ++i) xp[i] += yo[i];

  rms_norm(xp, mlp_norm.data_ptr<float>(), hidden, eps, h.data_ptr<float>());
  auto gate_up = linear(h, linears, linear_ints, 2, bf16);
  const int64_t inter = gate_up.size(1) / 2;
  auto act = torch::empty({1, inter}, x.options());
  const float* gu = gate_up.data_ptr<float>();
  float* a = act.data_ptr<float>();
  for (int64_t i = 0; i < inter; ++i) a[i] = gu[i] / (1.0f + std::exp(-gu[i])) * gu[inter + i];
  auto down = linear(act, linears, linear_ints, 3, bf16);
  const float* yd = down.data_ptr<float>();
  for (int64_t i = 0; i < hidden; ++i) xp[i] += yd[i];
}
