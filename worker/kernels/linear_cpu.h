#pragma once
#include <cstdint>
namespace mamba::kernels {
template <typename T> void LinearForwardCpu(int64_t M, int64_t N, int64_t K, const T* x, const T* w, const T* bias, T* y);
template <typename T> void LinearBackwardCpu(int64_t M, int64_t N, int64_t K, const T* dy, const T* x, const T* w, T* dx, T* dw, T* dbias);
}
