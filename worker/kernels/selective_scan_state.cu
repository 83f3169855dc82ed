// The slice state maps of sequence parallelism on the GPU (the math: SelectiveScanStateMapCpu and
// SelectiveScanStateGradCpu in selective_scan_cpu.h). The slice is cut into chunks that run in
// parallel, one thread per (batch, channel, state, chunk) running only the recurrence; a second
// kernel folds each chain's chunk maps in order, (a2, s2) o (a1, s1) = (a2 a1, a2 s1 + s2), the
// same algebra that composes the slices across ranks. Deterministic: fixed chunks, fixed order.
#include <algorithm>
#include <memory>

#include "worker/kernels/cuda_dtype.cuh"
#include "worker/kernels/selective_scan_cuda.h"

namespace mamba::kernels::cuda {
namespace {

template <typename T>
__device__ __forceinline__ float At3(const Strided3& s, int64_t b, int64_t t, int64_t d) {
  return ToFloat(static_cast<const T*>(s.p)[b * s.sb + t * s.sl + d * s.sd]);
}
template <typename T>
__device__ __forceinline__ float At4(const Strided4& s, int64_t b, int64_t t, int64_t g,
                                     int64_t n) {
  return ToFloat(static_cast<const T*>(s.p)[b * s.sb + t * s.sl + g * s.sg + n * s.sn]);
}

__device__ __forceinline__ float StepSize(const ScanProblem& p, float raw, int64_t d) {
  raw += p.dt_bias ? p.dt_bias[d] : 0.f;
  return p.softplus && raw <= 20.f ? log1pf(expf(raw)) : raw;
}

// One chunk of one chain: forward, its final state from zero; backward, the state gradient at
// its start from zero at its end. Both also leave the chunk's summed step size.
template <typename T, bool kBackward>
__global__ void ChunkMaps(ScanProblem p, int64_t chunk_len, float* chunk_s, float* chunk_dt) {
  const int64_t chains = p.batch * p.dim * p.dstate;
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= chains) return;
  const int64_t n = i % p.dstate, d = (i / p.dstate) % p.dim, b = i / (p.dstate * p.dim);
  const int64_t g = d / (p.dim / p.groups);
  const int64_t t0 = blockIdx.y * chunk_len, t1 = min(p.len, t0 + chunk_len);
  const float A = p.A[d * p.dstate + n];
  float h = 0.f, dt_sum = 0.f;
  if constexpr (!kBackward) {
    for (int64_t t = t0; t < t1; ++t) {
      const float dt = StepSize(p, At3<T>(p.delta, b, t, d), d);
      dt_sum += dt;
      h = __expf(dt * A) * h + dt * At4<T>(p.Bm, b, t, g, n) * At3<T>(p.u, b, t, d);
    }
  } else {
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const float dt = StepSize(p, At3<T>(p.delta, b, t, d), d);
      dt_sum += dt;
      float dy = At3<T>(p.dout, b, t, d);
      if (p.z.p) {
        const float z = At3<T>(p.z, b, t, d);
        dy *= z / (1.f + __expf(-z));
      }
      h = __expf(dt * A) * (h + At4<T>(p.Cm, b, t, g, n) * dy);
    }
  }
  chunk_s[blockIdx.y * chains + i] = h;
  chunk_dt[blockIdx.y * chains + i] = dt_sum;
}

// Folds each chain's chunk maps: forward in order, backward in reverse.
template <bool kBackward>
__global__ void FoldChunks(ScanProblem p, int64_t chunks, const float* chunk_s,
                           const float* chunk_dt, float* decay, float* state) {
  const int64_t chains = p.batch * p.dim * p.dstate;
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= chains) return;
  const float A = p.A[((i / p.dstate) % p.dim) * p.dstate + i % p.dstate];
  float h = 0.f, dt_sum = 0.f;
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t c = kBackward ? chunks - 1 - k : k;
    h = __expf(A * chunk_dt[c * chains + i]) * h + chunk_s[c * chains + i];
    dt_sum += chunk_dt[c * chains + i];
  }
  if (decay) decay[i] = __expf(A * dt_sum);
  state[i] = h;
}

template <bool kBackward>
cudaError_t Launch(const ScanProblem& p, float* decay, float* state, cudaStream_t stream,
                   const ScanScratch& scratch) {
  const int64_t chains = p.batch * p.dim * p.dstate;
  if (chains == 0) return cudaSuccess;
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  // Enough chunks for ~2048 threads an SM, each at least 64 steps long.
  const int64_t want = std::max<int64_t>(1, (int64_t(sms) * 2048 + chains - 1) / chains);
  const int64_t chunks = std::clamp<int64_t>(want, 1, std::min<int64_t>(65535, (p.len + 63) / 64));
  const int64_t chunk_len = (p.len + chunks - 1) / chunks;
  const size_t bytes = 2 * size_t(chunks) * chains * sizeof(float);
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
  float* chunk_dt = base + chunks * chains;
  constexpr int kThreads = 128;
  const dim3 grid(static_cast<unsigned>((chains + kThreads - 1) / kThreads),
                  static_cast<unsigned>(chunks));
  if (p.dtype == DType::kF32) {
    ChunkMaps<float, kBackward><<<grid, kThreads, 0, stream>>>(p, chunk_len, chunk_s, chunk_dt);
  } else {
    ChunkMaps<__nv_bfloat16, kBackward>
        <<<grid, kThreads, 0, stream>>>(p, chunk_len, chunk_s, chunk_dt);
  }
  FoldChunks<kBackward>
      <<<grid.x, kThreads, 0, stream>>>(p, chunks, chunk_s, chunk_dt, decay, state);
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
