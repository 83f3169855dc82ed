// SiLU on the GPU, the same math as silu_cpu.h: y = x * sigmoid(x) with an overflow-free
// sigmoid; backward dx = dy * silu'(x). T is float or __nv_bfloat16 (computed in float). Launched
// on `stream`, asynchronous.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mamba::kernels {

template <typename T>
void SiluForwardCuda(int64_t n, const T* x, T* y, cudaStream_t stream);
template <typename T>
void SiluBackwardCuda(int64_t n, const T* x, const T* dy, T* dx, cudaStream_t stream);

}  // namespace mamba::kernels
