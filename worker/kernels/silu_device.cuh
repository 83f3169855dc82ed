// Device-side SiLU helpers shared by the SiLU and conv1d kernels (the CPU twins live in
// silu_cpu.h).
#pragma once

namespace mamba::kernels {

// 1 / (1 + 2^(-x log2 e)) with the hardware exp2 and reciprocal (relative error ~2^-22): 4
// instructions instead of a branch, expf and an IEEE division, which made the conv kernels
// instruction-bound. Saturates cleanly: exp2 overflows to inf (sigmoid 0) or underflows to 0
// (sigmoid 1).
__device__ __forceinline__ float StableSigmoidF(float x) {
  float e, r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(-x * 1.4426950408889634f));
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.f + e));
  return r;
}

__device__ __forceinline__ float SiluGradF(float x) {
  const float s = StableSigmoidF(x);
  return s * (1.f + x * (1.f - s));
}

}  // namespace mamba::kernels
