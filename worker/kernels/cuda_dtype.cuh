// Activation dtypes of the CUDA kernels: float or bfloat16 in memory, float in registers. Loads
// widen exactly; stores round to nearest even. Vec<V> moves V consecutive elements in one access
// of V * sizeof(T) bytes, which the caller keeps aligned.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace mamba::kernels {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(bf16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T FromFloat(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return __float2bfloat16_rn(v);
  }
}

template <typename T>
__device__ __forceinline__ float Load(const T* p) {
  return ToFloat(*p);
}
template <typename T>
__device__ __forceinline__ void Store(T* p, float v) {
  *p = FromFloat<T>(v);
}

template <int V>
struct Vec {
  float v[V];
};

namespace internal {

// The bf16 pair packed in a 32-bit word (low half first in memory), widened.
__device__ __forceinline__ float LowBf16(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float HighBf16(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

}  // namespace internal

template <int V, typename T>
__device__ __forceinline__ Vec<V> LoadVec(const T* p) {
  static_assert(V == 1 || V == 2 || V == 4);
  Vec<V> r;
  if constexpr (V == 1) {
    r.v[0] = Load(p);
  } else if constexpr (std::is_same_v<T, float>) {
    if constexpr (V == 4) {
      const float4 f = *reinterpret_cast<const float4*>(p);
      r.v[0] = f.x, r.v[1] = f.y, r.v[2] = f.z, r.v[3] = f.w;
    } else {
      const float2 f = *reinterpret_cast<const float2*>(p);
      r.v[0] = f.x, r.v[1] = f.y;
    }
  } else {
    static_assert(std::is_same_v<T, bf16>);
    uint32_t w[V / 2];
    if constexpr (V == 4) {
      const uint2 q = *reinterpret_cast<const uint2*>(p);
      w[0] = q.x, w[1] = q.y;
    } else {
      w[0] = *reinterpret_cast<const uint32_t*>(p);
    }
#pragma unroll
    for (int i = 0; i < V / 2; ++i) {
      r.v[2 * i] = internal::LowBf16(w[i]);
      r.v[2 * i + 1] = internal::HighBf16(w[i]);
    }
  }
  return r;
}

template <int V, typename T>
__device__ __forceinline__ void StoreVec(T* p, const Vec<V>& r) {
  static_assert(V == 1 || V == 2 || V == 4);
  if constexpr (V == 1) {
    Store(p, r.v[0]);
  } else if constexpr (std::is_same_v<T, float>) {
    if constexpr (V == 4) {
      *reinterpret_cast<float4*>(p) = make_float4(r.v[0], r.v[1], r.v[2], r.v[3]);
    } else {
      *reinterpret_cast<float2*>(p) = make_float2(r.v[0], r.v[1]);
    }
  } else {
    static_assert(std::is_same_v<T, bf16>);
    uint32_t w[V / 2];
#pragma unroll
    for (int i = 0; i < V / 2; ++i) w[i] = internal::PackBf16(r.v[2 * i], r.v[2 * i + 1]);
    if constexpr (V == 4) {
      *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
    } else {
      *reinterpret_cast<uint32_t*>(p) = w[0];
    }
  }
}

template <int V>
__device__ __forceinline__ Vec<V> ZeroVec() {
  Vec<V> r;
#pragma unroll
  for (int v = 0; v < V; ++v) r.v[v] = 0.f;
  return r;
}

}  // namespace mamba::kernels
