// Linear layer on the GPU (float32) through cuBLAS, the same contract as linear_cpu.h:
//   y(M, N) = x(M, K) w(N, K)^T + bias;   dx = dy w (overwritten);   dw += dy^T x;
//   dbias += column sums of dy.
// Row-major operands are handed to column-major cuBLAS as their transposes. Precision of the GEMMs:
//   kFp32: full fp32 (CUBLAS_COMPUTE_32F_PEDANTIC: no TF32, no reduced-precision shortcuts);
//   kTf32: cuBLAS may use TF32 tensor cores (CUBLAS_COMPUTE_32F_FAST_TF32);
//   kBf16: mamba_ssm's AMP for linears: the fp32 operands are rounded to bf16 (nearest even) in
//          the workspace and multiplied on tensor cores with fp32 accumulation (CUDA_R_16BF
//          inputs, CUBLAS_COMPUTE_32F); outputs stay fp32 and dw accumulates in fp32 (beta 1).
// Every mode is deterministic for a fixed shape on one stream: cuBLAS's default algorithms with
// atomics disallowed (the caller's handle: cublasSetAtomicsMode NOT_ALLOWED), no split-K
// reductions across streams. dbias is deterministic: fixed row chunks (a function of M only) of
// double partial sums, added in chunk order; it is summed from the fp32 dy in every mode.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mamba::kernels {

enum class GemmPrecision { kFp32, kTf32, kBf16 };

// Scratch the forward needs (bf16 copies of x and w in kBf16 mode; zero otherwise).
size_t LinearForwardWorkspaceBytes(GemmPrecision precision, int64_t M, int64_t N, int64_t K);

// `handle` must already be bound to `stream` (cublasSetStream).
void LinearForwardCuda(cublasHandle_t handle, GemmPrecision precision, int64_t M, int64_t N,
                       int64_t K, const float* x, const float* w, const float* bias, float* y,
                       void* workspace, cudaStream_t stream);

size_t LinearBackwardWorkspaceBytes(GemmPrecision precision, int64_t M, int64_t N, int64_t K);
// dx and dbias may be null.
void LinearBackwardCuda(cublasHandle_t handle, GemmPrecision precision, int64_t M, int64_t N,
                        int64_t K, const float* dy, const float* x, const float* w, float* dx,
                        float* dw, float* dbias, void* workspace, cudaStream_t stream);

}  // namespace mamba::kernels
