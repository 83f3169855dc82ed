// SiLU on the GPU (float32), the same math as silu_cpu.h: y = x * sigmoid(x) with an
// overflow-free sigmoid; backward dx = dy * silu'(x). Launched on `stream`, asynchronous.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mamba::kernels {

void SiluForwardCuda(int64_t n, const float* x, float* y, cudaStream_t stream);
void SiluBackwardCuda(int64_t n, const float* x, const float* dy, float* dx, cudaStream_t stream);

}  // namespace mamba::kernels
