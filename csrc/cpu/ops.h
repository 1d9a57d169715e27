// The CPU extension's operators (one source file each); bindings.cpp exposes them to Python as boa_kernels' `cpp`.
#pragma once

#include <torch/extension.h>

namespace boa {

// csrc/cpu/compensate.cpp
void compensate_block_(torch::Tensor W1, torch::Tensor E1, torch::Tensor codes, torch::Tensor U1,
                       torch::Tensor scale, torch::Tensor zero, torch::Tensor group_of, double maxq,
                       int64_t start, int64_t stop);

}  // namespace boa
