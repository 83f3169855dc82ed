// Fused residual add + RMSNorm on the GPU, the same contract as rmsnorm_cpu.h (including the
// aliasing it allows: residual_out may alias residual_in, y may alias x, dx may alias dy or
// dresidual_out, each when they share a dtype). One block per row; row sums in float by a fixed
// tree. The residual stream (residual_in, residual_out, dresidual_out, dx), weight and rstd are
// float; x, y (TX, TY) and dy (T) are float or __nv_bfloat16, computed in float.
//
// The backward's dweight is deterministic: fixed row chunks (a function of `rows` only) each
// write double partial sums, which one pass adds in chunk order.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mamba::kernels {

template <typename TX, typename TY>
void AddRmsNormForwardCuda(int64_t rows, int64_t dim, const float* residual_in, const TX* x,
                           const float* weight, float eps, float* residual_out, TY* y, float* rstd,
                           cudaStream_t stream);

size_t AddRmsNormBackwardWorkspaceBytes(int64_t rows, int64_t dim);
template <typename T>
// dx_bf16 (nullable): dx rounded to bf16, written in the same pass (the next GEMM's operand).
void AddRmsNormBackwardCuda(int64_t rows, int64_t dim, const T* dy, const float* dresidual_out,
                            const float* residual_out, const float* weight, const float* rstd,
                            float* dx, __nv_bfloat16* dx_bf16, float* dweight, void* workspace,
                            cudaStream_t stream);

}  // namespace mamba::kernels
