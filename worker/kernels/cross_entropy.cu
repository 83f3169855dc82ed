#include <cfloat>

#include "worker/kernels/cross_entropy.h"
#include "worker/kernels/cuda_check.h"
#include "worker/kernels/cuda_dtype.cuh"
#include "worker/kernels/cuda_reduce.cuh"

namespace mamba::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kStatsThreads = 1024;

size_t Align(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Running (max, sum of exp(z - max), first argmax) of a set of logits.
struct Online {
  float max;
  float sum;
  int64_t arg;
};

__device__ __forceinline__ Online Combine(Online a, Online b) {
  if (b.arg < 0) return a;
  if (a.arg < 0) return b;
  Online r;
  if (b.max > a.max || (b.max == a.max && b.arg < a.arg)) {
    r.max = b.max;
    r.arg = b.arg;
  } else {
    r.max = a.max;
    r.arg = a.arg;
  }
  r.sum = a.sum * expf(a.max - r.max) + b.sum * expf(b.max - r.max);
  return r;
}

__device__ Online WarpCombine(Online v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    Online o;
    o.max = __shfl_xor_sync(0xffffffffu, v.max, offset);
    o.sum = __shfl_xor_sync(0xffffffffu, v.sum, offset);
    o.arg = __shfl_xor_sync(0xffffffffu, v.arg, offset);
    v = Combine(v, o);
  }
  return v;
}

// Per row: loss (double) and hit into row_loss / row_hit (0 loss and -1 hit for ignored rows).
template <typename T>
__global__ void RowKernel(int64_t vocab, const T* logits, const int32_t* targets,
                          int32_t ignore_index, float grad_scale, T* dlogits, double* row_loss,
                          int* row_hit, int* error_flag) {
  __shared__ Online scratch[32];
  const int64_t r = blockIdx.x;
  const int32_t target = targets[r];
  const T* z = logits + r * vocab;
  T* dz = dlogits ? dlogits + r * vocab : nullptr;
  const bool bad = target != ignore_index && (target < 0 || target >= vocab);
  if (target == ignore_index || bad) {
    if (bad && threadIdx.x == 0) atomicOr(error_flag, kBadTarget);
    if (dz) {
      for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) Store(dz + v, 0.f);
    }
    if (threadIdx.x == 0) {
      row_loss[r] = 0.0;
      row_hit[r] = -1;
    }
    return;
  }
  Online acc{-FLT_MAX, 0.f, -1};
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x)
    acc = Combine(acc, Online{Load(z + v), 1.f, v});
  acc = WarpCombine(acc);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = acc;
  __syncthreads();
  acc = lane < int(blockDim.x >> 5) ? scratch[lane] : Online{-FLT_MAX, 0.f, -1};
  acc = WarpCombine(acc);  // every warp now holds the row's result; all reads of z are done
  const float lse = acc.max + logf(acc.sum);
  const float z_target = Load(z + target);
  __syncthreads();  // dz may alias z: z[target] is read by every thread before any write
  if (dz) {
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
      const float p = expf(Load(z + v) - lse);
      Store(dz + v, grad_scale * (v == target ? p - 1.f : p));
    }
  }
  if (threadIdx.x == 0) {
    row_loss[r] = double(lse) - double(z_target);
    row_hit[r] = acc.arg == target ? 1 : 0;
  }
}

__global__ void StatsKernel(int64_t rows, const double* row_loss, const int* row_hit,
                            bool accumulate, CrossEntropyDeviceStats* stats) {
  __shared__ double dscratch[32];
  __shared__ long long iscratch[32];
  double loss = 0.0;
  long long count = 0, correct = 0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    loss += row_loss[r];
    count += row_hit[r] >= 0;
    correct += row_hit[r] == 1;
  }
  loss = BlockSum(loss, dscratch);
  count = BlockSum(count, iscratch);
  correct = BlockSum(correct, iscratch);
  if (threadIdx.x == 0) {
    if (accumulate) {
      stats->loss_sum += loss;
      stats->count += count;
      stats->correct += correct;
    } else {
      *stats = CrossEntropyDeviceStats{loss, count, correct};
    }
  }
}

}  // namespace

size_t CrossEntropyWorkspaceBytes(int64_t rows) {
  return Align(rows * sizeof(double)) + Align(rows * sizeof(int));
}

template <typename T>
void CrossEntropyCuda(int64_t rows, int64_t vocab, const T* logits, const int32_t* targets,
                      int32_t ignore_index, double grad_scale, T* dlogits, bool accumulate,
                      CrossEntropyDeviceStats* stats, void* workspace, int* error_flag,
                      cudaStream_t stream) {
  MAMBA_CHECK(rows < (int64_t(1) << 31)) << "cross_entropy: too many rows";
  MAMBA_CHECK(vocab > 0) << "cross_entropy: empty vocabulary";
  double* row_loss = static_cast<double*>(workspace);
  int* row_hit =
      reinterpret_cast<int*>(static_cast<char*>(workspace) + Align(rows * sizeof(double)));
  if (rows > 0) {
    RowKernel<<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
        vocab, logits, targets, ignore_index, float(grad_scale), dlogits, row_loss, row_hit,
        error_flag);
    MAMBA_CUDA_CHECK_LAUNCH("cross_entropy");
  }
  StatsKernel<<<1, kStatsThreads, 0, stream>>>(rows, row_loss, row_hit, accumulate, stats);
  MAMBA_CUDA_CHECK_LAUNCH("cross_entropy");
}

template void CrossEntropyCuda<float>(int64_t, int64_t, const float*, const int32_t*, int32_t,
                                      double, float*, bool, CrossEntropyDeviceStats*, void*, int*,
                                      cudaStream_t);
template void CrossEntropyCuda<bf16>(int64_t, int64_t, const bf16*, const int32_t*, int32_t, double,
                                     bf16*, bool, CrossEntropyDeviceStats*, void*, int*,
                                     cudaStream_t);

}  // namespace mamba::kernels
