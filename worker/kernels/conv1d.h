// Depthwise causal conv1d (+ optional SiLU) on the GPU, the same contract as conv1d_cpu.h:
// x, y, dx, dy (B, L, C); weight (C, K); bias (C) nullable; prefix and dprefix (B, K-1, C)
// nullable. K is at most kConv1dMaxK. The activations (x, prefix, y, dy, dx, dprefix) are T, float
// or __nv_bfloat16, computed in float; the parameters and their gradients are float.
//
// Backward: one fused pass over (time tile x channel) blocks; dx may alias dy. dweight and
// dbias are deterministic: per-tile partials (fp32 over 16 steps, double across a block's runs)
// added in tile order in double; the tiling is a function of (L, C) only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mamba::kernels {

inline constexpr int64_t kConv1dMaxK = 8;

template <typename T>
void CausalConv1dForwardCuda(int64_t B, int64_t L, int64_t C, int64_t K, const T* x,
                             const float* weight, const float* bias, const T* prefix, bool silu,
                             T* y, cudaStream_t stream);

size_t CausalConv1dBackwardWorkspaceBytes(int64_t B, int64_t L, int64_t C, int64_t K);
template <typename T>
void CausalConv1dBackwardCuda(int64_t B, int64_t L, int64_t C, int64_t K, const T* x,
                              const float* weight, const float* bias, const T* prefix, bool silu,
                              const T* dy, T* dx, float* dweight, float* dbias, T* dprefix,
                              void* workspace, cudaStream_t stream);

}  // namespace mamba::kernels
