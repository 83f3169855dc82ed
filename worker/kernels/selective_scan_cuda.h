// CUDA selective scan: internal launch interface behind the C ABI in mamba_kernels.h.
//
// Work split: one thread owns one (batch, channel) and 16 states of it in registers (more states
// loop over slices of 16), and one segment of the sequence. Lanes of a warp are 32 consecutive
// channels of one group, so (B, L, D) loads are coalesced and Bm/Cm loads are warp-uniform.
// Segments run in parallel; each segment's recurrence is the affine map h -> a*h + s, composed
// across segments by a small kernel (forward: states at segment starts; backward: the state
// gradient arriving at each segment's end). The backward keeps checkpoints and the states of one
// tile in shared memory and recomputes everything else. Reductions over channels (dBm, dCm) go
// through warp shuffles and per-warp partials summed in a fixed order: no atomics anywhere.
//
// Precision: state and sums in fp32. Where it costs nothing measurable against the inputs' own
// rounding, the math is approximate: hardware exp2/log2/reciprocal (relative ~2^-22), and for
// bf16 inputs a softplus through log2 (absolute ~2e-7) and, when the forward splits L (few
// batch x channels, long L), step sizes rounded to fp16 between its two passes (relative
// 2^-12, 8x finer than the bf16 delta): the fp32 final state then lands within ~1e-4 of a
// float64 evaluation on the same bf16 inputs instead of ~1e-6 (selective_scan_tiled.cu,
// kHandsStepSizes).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

namespace mamba::kernels::cuda {

struct Strided3 {
  const void* p = nullptr;
  int64_t sb = 0, sl = 0, sd = 0;
};

struct Strided4 {
  const void* p = nullptr;
  int64_t sb = 0, sl = 0, sg = 0, sn = 0;
};

enum class DType { kF32, kBF16 };

struct ScanProblem {
  int64_t batch = 0, len = 0, dim = 0, dstate = 0, groups = 1;
  DType dtype = DType::kF32;
  bool softplus = true;
  Strided3 u, delta, z;  // z.p may be null
  Strided4 Bm, Cm;
  const float* A = nullptr;
  const float* D_skip = nullptr;
  const float* dt_bias = nullptr;
  const float* h0 = nullptr;
  Strided3 out;
  float* h_last = nullptr;
  // Backward only.
  Strided3 dout;
  const float* dh_last = nullptr;
  Strided3 du, ddelta, dz;
  Strided4 dBm, dCm;
  float* dA = nullptr;
  float* dD_skip = nullptr;
  float* ddt_bias = nullptr;
  float* dh0 = nullptr;
};

// Tuning knobs (the benchmark sweeps them); zero means the built-in choice.
struct ScanTuning {
  int64_t fwd_min_threads = 0;  // forward splits L until this many threads run
  int64_t bwd_tiles = 0;        // N == 16 backward: tiles per segment
  int fwd_lanes = 0;            // N == 16 forward: lanes per channel, 2, 4 (default) or 8
  int fwd_chans = 0;            // N == 16 forward main pass at 4 lanes: channels per thread,
                                // 1 or 2 (default: 2 where that still fills the GPU)
  bool force_v2 = false;        // N == 16: use the general kernels (for comparison)
};

// Where the launches' scratch (segment states, checkpoints, partial sums) comes from: by default
// stream-ordered cudaMallocAsync from the device's pool (the C ABI); a caller with its own
// allocator (the CUDA backend's caching allocator, which then accounts for it and allocates
// nothing new in steady state) passes it. The buffer is released after the launches are
// enqueued: the allocator must only reuse it for work later on the same stream.
struct ScanScratch {
  std::function<std::shared_ptr<void>(size_t bytes)> allocate;
};

cudaError_t LaunchScanForward(const ScanProblem& p, cudaStream_t stream,
                              const ScanTuning& tuning = {}, const ScanScratch& scratch = {});
cudaError_t LaunchScanBackward(const ScanProblem& p, cudaStream_t stream,
                               const ScanTuning& tuning = {}, const ScanScratch& scratch = {});

// Sequence parallelism's slice maps (SelectiveScanStateMapCpu / SelectiveScanStateGradCpu in
// selective_scan_cpu.h), into (B, D, N) float32 arrays. The state map reads u, delta, Bm, A,
// dt_bias; the state gradient reads dout, z, Cm, delta, A, dt_bias. Chunks of the slice run in
// parallel and fold in a fixed order (selective_scan_state.cu). state may be null: the decay alone.
cudaError_t LaunchScanStateMap(const ScanProblem& p, float* decay, float* state,
                               cudaStream_t stream, const ScanScratch& scratch = {});
cudaError_t LaunchScanStateGrad(const ScanProblem& p, float* dstate, cudaStream_t stream,
                                const ScanScratch& scratch = {});

}  // namespace mamba::kernels::cuda
