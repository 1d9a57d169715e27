// The unnormalised fast Walsh–Hadamard transform of one block, shared by the C++ CPU kernel (csrc/cpu/hadamard.cpp)
// and any GPU port: x ↦ x · S for S Sylvester's ±1 matrix of a power-of-two order n, in place. Passes h = 1, 2, 4, …
// replace each pair (j, j + h) of every run of 2h by (x_j + x_{j+h}, x_j − x_{j+h}), in the order of the torch
// reference's passes (boa_kernels/hadamard.py), so every output is the same chain of float additions: bit-identical.
// (boa.transforms.hadamard.fast_walsh_hadamard forms the same x · S by products with Sylvester factors: equal to fp32
// rounding.)
#pragma once

#include <cstdint>

#include "boa/host_device.h"

namespace boa {

BOA_HD bool is_power_of_two(int64_t n) { return n > 0 && (n & (n - 1)) == 0; }

template <typename T>
BOA_HD void walsh_hadamard(T* x, int64_t n) {
  for (int64_t h = 1; h < n; h *= 2)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const T a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
}

}  // namespace boa
