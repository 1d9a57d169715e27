// Python bindings of the CPU extension (built on first use by boa_kernels/loader.py).
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compensate_block_", &boa::compensate_block_,
        "Quantize columns start..stop-1 of a block with error compensation, in place (csrc/cpu/compensate.cpp)");
  m.def("packed_matmul", &boa::packed_matmul, "y = x · Wᵀ (+ bias) with W packed (csrc/cpu/packed_matmul.cpp)",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("perm"), py::arg("bias"),
        py::arg("bits"), py::arg("group_size"));
  m.def("relaxed_error", &boa::relaxed_error, "aespa: the relaxed weights' error E (csrc/cpu/rounding.cpp)");
  m.def("rounding_adam_step_", &boa::rounding_adam_step_,
        "aespa: gradient of the relaxed loss and one Adam update of V, m, v in place (csrc/cpu/rounding.cpp)");
  m.def("packed_isa", &boa::packed_isa, "the instruction set the packed kernels were compiled for");
  m.def("unpack_codes", &boa::unpack_codes, "codes (out, in_pad) of a packed weight, element by element");
  m.def("int8_matmul", &boa::int8_matmul,
        "y = x · Wᵀ (+ bias) with x quantized per token and W packed, in integers (csrc/cpu/int8_matmul.cpp)",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("perm"), py::arg("bias"),
        py::arg("bits"), py::arg("group_size"), py::arg("a_bits"), py::arg("clip_ratio"));
  m.def("int8_isa", &boa::int8_isa, "the instruction set the int8 kernel was compiled for");
  m.def("decode_layer_", &boa::decode_layer_,
        "one Llama-family decoder layer for one token, x and the KV cache in place (csrc/cpu/decode_layer.cpp)");
  m.def("hadamard_transform", &boa::hadamard_transform,
        "y = (x · diag(signs)) · (K ⊗ S) · scale along the last axis (csrc/cpu/hadamard.cpp)", py::arg("x"),
        py::arg("signs"), py::arg("core"), py::arg("scale"));
}
