#include "worker/kernels/cuda_check.h"
#include "worker/kernels/cuda_dtype.cuh"
#include "worker/kernels/silu.h"
#include "worker/kernels/silu_device.cuh"

namespace mamba::kernels {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void SiluForwardKernel(int64_t n, const T* __restrict__ x, T* __restrict__ y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float v = Load(x + i);
    Store(y + i, v * StableSigmoidF(v));
  }
}

template <typename T>
__global__ void SiluBackwardKernel(int64_t n, const T* x, const T* dy, T* dx) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    Store(dx + i, Load(dy + i) * SiluGradF(Load(x + i)));
  }
}

unsigned int Blocks(int64_t n) {
  const unsigned int b = GridFor(n, kThreads);
  return b > 65535u * 16 ? 65535u * 16 : b;
}

}  // namespace

template <typename T>
void SiluForwardCuda(int64_t n, const T* x, T* y, cudaStream_t stream) {
  if (n == 0) return;
  SiluForwardKernel<<<Blocks(n), kThreads, 0, stream>>>(n, x, y);
  MAMBA_CUDA_CHECK_LAUNCH("silu_fwd");
}

template <typename T>
void SiluBackwardCuda(int64_t n, const T* x, const T* dy, T* dx, cudaStream_t stream) {
  if (n == 0) return;
  SiluBackwardKernel<<<Blocks(n), kThreads, 0, stream>>>(n, x, dy, dx);
  MAMBA_CUDA_CHECK_LAUNCH("silu_bwd");
}

template void SiluForwardCuda<float>(int64_t, const float*, float*, cudaStream_t);
template void SiluForwardCuda<bf16>(int64_t, const bf16*, bf16*, cudaStream_t);
template void SiluBackwardCuda<float>(int64_t, const float*, const float*, float*, cudaStream_t);
template void SiluBackwardCuda<bf16>(int64_t, const bf16*, const bf16*, bf16*, cudaStream_t);

}  // namespace mamba::kernels
