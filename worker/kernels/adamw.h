// Fused AdamW step on the GPU (float32), torch.optim.AdamW semantics (decoupled weight decay),
// the same float arithmetic as the CPU backend's loop:
//   g = grad * grad_scale
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p = p * decay - step_size * m / (sqrt(v) / sqrt_bc2 + eps)
// with decay = 1 - lr * wd, step_size = lr / (1 - b1^t), sqrt_bc2 = sqrt(1 - b2^t) computed on the
// host in double, grad_scale the float clipping coefficient. One pass over p, g, m, v (any number
// of parameters laid out back to back), also writing p rounded to bf16 (nearest even) to
// param_bf16 when it is not null.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mamba::kernels {

struct AdamWCoefficients {
  float beta1, beta2, eps, decay, step_size, sqrt_bc2, grad_scale;
};

void AdamWCuda(int64_t n, float* param, const float* grad, float* m, float* v, void* param_bf16,
               const AdamWCoefficients& c, cudaStream_t stream);

}  // namespace mamba::kernels
