// The slice state maps of sequence parallelism on the GPU (the math: SelectiveScanStateMapCpu and
// SelectiveScanStateGradCpu in selective_scan_cpu.h). The slice is cut into chunks that run in
// parallel, one thread per (batch, channel, chunk) running only the recurrence; a second kernel
// folds each (batch, channel, state)'s chunk maps in order, (a2, s2) o (a1, s1) = (a2 a1, a2 s1 +
// s2), the same algebra that composes the slices across ranks. Deterministic: fixed chunks, fixed
// order.
#include <algorithm>
#include <cstdint>
#include <memory>

#include "worker/kernels/cuda_dtype.cuh"
#include "worker/kernels/selective_scan_cuda.h"
#include "worker/kernels/selective_scan_state.cuh"

namespace mamba::kernels::cuda {
namespace {

// A chunk's map enters the slice's scaled by the decay between the chunk and the slice's end
// (forward) or start (backward), exp(A * the step sizes summed over the chunks between); where
// that is below e^kNegligible for the slowest-decaying state (A nearest zero), the chunk is
// skipped: for long slices most of it is.

// One chunk of one (batch, channel): forward, the final states from zero; backward, the state
// gradients at its start from zero at its end (zeros for a negligible chunk). A thread holds
// kSlice states in registers (more states: slice after slice), so the step size's softplus and
// the loads of u, delta, z and dout are paid once per step and slice, not per state; lanes are
// consecutive channels, so those loads coalesce and the Bm/Cm rows are warp-uniform (read in
// 4-element pieces when kVec: n-contiguous and aligned).
constexpr int kSlice = 16;

template <typename T, bool kBackward, bool kVec>
__global__ void __launch_bounds__(128)
    ChunkMaps(const ScanProblem p, int64_t chunk_len, int64_t chunks, float* chunk_s,
              const float* chunk_dt) {
  const int64_t rows = p.batch * p.dim;
  const int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (row >= rows) return;
  const int64_t d = row % p.dim, b = row / p.dim, g = d / (p.dim / p.groups);
  const int64_t t0 = blockIdx.y * chunk_len, t1 = min(p.len, t0 + chunk_len);
  const int64_t chains = rows * p.dstate;
  float* s_out = chunk_s + blockIdx.y * chains + row * p.dstate;
  {
    float between = 0.f, a_max = -INFINITY;
    const int64_t c = blockIdx.y;
    for (int64_t k = kBackward ? 0 : c + 1; k < (kBackward ? c : chunks); ++k) {
      between += chunk_dt[k * rows + row];
    }
    for (int64_t n = 0; n < p.dstate; ++n) a_max = fmaxf(a_max, p.A[d * p.dstate + n]);
    if (a_max * between < kNegligible) {
      for (int64_t n = 0; n < p.dstate; ++n) s_out[n] = 0.f;
      return;
    }
  }
  const T* delta = static_cast<const T*>(p.delta.p) + b * p.delta.sb + d * p.delta.sd;
  const T* act = static_cast<const T*>(kBackward ? p.dout.p : p.u.p) +
                 b * (kBackward ? p.dout.sb : p.u.sb) + d * (kBackward ? p.dout.sd : p.u.sd);
  const T* z = p.z.p ? static_cast<const T*>(p.z.p) + b * p.z.sb + d * p.z.sd : nullptr;
  const Strided4& rs = kBackward ? p.Cm : p.Bm;  // the row the recurrence reads per step
  const T* row_base = static_cast<const T*>(rs.p) + b * rs.sb + g * rs.sg;
  const float bias = p.dt_bias ? p.dt_bias[d] : 0.f;
  const int64_t sl_delta = p.delta.sl, sl_act = kBackward ? p.dout.sl : p.u.sl, sl_z = p.z.sl;
  for (int64_t n0 = 0; n0 < p.dstate; n0 += kSlice) {
    const int ns = static_cast<int>(min(int64_t{kSlice}, p.dstate - n0));
    float A[kSlice], h[kSlice];
#pragma unroll
    for (int k = 0; k < kSlice; ++k) {
      A[k] = k < ns ? p.A[d * p.dstate + n0 + k] : 0.f;
      h[k] = 0.f;
    }
#pragma unroll 2
    for (int64_t i = 0; i < t1 - t0; ++i) {
      const int64_t t = kBackward ? t1 - 1 - i : t0 + i;
      const float dt = StepSize(p, Load(delta + t * sl_delta) + bias);
      float v[kSlice];
      const T* r = row_base + t * rs.sl + n0 * rs.sn;
      if constexpr (kVec) {
#pragma unroll
        for (int k = 0; k < kSlice; k += 4) {
          const Vec<4> q = LoadVec<4>(r + k);
          v[k] = q.v[0], v[k + 1] = q.v[1], v[k + 2] = q.v[2], v[k + 3] = q.v[3];
        }
      } else {
#pragma unroll
        for (int k = 0; k < kSlice; ++k) v[k] = k < ns ? Load(r + k * rs.sn) : 0.f;
      }
      if constexpr (!kBackward) {
        const float du = dt * Load(act + t * sl_act);
#pragma unroll
        for (int k = 0; k < kSlice; ++k) h[k] = __expf(dt * A[k]) * h[k] + du * v[k];
      } else {
        float dy = Load(act + t * sl_act);
        if (z) {
          const float zv = Load(z + t * sl_z);
          dy *= zv / (1.f + __expf(-zv));
        }
#pragma unroll
        for (int k = 0; k < kSlice; ++k) h[k] = __expf(dt * A[k]) * (h[k] + v[k] * dy);
      }
    }
#pragma unroll
    for (int k = 0; k < kSlice; ++k) {
      if (k < ns) s_out[n0 + k] = h[k];
    }
  }
}

// Folds each chain's chunk maps: forward in order, backward in reverse.
template <bool kBackward>
__global__ void FoldChunks(ScanProblem p, int64_t chunks, const float* chunk_s,
                           const float* chunk_dt, float* decay, float* state) {
  const int64_t chains = p.batch * p.dim * p.dstate;
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= chains) return;
  const int64_t rows = p.batch * p.dim, row = i / p.dstate;
  const float A = p.A[(row % p.dim) * p.dstate + i % p.dstate];
  float h = 0.f, dt_sum = 0.f;
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t c = kBackward ? chunks - 1 - k : k;
    if (state) h = __expf(A * chunk_dt[c * rows + row]) * h + chunk_s[c * chains + i];
    dt_sum += chunk_dt[c * rows + row];
  }
  if (decay) decay[i] = __expf(A * dt_sum);
  if (state) state[i] = h;
}

template <bool kBackward>
cudaError_t Launch(const ScanProblem& p, float* decay, float* state, cudaStream_t stream,
                   const ScanScratch& scratch) {
  const int64_t chains = p.batch * p.dim * p.dstate;
  if (chains == 0) return cudaSuccess;
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int64_t rows = p.batch * p.dim;
  const StateChunking cut = ChunkSlice(rows, p.len, sms);
  const int64_t chunks = cut.chunks, chunk_len = cut.chunk_len;
  // Chunk states only where the state is wanted (the decay alone needs the step sums).
  const int64_t state_floats = state != nullptr ? chunks * chains : 0;
  const size_t bytes = size_t(state_floats + chunks * rows) * sizeof(float);
  std::shared_ptr<void> held;
  float* base = nullptr;
  if (scratch.allocate) {
    held = scratch.allocate(bytes);
    if (!held) return cudaErrorMemoryAllocation;
    base = static_cast<float*>(held.get());
  } else if (cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&base), bytes, stream);
             err != cudaSuccess) {
    return err;
  }
  float* chunk_s = base;
  float* chunk_dt = base + state_floats;
  constexpr int kThreads = 128;
  const dim3 grid(static_cast<unsigned>((rows + kThreads - 1) / kThreads),
                  static_cast<unsigned>(chunks));
  // Rows of N == multiple of 16, n-contiguous, aligned to 4 elements: 4-element loads.
  const Strided4& rs = kBackward ? p.Cm : p.Bm;
  const size_t elem = p.dtype == DType::kF32 ? 4 : 2;
  const bool vec = rs.sn == 1 && p.dstate % kSlice == 0 && rs.sb % 4 == 0 && rs.sl % 4 == 0 &&
                   rs.sg % 4 == 0 && reinterpret_cast<uintptr_t>(rs.p) % (4 * elem) == 0;
#define MAMBA_CHUNK_MAPS(T, V) \
  ChunkMaps<T, kBackward, V><<<grid, kThreads, 0, stream>>>(p, chunk_len, chunks, chunk_s, chunk_dt)
  if (p.dtype == DType::kF32) {
    ChunkStepSums<float><<<grid, kThreads, 0, stream>>>(p, chunk_len, chunk_dt);
  } else {
    ChunkStepSums<bf16><<<grid, kThreads, 0, stream>>>(p, chunk_len, chunk_dt);
  }
  if (state != nullptr) {  // (the decay alone needs only the step sums)
    if (p.dtype == DType::kF32) {
      vec ? MAMBA_CHUNK_MAPS(float, true) : MAMBA_CHUNK_MAPS(float, false);
    } else {
      vec ? MAMBA_CHUNK_MAPS(bf16, true) : MAMBA_CHUNK_MAPS(bf16, false);
    }
  }
#undef MAMBA_CHUNK_MAPS
  FoldChunks<kBackward>
      <<<static_cast<unsigned>((chains + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
          p, chunks, chunk_s, chunk_dt, decay, state);
  if (!scratch.allocate) cudaFreeAsync(base, stream);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchScanStateMap(const ScanProblem& p, float* decay, float* state,
                               cudaStream_t stream, const ScanScratch& scratch) {
  return Launch<false>(p, decay, state, stream, scratch);
}

cudaError_t LaunchScanStateGrad(const ScanProblem& p, float* dstate, cudaStream_t stream,
                                const ScanScratch& scratch) {
  return Launch<true>(p, nullptr, dstate, stream, scratch);
}

}  // namespace mamba::kernels::cuda
