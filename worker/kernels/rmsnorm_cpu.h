#pragma once
#include <cstdint>
namespace mamba::kernels {
template <typename T> void AddRmsNormForwardCpu(int64_t rows, int64_t dim, const T* residual_in, const T* x, const T* weight, T eps, T* residual_out, T* y, T* rstd);
template <typename T> void AddRmsNormBackwardCpu(int64_t rows, int64_t dim, const T* dy, const T* dresidual_out, const T* residual_out, const T* weight, const T* rstd, T* dx, T* dweight);
}
