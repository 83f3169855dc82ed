#include <cfloat>
#include <type_traits>

#include "worker/kernels/cross_entropy.h"
#include "worker/kernels/cuda_check.h"
#include "worker/kernels/cuda_dtype.cuh"
#include "worker/kernels/cuda_reduce.cuh"

namespace mamba::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kStatsThreads = 1024;
// Up to this vocabulary a row is read by a group of at most 32 lanes (GroupRowKernel), beyond
// it by a block (RowKernel).
constexpr int64_t kGroupRowsMaxVocab = 1024;

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

// The same over the G lanes of a row's group (G a power of two up to 32, groups aligned in the
// warp): only the group's lanes take part, so groups may leave early on their own.
template <int G>
__device__ Online GroupCombine(Online v, unsigned mask) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset >>= 1) {
    Online o;
    o.max = __shfl_xor_sync(mask, v.max, offset, G);
    o.sum = __shfl_xor_sync(mask, v.sum, offset, G);
    o.arg = __shfl_xor_sync(mask, v.arg, offset, G);
    v = Combine(v, o);
  }
  return v;
}

__device__ __forceinline__ float Ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
constexpr float kLog2e = 1.4426950408889634f;

// Folds V consecutive logits starting at index v into a thread's running (max, sum, argmax):
// their own max first, so the running sum is rescaled at most once per V elements and each
// logit costs one exponential (hardware exp2, relative error ~2^-22). Ties keep the first index.
template <int V>
__device__ __forceinline__ void Fold(const Vec<V>& x, int64_t v, Online& acc) {
  float m = x.v[0];
  int j = 0;
#pragma unroll
  for (int i = 1; i < V; ++i) {
    if (x.v[i] > m) m = x.v[i], j = i;
  }
  if (m > acc.max) {
    acc.sum *= Ex2((acc.max - m) * kLog2e);
    acc.max = m;
    acc.arg = v + j;
  }
  const float mk = acc.max * kLog2e;
#pragma unroll
  for (int i = 0; i < V; ++i) acc.sum += Ex2(fmaf(x.v[i], kLog2e, -mk));
}

// A thread's share of a row: the elements v0 + k * stride .. + V - 1, k = 0, 1, ...
template <typename T, int V>
__device__ __forceinline__ Online FoldShare(const T* z, int64_t v0, int64_t stride, int64_t vocab) {
  Online acc{-FLT_MAX, 0.f, -1};
  for (int64_t v = v0; v < vocab; v += stride) Fold<V>(LoadVec<V>(z + v), v, acc);
  return acc;
}

// dz = grad_scale * (softmax(z) - one_hot(target)) over a thread's share. Each element is read
// before it is written, so dz may alias z.
template <typename T, int V>
__device__ __forceinline__ void WriteGradShare(const T* z, T* dz, int64_t v0, int64_t stride,
                                               int64_t vocab, int32_t target, float lse,
                                               float grad_scale) {
  const float lse2 = lse * kLog2e;
  for (int64_t v = v0; v < vocab; v += stride) {
    Vec<V> g = LoadVec<V>(z + v);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float p = Ex2(fmaf(g.v[i], kLog2e, -lse2));
      g.v[i] = grad_scale * (v + i == target ? p - 1.f : p);
    }
    StoreVec<V>(dz + v, g);
  }
}

// An ignored row's gradient: zeros.
template <typename T, int V>
__device__ __forceinline__ void ZeroShare(T* dz, int64_t v0, int64_t stride, int64_t vocab) {
  for (int64_t v = v0; v < vocab; v += stride) StoreVec<V>(dz + v, ZeroVec<V>());
}

// Per row: loss (double) and hit into row_loss / row_hit (0 loss and -1 hit for ignored rows).
// V logits per access (V = 4 when rows are 4-aligned: 8- or 16-byte loads). Plain loads, not
// the read-only path: dlogits may alias logits.
template <typename T, int V>
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
    if (dz) ZeroShare<T, V>(dz, threadIdx.x * V, blockDim.x * V, vocab);
    if (threadIdx.x == 0) {
      row_loss[r] = 0.0;
      row_hit[r] = -1;
    }
    return;
  }
  Online acc = WarpCombine(FoldShare<T, V>(z, threadIdx.x * V, blockDim.x * V, vocab));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = acc;
  __syncthreads();
  acc = lane < int(blockDim.x >> 5) ? scratch[lane] : Online{-FLT_MAX, 0.f, -1};
  acc = WarpCombine(acc);  // every warp now holds the row's result; all reads of z are done
  const float lse = acc.max + logf(acc.sum);
  const float z_target = Load(z + target);
  __syncthreads();  // dz may alias z: z[target] is read by every thread before any write
  if (dz) {
    WriteGradShare<T, V>(z, dz, threadIdx.x * V, blockDim.x * V, vocab, target, lse, grad_scale);
  }
  if (threadIdx.x == 0) {
    row_loss[r] = double(lse) - double(z_target);
    row_hit[r] = acc.arg == target ? 1 : 0;
  }
}

// Rows of at most 32 * V * 8 logits: G lanes a row (G * V at least the row, up to 32 lanes), so
// a small vocabulary does not leave most of a 256-thread block idle (vocab 16: 4 lanes, 64 rows
// a block, against 4 busy threads of 256 a row). The same math and results as RowKernel.
template <typename T, int V, int G>
__global__ void GroupRowKernel(int64_t rows, int64_t vocab, const T* logits, const int32_t* targets,
                               int32_t ignore_index, float grad_scale, T* dlogits, double* row_loss,
                               int* row_hit, int* error_flag) {
  const int64_t r = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / G;
  if (r >= rows) return;  // whole groups: G divides the block
  const int g = threadIdx.x % G;
  const unsigned mask =
      G == 32 ? 0xffffffffu : ((1u << G) - 1) << ((threadIdx.x & 31) & ~unsigned(G - 1));
  const int32_t target = targets[r];
  const T* z = logits + r * vocab;
  T* dz = dlogits ? dlogits + r * vocab : nullptr;
  const bool bad = target != ignore_index && (target < 0 || target >= vocab);
  if (target == ignore_index || bad) {
    if (bad && g == 0) atomicOr(error_flag, kBadTarget);
    if (dz) ZeroShare<T, V>(dz, g * V, G * V, vocab);
    if (g == 0) {
      row_loss[r] = 0.0;
      row_hit[r] = -1;
    }
    return;
  }
  // Every lane of the group then holds the row's result.
  const Online acc = GroupCombine<G>(FoldShare<T, V>(z, g * V, G * V, vocab), mask);
  const float lse = acc.max + logf(acc.sum);
  const float z_target = Load(z + target);
  __syncwarp(mask);  // dz may alias z: z[target] is read by the group before any write
  if (dz) WriteGradShare<T, V>(z, dz, g * V, G * V, vocab, target, lse, grad_scale);
  if (g == 0) {
    row_loss[r] = double(lse) - double(z_target);
    row_hit[r] = acc.arg == target ? 1 : 0;
  }
}

// Launches GroupRowKernel with the fewest lanes that cover a row in one pass (at most 32).
template <typename T, int V>
void LaunchGroupRows(int64_t rows, int64_t vocab, const T* logits, const int32_t* targets,
                     int32_t ignore_index, float grad_scale, T* dlogits, double* row_loss,
                     int* row_hit, int* error_flag, cudaStream_t stream) {
  const int64_t lanes_wanted = (vocab + V - 1) / V;
  const auto launch = [&](auto group) {
    constexpr int G = decltype(group)::value;
    const int64_t blocks = (rows * G + kThreads - 1) / kThreads;
    GroupRowKernel<T, V, G><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        rows, vocab, logits, targets, ignore_index, grad_scale, dlogits, row_loss, row_hit,
        error_flag);
  };
  if (lanes_wanted <= 4) {
    launch(std::integral_constant<int, 4>{});
  } else if (lanes_wanted <= 8) {
    launch(std::integral_constant<int, 8>{});
  } else if (lanes_wanted <= 16) {
    launch(std::integral_constant<int, 16>{});
  } else {
    launch(std::integral_constant<int, 32>{});
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
    // 4-element accesses when every row starts 4-aligned (the allocator aligns the base).
    const bool vec = vocab % 4 == 0 && reinterpret_cast<uintptr_t>(logits) % (4 * sizeof(T)) == 0 &&
                     reinterpret_cast<uintptr_t>(dlogits) % (4 * sizeof(T)) == 0;
    if (vocab <= kGroupRowsMaxVocab) {
      (vec ? LaunchGroupRows<T, 4>
           : LaunchGroupRows<T, 1>)(rows, vocab, logits, targets, ignore_index, float(grad_scale),
                                    dlogits, row_loss, row_hit, error_flag, stream);
    } else if (vec) {
      RowKernel<T, 4><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
          vocab, logits, targets, ignore_index, float(grad_scale), dlogits, row_loss, row_hit,
          error_flag);
    } else {
      RowKernel<T, 1><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
          vocab, logits, targets, ignore_index, float(grad_scale), dlogits, row_loss, row_hit,
          error_flag);
    }
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
