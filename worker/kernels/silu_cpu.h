// SiLU, CPU reference: y = x * sigmoid(x). Also the overflow-free sigmoid the other CPU ops use.
#pragma once

#include <cmath>
#include <cstdint>

namespace mamba::kernels {

// exp() only ever sees a non-positive argument, so neither branch overflows.
template <typename T>
inline T StableSigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + std::exp(-x));
  const T e = std::exp(x);
  return e / (T(1) + e);
}

// d silu / dx = s * (1 + x * (1 - s)), s = sigmoid(x).
template <typename T>
inline T SiluGrad(T x) {
  const T s = StableSigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}

template <typename T>
void SiluForwardCpu(int64_t n, const T* x, T* y);

// dx overwritten = dy * silu'(x).
template <typename T>
void SiluBackwardCpu(int64_t n, const T* x, const T* dy, T* dx);

}  // namespace mamba::kernels
