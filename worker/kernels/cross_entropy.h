// Cross-entropy over rows of logits on the GPU, fused with its gradient; the same contract as
// cross_entropy_cpu.h (dlogits may alias logits; ignored rows get zero gradient). logits and
// dlogits are T, float or __nv_bfloat16, computed in float. A target outside [0, vocab) that is
// not ignore_index sets kBadTarget in *error_flag (the row is then treated as ignored).
//
// One block per row: an online max / sum-of-exponentials pass, then one pass writing dlogits.
// The statistics are deterministic: per-row losses (double) and hits are combined by one block
// in a fixed order.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mamba::kernels {

// Device-side result; the backend copies it back.
struct CrossEntropyDeviceStats {
  double loss_sum;
  long long count;
  long long correct;
};

size_t CrossEntropyWorkspaceBytes(int64_t rows);
// dlogits may be null. *stats (device) is overwritten, or added to when `accumulate` (in call
// order on the stream, so the total is deterministic).
template <typename T>
void CrossEntropyCuda(int64_t rows, int64_t vocab, const T* logits, const int32_t* targets,
                      int32_t ignore_index, double grad_scale, T* dlogits, bool accumulate,
                      CrossEntropyDeviceStats* stats, void* workspace, int* error_flag,
                      cudaStream_t stream);

}  // namespace mamba::kernels
