// Fused residual add + RMSNorm, CPU reference, over `rows` rows of width `dim` (row-major):
//   residual_out = residual_in + x           (x alone when residual_in is null)
//   rstd         = 1 / sqrt(mean(residual_out^2) + eps)        one per row
//   y            = residual_out * rstd * weight
// Row sums are accumulated in double for either T. Works in place: residual_out may alias
// residual_in, y may alias x, and in the backward dx may alias dy or dresidual_out.
#pragma once

#include <cstdint>

namespace mamba::kernels {

// residual_out, y: (rows, dim); rstd: (rows), kept for the backward.
template <typename T>
void AddRmsNormForwardCpu(int64_t rows, int64_t dim, const T* residual_in, const T* x,
                          const T* weight, T eps, T* residual_out, T* y, T* rstd);

// dx (overwritten) is the gradient w.r.t. residual_out, which is also the gradient w.r.t. both
// residual_in and x: dresidual_out (nullable, the gradient arriving along the residual stream)
// plus the norm's backward of dy. dweight += sum over rows of dy * residual_out * rstd,
// deterministic (fixed row blocks reduced in a fixed order).
template <typename T>
void AddRmsNormBackwardCpu(int64_t rows, int64_t dim, const T* dy, const T* dresidual_out,
                           const T* residual_out, const T* weight, const T* rstd, T* dx,
                           T* dweight);

}  // namespace mamba::kernels
