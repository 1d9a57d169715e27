// BOA_HD marks the per-element functions that both the C++ CPU build and the CUDA kernels compile.
#pragma once

#if defined(__CUDACC__)
#define BOA_HD __host__ __device__ __forceinline__
#else
#define BOA_HD inline
#endif
