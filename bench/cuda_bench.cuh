// What the CUDA kernel benchmarks share: a checked CUDA call, device buffers filled with
// reproducible uniform values, and the median time of a piece of stream work measured with CUDA
// events after a warm-up.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>
#include <vector>

#define CHECK_CUDA(x)                                                                         \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

namespace mamba::bench {

// Uniform values in [lo, hi) from a hash of the index and seed (no host round trip).
template <typename T>
__global__ void FillKernel(T* p, int64_t n, uint32_t seed, float lo, float hi) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2654435761u ^ seed * 2246822519u ^ uint32_t(i >> 32) * 3266489917u;
    x ^= x >> 15;
    x *= 2246822519u;
    x ^= x >> 13;
    x *= 3266489917u;
    x ^= x >> 16;
    const float v = lo + (hi - lo) * (x >> 8) * (1.f / 16777216.f);
    if constexpr (std::is_same_v<T, float>) {
      p[i] = v;
    } else {
      p[i] = __float2bfloat16_rn(v);
    }
  }
}

inline void Fill(void* p, int64_t n, bool bf16, uint32_t seed, float lo, float hi) {
  if (bf16) {
    FillKernel<<<1024, 256>>>(static_cast<__nv_bfloat16*>(p), n, seed, lo, hi);
  } else {
    FillKernel<<<1024, 256>>>(static_cast<float*>(p), n, seed, lo, hi);
  }
  CHECK_CUDA(cudaGetLastError());
}

inline void* Alloc(size_t bytes) {
  void* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, bytes));
  return p;
}

// f(i) enqueues run i's work on the default stream; warm-up runs first, then the median of runs.
template <typename F>
double TimeMedian(int warmup, int runs, F&& f) {
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  for (int i = 0; i < warmup; ++i) f(i);
  std::vector<float> ms;
  for (int i = 0; i < runs; ++i) {
    CHECK_CUDA(cudaEventRecord(a));
    f(i);
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  CHECK_CUDA(cudaEventDestroy(a));
  CHECK_CUDA(cudaEventDestroy(b));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace mamba::bench
