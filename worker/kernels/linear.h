// Linear layer on the GPU (float32) through cuBLAS, the same contract as linear_cpu.h:
//   y(M, N) = x(M, K) w(N, K)^T + bias;   dx = dy w (overwritten);   dw += dy^T x;
//   dbias += column sums of dy.
// Row-major operands are handed to column-major cuBLAS as their transposes. With tf32 false the
// GEMMs compute in full fp32 (CUBLAS_COMPUTE_32F_PEDANTIC: no TF32, no reduced-precision
// shortcuts); with tf32 true cuBLAS may use TF32 tensor cores. dbias is deterministic: fixed row
// chunks (a function of M only) of double partial sums, added in chunk order.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mamba::kernels {

// `handle` must already be bound to `stream` (cublasSetStream).
void LinearForwardCuda(cublasHandle_t handle, bool tf32, int64_t M, int64_t N, int64_t K,
                       const float* x, const float* w, const float* bias, float* y,
                       cudaStream_t stream);

size_t LinearBackwardWorkspaceBytes(int64_t M, int64_t N);
// dx and dbias may be null.
void LinearBackwardCuda(cublasHandle_t handle, bool tf32, int64_t M, int64_t N, int64_t K,
                        const float* dy, const float* x, const float* w, float* dx, float* dw,
                        float* dbias, void* workspace, cudaStream_t stream);

}  // namespace mamba::kernels
