// Elementwise helpers and the deterministic sum of squares on the GPU (float32, except where a
// template says otherwise); the CPU twins are the loops in cpu_backend.cc. All launched on
// `stream`, asynchronous.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mamba::kernels {

void NegExpCuda(int64_t n, const float* x, float* y, cudaStream_t stream);  // y = -exp(x)
void AddProductCuda(int64_t n, const float* a, const float* b, float* dst,
                    cudaStream_t stream);  // dst += a*b
// dst += src in float, rounded to TD; TS and TD are float or __nv_bfloat16, in any mix.
template <typename TS, typename TD>
void AddCuda(int64_t n, const TS* src, TD* dst, cudaStream_t stream);
void ScaleCuda(int64_t n, float* x, float s, cudaStream_t stream);  // x *= s

// Row-major 2-D copy: `rows` rows of `row_bytes`, source and destination row strides in bytes.
// One thread per 4-byte word when every row start and length is 4-byte aligned (the model's
// column blocks of bf16 and fp32 matrices), else per byte. Replaces cudaMemcpy2DAsync, which took
// ~14 us for the model's narrow (32-96 byte) rows.
void Copy2DCuda(const void* src, int64_t src_pitch, void* dst, int64_t dst_pitch, int64_t row_bytes,
                int64_t rows, cudaStream_t stream);

// A device array of n floats.
struct FloatSpan {
  const float* data;
  int64_t n;
};

// *result (device) = sum of x[i]^2 over the elements of spans xs[0, count), accumulated in double.
// Deterministic: a fixed number of partial sums per span (independent of the device), each over a
// fixed stride, combined by a fixed tree.
size_t SumSquaresWorkspaceBytes(size_t count);
void SumSquaresCuda(const FloatSpan* xs, size_t count, double* result, void* workspace,
                    cudaStream_t stream);

}  // namespace mamba::kernels
