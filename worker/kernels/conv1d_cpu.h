#pragma once
#include <cstdint>
namespace mamba::kernels {
template <typename T> void CausalConv1dForwardCpu(int64_t B, int64_t L, int64_t C, int64_t K, const T* x, const T* weight, const T* bias, const T* prefix, bool silu, T* y);
template <typename T> void CausalConv1dBackwardCpu(int64_t B, int64_t L, int64_t C, int64_t K, const T* x, const T* weight, const T* bias, const T* prefix, bool silu, const T* dy, T* dx, T* dweight, T* dbias, T* dprefix);
}
