// Host launchers of the selective-scan kernels, each defined in the file that defines its kernel
// (selective_scan_{fwd,bwd}.cu): nvcc 13 keeps __global__ template stubs local to their
// translation unit. The heavy files compile in parallel.
#pragma once

#include "worker/kernels/selective_scan_cuda_device.cuh"

namespace mamba::kernels::cuda {

// Zero-start aggregate of each of `segs` segments: final state, sum of steps and (bwd) the state
// gradient the segment sends back from zero at its end.
template <typename T, bool kVec>
void LaunchSegments(const Params& p, bool bwd, int64_t segs, cudaStream_t stream);

// Folds the segments' affine maps: entering state (and, bwd, entering state gradient) of each.
void LaunchCompose(const Params& p, bool bwd, cudaStream_t stream);

template <typename T, bool kVec>
void LaunchForwardMain(const Params& p, cudaStream_t stream);

template <typename T, bool kVec>
cudaError_t LaunchBackwardMain(const Params& p, cudaStream_t stream);

// dA, dD_skip and ddt_bias (where asked for) from their [parts][...] partials in p.ws_dA,
// p.ws_dD and p.ws_dbias, each summed over parts in order, in one launch.
void LaunchSumGradParts(const Params& p, int64_t parts, cudaStream_t stream);

// dBm, dCm from the per-warp partials, summed over channel warps in order.
template <typename T>
void LaunchReduceBC(const Params& p, cudaStream_t stream);

// Tiled kernels for N == 16 (selective_scan_tiled.cu): 32 channels x 4 state slices a block
// (forward: `lanes` 4 or 8 slices). p.chan_warps holds channel blocks per group and
// p.chan_blocks blocks per segment.
int TiledForwardTile();
int TiledBackwardTile();
// The forward's thread shape: lanes per channel (2, 4 or 8) and, at 4 lanes, channels per thread
// of the main pass (1 or 2; the segment pre-pass takes 1).
struct FwdShape {
  int lanes = 4, chans = 1;
};
// With per_sm set, these two launch nothing and report how many blocks of the kernel they would
// launch fit on an SM (0 if unknown).
template <typename T>
void LaunchTiledPre(const Params& p, bool bwd, int64_t segs, const FwdShape& f, cudaStream_t stream,
                    int* per_sm = nullptr);
template <typename T>
void LaunchTiledForward(const Params& p, const FwdShape& f, cudaStream_t stream,
                        int* per_sm = nullptr);
// Whether these two pass the step sizes from the pre-pass to the main pass (then p.ws_dt16 must
// hold B * L * D fp16 values).
template <typename T>
bool TiledForwardHandsStepSizes(const Params& p, const FwdShape& f);
template <typename T>
cudaError_t LaunchTiledBackward(const Params& p, cudaStream_t stream);
// After it, in one launch: dBm/dCm from the channel blocks' partials (when there are several),
// dA, dD_skip and ddt_bias from the segments' partials.
template <typename T>
void LaunchTiledBackwardReduce(const Params& p, cudaStream_t stream);

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Launches `kernel` as a programmatic dependent launch: it may start while the kernel before it
// in the stream still runs (once that one's blocks have all called LaunchDependents or ended) and
// calls WaitPrimary before it reads what that kernel wrote. A failure shows as the launch's error.
template <typename... Args>
void LaunchAfterPrimary(void (*kernel)(Args...), int64_t blocks, int threads, size_t smem,
                        cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attr;
  config.numAttrs = 1;
  cudaLaunchKernelEx(&config, kernel, args...);
}

}  // namespace mamba::kernels::cuda
