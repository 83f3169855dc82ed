// What the slice state maps (selective_scan_state.cu) and the benchmark that weighs them against
// the output correction (bench/sp_correction_bench.cu) share: the step size, the chunking of a
// slice, and each chunk's summed step size.
#pragma once

#include <algorithm>
#include <cstdint>

#include "worker/kernels/cuda_dtype.cuh"
#include "worker/kernels/selective_scan_cuda.h"

namespace mamba::kernels::cuda {

// Softplus of the raw step size plus its bias, with the hardware exponential and logarithm
// (absolute error ~1e-7, as the scan kernels' own).
__device__ __forceinline__ float StepSize(const ScanProblem& p, float raw) {
  return p.softplus && raw <= 20.f ? __logf(1.f + __expf(raw)) : raw;
}

// How a slice of `len` steps of `rows` (batch, channel) rows is cut: enough chunks for ~2048
// threads an SM (a thread a row and chunk), each at least 64 steps long.
struct StateChunking {
  int64_t chunks, chunk_len;
};
inline StateChunking ChunkSlice(int64_t rows, int64_t len, int sms) {
  const int64_t want = std::max<int64_t>(1, (int64_t(sms) * 2048 + rows - 1) / rows);
  const int64_t chunks = std::clamp<int64_t>(want, 1, std::min<int64_t>(65535, (len + 63) / 64));
  return {chunks, (len + chunks - 1) / chunks};
}

// The summed step size of each chunk of each (batch, channel): chunk_dt[chunk * rows + row].
// Grid (rows / 128 rounded up, chunks), 128 threads.
template <typename T>
__global__ void __launch_bounds__(128)
    ChunkStepSums(const ScanProblem p, int64_t chunk_len, float* chunk_dt) {
  const int64_t rows = p.batch * p.dim;
  const int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (row >= rows) return;
  const int64_t d = row % p.dim, b = row / p.dim;
  const int64_t t0 = blockIdx.y * chunk_len, t1 = min(p.len, t0 + chunk_len);
  const T* delta = static_cast<const T*>(p.delta.p) + b * p.delta.sb + d * p.delta.sd;
  const float bias = p.dt_bias ? p.dt_bias[d] : 0.f;
  float sum = 0.f;
#pragma unroll 4
  for (int64_t t = t0; t < t1; ++t) sum += StepSize(p, Load(delta + t * p.delta.sl) + bias);
  chunk_dt[blockIdx.y * rows + row] = sum;
}

// A chunk's contribution whose decay to the slice's end (or start) is below e^kNegligible for
// the slowest-decaying state cannot move an fp32 result (2^-24 relative).
constexpr float kNegligible = -32.f;

}  // namespace mamba::kernels::cuda
