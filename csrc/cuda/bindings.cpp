// Python bindings of the CUDA extension (built on first use by boa_kernels/loader.py): the op's shared tensor checks
// (boa/compensate_args.h), then the launcher of csrc/cuda/compensate.cu on the current stream.
#include <torch/extension.h>

#include "boa/compensate_args.h"

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compensate_block_", &compensate_block_cuda,
        "Quantize columns start..stop-1 of a block with error compensation, in place (csrc/cuda/compensate.cu)");
}
