// Device-side SiLU helpers shared by the SiLU and conv1d kernels (the CPU twins live in
// silu_cpu.h).
#pragma once

namespace mamba::kernels {

// expf only ever sees a non-positive argument, so neither branch overflows.
__device__ __forceinline__ float StableSigmoidF(float x) {
  if (x >= 0.f) return 1.f / (1.f + expf(-x));
  const float e = expf(x);
  return e / (1.f + e);
}

__device__ __forceinline__ float SiluGradF(float x) {
  const float s = StableSigmoidF(x);
  return s * (1.f + x * (1.f - s));
}

}  // namespace mamba::kernels
