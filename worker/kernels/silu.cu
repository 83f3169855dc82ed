#include "worker/kernels/cuda_check.h"
#include "worker/kernels/silu.h"
#include "worker/kernels/silu_device.cuh"

namespace mamba::kernels {
namespace {

constexpr int kThreads = 256;

__global__ void SiluForwardKernel(int64_t n, const float* __restrict__ x, float* __restrict__ y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    y[i] = x[i] * StableSigmoidF(x[i]);
  }
}

__global__ void SiluBackwardKernel(int64_t n, const float* x, const float* dy, float* dx) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    dx[i] = dy[i] * SiluGradF(x[i]);
  }
}

unsigned int Blocks(int64_t n) {
  const unsigned int b = GridFor(n, kThreads);
  return b > 65535u * 16 ? 65535u * 16 : b;
}

}  // namespace

void SiluForwardCuda(int64_t n, const float* x, float* y, cudaStream_t stream) {
  if (n == 0) return;
  SiluForwardKernel<<<Blocks(n), kThreads, 0, stream>>>(n, x, y);
  MAMBA_CUDA_CHECK_LAUNCH("silu_fwd");
}

void SiluBackwardCuda(int64_t n, const float* x, const float* dy, float* dx, cudaStream_t stream) {
  if (n == 0) return;
  SiluBackwardKernel<<<Blocks(n), kThreads, 0, stream>>>(n, x, dy, dx);
  MAMBA_CUDA_CHECK_LAUNCH("silu_bwd");
}

}  // namespace mamba::kernels
