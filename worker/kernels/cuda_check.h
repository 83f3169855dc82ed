// Status checks for CUDA runtime calls and kernel launches. A failure is a programming or
// environment error (bad launch, out of memory, lost device): it aborts naming the op.
#pragma once

#include <cuda_runtime.h>

#include "worker/check.h"

#define MAMBA_CUDA_CHECK(op, expr)                                                              \
  do {                                                                                          \
    const cudaError_t mamba_err_ = (expr);                                                      \
    MAMBA_CHECK(mamba_err_ == cudaSuccess)                                                      \
        << "CUDA error in " << (op) << ": " << #expr << ": " << cudaGetErrorString(mamba_err_); \
  } while (0)

// After a kernel launch: catches bad launch configurations at once (asynchronous faults surface
// at the next synchronizing call, which is checked too).
#define MAMBA_CUDA_CHECK_LAUNCH(op) MAMBA_CUDA_CHECK(op, cudaGetLastError())

namespace mamba::kernels {

// Bits a kernel may set in the backend's device error word when it meets invalid data (the data
// layer validates, so these are programming errors); the backend checks the word at its
// synchronization points and aborts naming the cause.
enum DeviceErrorBits : int {
  kBadEmbeddingId = 1,
  kBadTarget = 2,
};

// Grid size for a 1-D launch of n items at `threads` per block (at least one block).
inline unsigned int GridFor(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < 1 ? 1 : blocks);
}

}  // namespace mamba::kernels
