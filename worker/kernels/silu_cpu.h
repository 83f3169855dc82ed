#pragma once
#include <cstdint>
namespace mamba::kernels {
template <typename T> void SiluForwardCpu(int64_t n, const T* x, T* y);
template <typename T> void SiluBackwardCpu(int64_t n, const T* x, const T* dy, T* dx);
}
