// Python bindings of the CPU extension (built on first use by boa_kernels/loader.py).
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compensate_block_", &boa::compensate_block_,
        "Quantize columns start..stop-1 of a block with error compensation, in place (csrc/cpu/compensate.cpp)");
}
