// The CPU extension's operators (one source file each); bindings.cpp exposes them to Python as boa_kernels' `cpp`.
#pragma once

#include <torch/extension.h>

namespace boa {

// csrc/cpu/compensate.cpp
void compensate_block_(torch::Tensor W1, torch::Tensor E1, torch::Tensor codes, torch::Tensor U1,
                       torch::Tensor scale, torch::Tensor zero, torch::Tensor group_of, double maxq,
                       int64_t start, int64_t stop);

// csrc/cpu/rounding.cpp: aespa's learned-rounding step (boa/rounding_math.h), fused per element
torch::Tensor relaxed_error(torch::Tensor V, torch::Tensor base, torch::Tensor scale, torch::Tensor offset, double maxq);
void rounding_adam_step_(torch::Tensor V, torch::Tensor G, torch::Tensor base, torch::Tensor scale, torch::Tensor m,
                         torch::Tensor v, double maxq, double beta, double round_weight, double lr, double beta1,
                         double beta2, double eps, int64_t step);

// csrc/cpu/packed_matmul.cpp: y = x · Wᵀ (+ bias), W in boa's packed layout (boa/core/packed.py)
constexpr int64_t kGemvMaxBatch = 8;  // larger batches dequantize blocks of rows and use BLAS
torch::Tensor packed_matmul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                            c10::optional<torch::Tensor> perm, c10::optional<torch::Tensor> bias, int64_t bits,
                            int64_t group_size);
std::string packed_isa();  // the instruction set packed_matmul was compiled for: avx512, avx2 or portable
torch::Tensor unpack_codes(torch::Tensor qweight, int64_t bits);  // codes (out, in_pad) via boa/packed_math.h

// csrc/cpu/int8_matmul.cpp: y = x · Wᵀ (+ bias) in integers, x quantized per token to a_bits (boa/int8_math.h)
torch::Tensor int8_matmul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                          c10::optional<torch::Tensor> perm, c10::optional<torch::Tensor> bias, int64_t bits,
                          int64_t group_size, int64_t a_bits, double clip_ratio);
std::string int8_isa();  // int8_matmul's instruction set: avx512-vnni[+amx], avx-vnni, avx2 or portable

// csrc/cpu/hadamard.cpp: y = (x · diag(signs)) · (K ⊗ S) · scale along the last axis (boa/hadamard_math.h)
torch::Tensor hadamard_transform(torch::Tensor x, c10::optional<torch::Tensor> signs, torch::Tensor core,
                                 double scale);

// csrc/cpu/decode_layer.cpp: one Llama-family decoder layer for one token, x (float32) and the KV cache in place
void decode_layer_(torch::Tensor x, torch::Tensor attn_norm, torch::Tensor mlp_norm, double eps,
                   std::vector<c10::optional<torch::Tensor>> linears, std::vector<int64_t> linear_ints,
                   torch::Tensor keys, torch::Tensor values, int64_t pos, torch::Tensor cos, torch::Tensor sin,
                   int64_t heads, int64_t kv_heads, double scale, bool bf16);

}  // namespace boa
