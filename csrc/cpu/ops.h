// The CPU extension's operators (one source file each); bindings.cpp exposes them to Python as boa_kernels' `cpp`.
#pragma once

#include <torch/extension.h>

namespace boa {

// csrc/cpu/compensate.cpp
void compensate_block_(torch::Tensor W1, torch::Tensor E1, torch::Tensor codes, torch::Tensor U1,
                       torch::Tensor scale, torch::Tensor zero, torch::Tensor group_of, double maxq,
                       int64_t start, int64_t stop);

// csrc/cpu/packed_matmul.cpp: y = x · Wᵀ (+ bias), W in boa's packed layout (boa/export/packed.py)
constexpr int64_t kGemvMaxBatch = 8;  // larger batches dequantize blocks of rows and use BLAS
torch::Tensor packed_matmul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                            c10::optional<torch::Tensor> perm, c10::optional<torch::Tensor> bias, int64_t bits,
                            int64_t group_size);
std::string packed_isa();  // the instruction set packed_matmul was compiled for: avx512, avx2 or portable
torch::Tensor unpack_codes(torch::Tensor qweight, int64_t bits);  // codes (out, in_pad) via boa/packed_math.h

}  // namespace boa
