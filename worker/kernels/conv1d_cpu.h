// Depthwise causal conv1d along L, CPU reference. Channel-last x, y, dx, dy: (B, L, C);
// weight, dweight: (C, K); bias, dbias: (C), nullable; prefix, dprefix: (B, K-1, C), nullable.
//   pre[b, t, c] = bias[c] + sum_k weight[c, k] * x[b, t - (K-1) + k, c]
// Positions before 0 read from `prefix` (the previous sequence-parallel rank's last K-1 positions)
// when it is non-null, else zero.  y = silu(pre) when `silu`, else pre. y must not alias x.
#pragma once

#include <cstdint>

namespace mamba::kernels {

template <typename T>
void CausalConv1dForwardCpu(int64_t B, int64_t L, int64_t C, int64_t K, const T* x, const T* weight,
                            const T* bias, const T* prefix, bool silu, T* y);

// Recomputes pre when silu. dx overwritten; dweight +=; dbias (nullable) +=; dprefix (nullable)
// overwritten with the gradient to send back to the previous rank. Parameter gradients are
// deterministic: fixed channel chunks, each summed in (b, t) order.
template <typename T>
void CausalConv1dBackwardCpu(int64_t B, int64_t L, int64_t C, int64_t K, const T* x,
                             const T* weight, const T* bias, const T* prefix, bool silu,
                             const T* dy, T* dx, T* dweight, T* dbias, T* dprefix);

}  // namespace mamba::kernels
