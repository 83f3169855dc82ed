// Linear layer on the GPU through cuBLAS, the same contract as linear_cpu.h:
//   y(M, N) = x(M, K) w(N, K)^T + bias;   dx = dy w (overwritten);   dw += dy^T x;
//   dbias += column sums of dy.
// Row-major operands are handed to column-major cuBLAS as their transposes. Precision of the GEMMs:
//   kFp32: full fp32 (CUBLAS_COMPUTE_32F_PEDANTIC: no TF32, no reduced-precision shortcuts);
//   kTf32: cuBLAS may use TF32 tensor cores (CUBLAS_COMPUTE_32F_FAST_TF32);
//   kBf16: mamba_ssm's AMP for linears: bf16 operands multiplied on tensor cores with fp32
//          accumulation (CUDA_R_16BF inputs, CUBLAS_COMPUTE_32F). x, w and dy may each be fp32 or
//          bf16: fp32 ones are rounded to bf16 (nearest even) in the workspace, bf16 ones are used
//          as they are. y and dx may each be fp32 or bf16 (rounded once from the fp32
//          accumulator); dw is fp32 and accumulates in fp32 (beta 1).
// In kFp32 and kTf32 modes every matrix is fp32. bias and dbias are fp32; with a bias and a bf16
// y, the bias is rounded to bf16 before the product is added to it.
// Every mode is deterministic for a fixed shape on one stream: cuBLAS's default algorithms with
// atomics disallowed (the caller's handle: cublasSetAtomicsMode NOT_ALLOWED), no split-K
// reductions across streams. dbias is deterministic: fixed row chunks (a function of M only) of
// double partial sums of dy (as it is, fp32 or bf16), added in chunk order.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mamba::kernels {

enum class GemmPrecision { kFp32, kTf32, kBf16 };

// A row-major device matrix of fp32 or bf16 elements (inputs are only read); data is null for an
// absent optional output.
struct GemmMatrix {
  void* data = nullptr;
  bool bf16 = false;
};

// Scratch the forward needs (bf16 copies of the fp32 operands in kBf16 mode; zero otherwise).
size_t LinearForwardWorkspaceBytes(GemmPrecision precision, int64_t M, int64_t N, int64_t K,
                                   GemmMatrix x, GemmMatrix w);

// `handle` must already be bound to `stream` (cublasSetStream).
void LinearForwardCuda(cublasHandle_t handle, GemmPrecision precision, int64_t M, int64_t N,
                       int64_t K, GemmMatrix x, GemmMatrix w, const float* bias, GemmMatrix y,
                       void* workspace, cudaStream_t stream);

size_t LinearBackwardWorkspaceBytes(GemmPrecision precision, int64_t M, int64_t N, int64_t K,
                                    GemmMatrix dy, GemmMatrix x, GemmMatrix w, GemmMatrix dx);
// dx (data) and dbias may be null.
// accumulate_dx: dx += dy w (beta 1) instead of dx = dy w.
void LinearBackwardCuda(cublasHandle_t handle, GemmPrecision precision, int64_t M, int64_t N,
                        int64_t K, GemmMatrix dy, GemmMatrix x, GemmMatrix w, GemmMatrix dx,
                        bool accumulate_dx, float* dw, float* dbias, void* workspace,
                        cudaStream_t stream);

}  // namespace mamba::kernels
