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

// sink(i, sum over c of partial[c * n + i]) for every i < n: the final pass of the chunked
// (double) parameter-gradient reductions, in a fixed order. A block of kChunkSumLanes x
// kChunkSumLanes threads covers kChunkSumLanes outputs: thread (x, y) sums chunks y, y + 32, ...
// in order (loads coalesced over x), then one thread per output adds the 32 partials in y order.
// (One thread per output walking every chunk was latency-bound: ~100 us for 768 outputs x 2048
// chunks.) Launch with LaunchChunkSums.
constexpr int kChunkSumLanes = 32;
template <typename Sink>
__global__ void ChunkSumsKernel(int64_t n, int64_t chunks, const double* partial, Sink sink) {
  __shared__ double part[kChunkSumLanes][kChunkSumLanes + 1];
  const int64_t i = blockIdx.x * int64_t(kChunkSumLanes) + threadIdx.x;
  double sum = 0.0;
  if (i < n) {
    for (int64_t c = threadIdx.y; c < chunks; c += kChunkSumLanes) sum += partial[c * n + i];
  }
  part[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y != 0 || i >= n) return;
  double total = 0.0;
  for (int y = 0; y < kChunkSumLanes; ++y) total += part[y][threadIdx.x];
  sink(i, total);
}
template <typename Sink>
void LaunchChunkSums(int64_t n, int64_t chunks, const double* partial, Sink sink,
                     cudaStream_t stream) {
  if (n == 0) return;
  const unsigned int blocks = static_cast<unsigned int>((n + kChunkSumLanes - 1) / kChunkSumLanes);
  ChunkSumsKernel<<<blocks, dim3(kChunkSumLanes, kChunkSumLanes), 0, stream>>>(n, chunks, partial,
                                                                               sink);
}

// out[i] += the chunk sum i.
struct AddToFloats {
  float* out;
  __device__ void operator()(int64_t i, double sum) const { out[i] += float(sum); }
};
inline void LaunchAddChunkSums(int64_t n, int64_t chunks, const double* partial, float* out,
                               cudaStream_t stream) {
  LaunchChunkSums(n, chunks, partial, AddToFloats{out}, stream);
}

}  // namespace mamba::kernels
