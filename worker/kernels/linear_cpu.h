// Linear layer, CPU reference on BLAS gemm, weights in torch's (out, in) layout:
//   y(M, N) = x(M, K) * w(N, K)^T + bias(N)
#pragma once

#include <cstdint>

namespace mamba::kernels {

// bias may be null.
template <typename T>
void LinearForwardCpu(int64_t M, int64_t N, int64_t K, const T* x, const T* w, const T* bias, T* y);

// dx (nullable) = dy * w, or dx += dy * w with accumulate_dx;  dw += dy^T * x;  dbias (nullable)
// += column sums of dy. dbias is summed in double in row order; the summation order inside dw's
// gemm is the BLAS library's.
template <typename T>
void LinearBackwardCpu(int64_t M, int64_t N, int64_t K, const T* dy, const T* x, const T* w, T* dx,
                       T* dw, T* dbias, bool accumulate_dx = false);

}  // namespace mamba::kernels
