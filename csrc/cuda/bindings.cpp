// Python bindings of the CUDA extension (built on first use by boa_kernels/loader.py): the tensor checks of the CPU
// op (csrc/cpu/compensate.cpp), then the launcher of csrc/cuda/compensate.cu on the current stream.
#include <torch/extension.h>

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
  for (const auto& t : {E1, codes, U1, scale, zero, group_of})
    TORCH_CHECK(t.device() == W1.device(), "all tensors must be on W1's device");
  TORCH_CHECK(W1.dim() == 3 && W1.is_contiguous() && E1.is_contiguous() && codes.is_contiguous(),
              "W1, E1, codes must be contiguous (b, R, B)");
  TORCH_CHECK(E1.sizes() == W1.sizes() && codes.sizes() == W1.sizes(), "E1 and codes must be shaped like W1");
  const int64_t b = W1.size(0), R = W1.size(1), B = W1.size(2);
  TORCH_CHECK(U1.dim() == 3 && U1.is_contiguous() && U1.size(1) == B && U1.size(2) == B &&
                  (U1.size(0) == 1 || U1.size(0) == b),
              "U1 must be contiguous (1 or b, B, B)");
  TORCH_CHECK(scale.is_contiguous() && zero.is_contiguous() && scale.dim() == 3 && scale.sizes() == zero.sizes() &&
                  scale.size(0) == b && scale.size(1) == R,
              "scale and zero must be contiguous (b, R, G)");
  TORCH_CHECK(group_of.scalar_type() == torch::kInt64 && group_of.is_contiguous() && group_of.numel() == B,
              "group_of must be a contiguous int64 tensor of B entries");
  TORCH_CHECK(0 <= start && start <= stop && stop <= B, "need 0 <= start <= stop <= B");
  for (const auto& t : {E1, codes, U1, scale, zero})
    TORCH_CHECK(t.scalar_type() == W1.scalar_type(), "all float tensors must share W1's dtype");
  // group_of's values stay on the device (reading them here would sync); the kernel asserts their range.

  const c10::cuda::CUDAGuard device_guard(W1.device());
  AT_DISPATCH_FLOATING_TYPES(W1.scalar_type(), "compensate_block_", [&] {
    C10_CUDA_CHECK(boa::launch_compensate_block<scalar_t>(
        W1.data_ptr<scalar_t>(), E1.data_ptr<scalar_t>(), codes.data_ptr<scalar_t>(), U1.data_ptr<scalar_t>(),
        scale.data_ptr<scalar_t>(), zero.data_ptr<scalar_t>(), group_of.data_ptr<int64_t>(), b * R, R, B,
        scale.size(2), U1.size(0) == 1, static_cast<scalar_t>(maxq), start, stop,
        c10::cuda::getCurrentCUDAStream()));
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compensate_block_", &compensate_block_cuda,
        "Quantize columns start..stop-1 of a block with error compensation, in place (csrc/cuda/compensate.cu)");
}
