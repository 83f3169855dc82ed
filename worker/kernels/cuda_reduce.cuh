// Block-wide reductions for the CUDA kernels. The combining tree is fixed by the block size, so a
// result never depends on scheduling: every reduction here is deterministic.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mamba::kernels {

template <typename T>
__device__ __forceinline__ T WarpSum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, returned to every thread. `scratch` holds at least 32 T; blockDim.x must be
// a multiple of 32. Starts with a barrier so scratch may be reused by consecutive calls.
template <typename T>
__device__ T BlockSum(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = WarpSum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = lane < warps ? scratch[lane] : T(0);
  return WarpSum(total);
}

// out[i] += sum over c of partial[c * n + i], c in order: the fixed-order final pass of the
// chunked (double) parameter-gradient reductions. One thread per output.
__global__ inline void AddChunkSumsKernel(int64_t n, int64_t chunks, const double* partial,
                                          float* out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  double sum = 0.0;
  for (int64_t c = 0; c < chunks; ++c) sum += partial[c * n + i];
  out[i] += float(sum);
}

}  // namespace mamba::kernels
