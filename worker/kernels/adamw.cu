#include <cuda_bf16.h>

#include "worker/kernels/adamw.h"
#include "worker/kernels/cuda_check.h"

namespace mamba::kernels {
namespace {

constexpr int kThreads = 256;

template <bool kShadow>
__global__ void AdamWKernel(int64_t n, float* __restrict__ p, const float* __restrict__ g,
                            float* __restrict__ m, float* __restrict__ v,
                            __nv_bfloat16* __restrict__ p_bf16, AdamWCoefficients c) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    // Rounded to float before use, as a separate scaling pass would store it.
    const float gi = __fmul_rn(g[i], c.grad_scale);
    const float mi = c.beta1 * m[i] + (1.f - c.beta1) * gi;
    const float vi = c.beta2 * v[i] + (1.f - c.beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float pi = p[i] * c.decay - c.step_size * mi / (sqrtf(vi) / c.sqrt_bc2 + c.eps);
    p[i] = pi;
    if (kShadow) p_bf16[i] = __float2bfloat16_rn(pi);
  }
}

}  // namespace

void AdamWCuda(int64_t n, float* param, const float* grad, float* m, float* v, void* param_bf16,
               const AdamWCoefficients& c, cudaStream_t stream) {
  if (n == 0) return;
  unsigned int blocks = GridFor(n, kThreads);
  if (blocks > 1048576u) blocks = 1048576u;
  auto* shadow = static_cast<__nv_bfloat16*>(param_bf16);
  if (shadow) {
    AdamWKernel<true><<<blocks, kThreads, 0, stream>>>(n, param, grad, m, v, shadow, c);
  } else {
    AdamWKernel<false><<<blocks, kThreads, 0, stream>>>(n, param, grad, m, v, shadow, c);
  }
  MAMBA_CUDA_CHECK_LAUNCH("adamw");
}

}  // namespace mamba::kernels
