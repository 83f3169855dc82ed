// float32 <-> bfloat16 conversions on the GPU (the shadow weights, the GEMMs' operand rounding).
// Launched on `stream`, asynchronous. dst and src must not overlap.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mamba::kernels {

// dst (n bf16) = src rounded to nearest even (NaN stays NaN).
void FloatToBf16Cuda(int64_t n, const float* src, void* dst, cudaStream_t stream);
// dst (n floats) = src (n bf16), exactly.
void Bf16ToFloatCuda(int64_t n, const void* src, float* dst, cudaStream_t stream);

}  // namespace mamba::kernels
