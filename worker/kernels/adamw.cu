#include "worker/kernels/adamw.h"
#include "worker/kernels/cuda_check.h"

namespace mamba::kernels {
namespace {

constexpr int kThreads = 256;

__global__ void AdamWKernel(int64_t n, float* __restrict__ p, const float* __restrict__ g,
                            float* __restrict__ m, float* __restrict__ v, AdamWCoefficients c) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float gi = g[i];
    const float mi = c.beta1 * m[i] + (1.f - c.beta1) * gi;
    const float vi = c.beta2 * v[i] + (1.f - c.beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * c.decay - c.step_size * mi / (sqrtf(vi) / c.sqrt_bc2 + c.eps);
  }
}

}  // namespace

void AdamWCuda(int64_t n, float* param, const float* grad, float* m, float* v,
               const AdamWCoefficients& c, cudaStream_t stream) {
  if (n == 0) return;
  unsigned int blocks = GridFor(n, kThreads);
  if (blocks > 1048576u) blocks = 1048576u;
  AdamWKernel<<<blocks, kThreads, 0, stream>>>(n, param, grad, m, v, c);
  MAMBA_CUDA_CHECK_LAUNCH("adamw");
}

}  // namespace mamba::kernels
