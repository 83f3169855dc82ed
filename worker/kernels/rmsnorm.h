// Fused residual add + RMSNorm on the GPU (float32), the same contract as rmsnorm_cpu.h
// (including the aliasing it allows: residual_out may alias residual_in, y may alias x, dx may
// alias dy or dresidual_out). One block per row; row sums in float by a fixed tree.
//
// The backward's dweight is deterministic: fixed row chunks (a function of `rows` only) each
// write double partial sums, which one pass adds in chunk order.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mamba::kernels {

void AddRmsNormForwardCuda(int64_t rows, int64_t dim, const float* residual_in, const float* x,
                           const float* weight, float eps, float* residual_out, float* y,
                           float* rstd, cudaStream_t stream);

size_t AddRmsNormBackwardWorkspaceBytes(int64_t rows, int64_t dim);
void AddRmsNormBackwardCuda(int64_t rows, int64_t dim, const float* dy, const float* dresidual_out,
                            const float* residual_out, const float* weight, const float* rstd,
                            float* dx, float* dweight, void* workspace, cudaStream_t stream);

}  // namespace mamba::kernels
