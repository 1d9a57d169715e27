// Python bindings of the CUDA extension (built on first use by boa_kernels/loader.py): each op's shared tensor checks
// (boa/compensate_args.h, boa/packed_args.h), then its launcher (csrc/cuda/compensate.cu, packed_gemv.cu) on the
// current stream.
#include <torch/extension.h>

#include <cstdint>

#include "boa/compensate_args.h"
#include "boa/packed_args.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace boa {

// csrc/cuda/compensate.cu (instantiated there for float and double)
template <typename T>
cudaError_t launch_compensate_block(T* W, T* E, T* C, const T* U, const T* scale, const T* zero,
                                    const int64_t* group_of, int64_t rows, int64_t rows_per_matrix, int64_t B,
                                    int64_t G, bool shared_U, T maxq, int64_t start, int64_t stop,
                                    cudaStream_t stream);

// csrc/cuda/packed_gemv.cu; x_kind: 0 float32, 1 float16, 2 bfloat16 (x and y)
cudaError_t launch_packed_gemv(const void* x, int x_kind, const uint8_t* qweight, const float* scales,
                               const uint8_t* zeros, const int32_t* perm, const void* bias, bool bias_is_float,
                               void* y, int64_t batch, int64_t in, int64_t out, int64_t groups, int64_t group_size,
                               int bits, cudaStream_t stream);

}  // namespace boa

namespace {

void compensate_block_cuda(torch::Tensor W1, torch::Tensor E1, torch::Tensor codes, torch::Tensor U1,
                           torch::Tensor scale, torch::Tensor zero, torch::Tensor group_of, double maxq,
                           int64_t start, int64_t stop) {
  TORCH_CHECK(W1.is_cuda(), "W1 must be a CUDA tensor");
  const boa::CompensateSizes n = boa::check_compensate_args(W1, E1, codes, U1, scale, zero, group_of, start, stop);
  // group_of's values stay on the device (reading them here would sync); the kernel asserts their range.

  const c10::cuda::CUDAGuard device_guard(W1.device());
  AT_DISPATCH_FLOATING_TYPES(W1.scalar_type(), "compensate_block_", [&] {
    C10_CUDA_CHECK(boa::launch_compensate_block<scalar_t>(
        W1.data_ptr<scalar_t>(), E1.data_ptr<scalar_t>(), codes.data_ptr<scalar_t>(), U1.data_ptr<scalar_t>(),
        scale.data_ptr<scalar_t>(), zero.data_ptr<scalar_t>(), group_of.data_ptr<int64_t>(), n.b * n.R, n.R, n.B,
        n.G, U1.size(0) == 1, static_cast<scalar_t>(maxq), start, stop,
        c10::cuda::getCurrentCUDAStream()));
  });
}

// The CPU op's contract (csrc/cpu/packed_matmul.cpp): y (batch, out) in x's dtype, fp32 accumulation. x of another
// float dtype runs as float32; bias of neither float32 nor x's dtype is converted to float32.
torch::Tensor packed_gemv_cuda(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                               c10::optional<torch::Tensor> perm, c10::optional<torch::Tensor> bias, int64_t bits,
                               int64_t group_size) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor; on the CPU use the C++ extension's packed_matmul");
  const boa::PackedSizes n = boa::check_packed_args(x, qweight, scales, zeros, perm, bias, bits, group_size);
  const c10::cuda::CUDAGuard device_guard(x.device());

  const auto type = x.scalar_type();
  const bool native = type == torch::kFloat32 || type == torch::kFloat16 || type == torch::kBFloat16;
  const auto xs = (native ? x : x.to(torch::kFloat32)).contiguous();
  const int x_kind = xs.scalar_type() == torch::kFloat32 ? 0 : xs.scalar_type() == torch::kFloat16 ? 1 : 2;
  // The kernel reads tiles with 16-byte loads (8-byte for 3 bits): a view at an odd offset is copied.
  const bool aligned = reinterpret_cast<uintptr_t>(qweight.data_ptr()) % (bits == 3 ? 8 : 16) == 0;
  const auto qw = aligned ? qweight : qweight.clone();
  c10::optional<torch::Tensor> b;
  if (bias) {
    const auto flat = bias->reshape({-1});
    b = (flat.scalar_type() == xs.scalar_type() || flat.scalar_type() == torch::kFloat32)
            ? flat.contiguous()
            : flat.to(torch::kFloat32).contiguous();
  }
  auto y = torch::empty({n.batch, n.out}, xs.options());
  C10_CUDA_CHECK(boa::launch_packed_gemv(
      xs.data_ptr(), x_kind, qw.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<uint8_t>(),
      perm ? perm->data_ptr<int32_t>() : nullptr, b ? b->data_ptr() : nullptr,
      b && b->scalar_type() == torch::kFloat32, y.data_ptr(), n.batch, n.in, n.out, n.groups,
      n.groups == 1 ? n.in_pad : group_size, static_cast<int>(bits), c10::cuda::getCurrentCUDAStream()));
  return native ? y : y.to(type);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compensate_block_", &compensate_block_cuda,
        "Quantize columns start..stop-1 of a block with error compensation, in place (csrc/cuda/compensate.cu)");
  m.def("packed_gemv", &packed_gemv_cuda, "y = x · Wᵀ (+ bias) with W packed, batch 1–8 (csrc/cuda/packed_gemv.cu)",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("perm"), py::arg("bias"),
        py::arg("bits"), py::arg("group_size"));
}
