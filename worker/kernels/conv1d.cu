#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "worker/kernels/conv1d.h"
#include "worker/kernels/cuda_check.h"
#include "worker/kernels/cuda_dtype.cuh"
#include "worker/kernels/cuda_reduce.cuh"
#include "worker/kernels/silu_device.cuh"

namespace mamba::kernels {
namespace {

// Tiling: a thread owns V adjacent channels over kSteps consecutive time steps and keeps the
// K-1 previous inputs (and, backward, the K-1 newest dpre values) in registers, so each x and dy
// is read once. A block is 32 channel groups x kSubTiles consecutive runs, i.e. a tile of
// 32*V channels x kTileL time steps of one batch row.
constexpr int kSteps = 16;
constexpr int kSubTiles = 8;
constexpr int kTileL = kSteps * kSubTiles;
constexpr int kLanes = 32;
// Loads issued together ahead of the dependent math; the backward's wider state takes fewer.
constexpr int kFwdStage = 8;
constexpr int kStage = 4;
// Widest vectors: float4 forward; float2 backward, whose registers (window, dpre ring, weight
// partials per channel) would spill at float4 with two blocks per SM.
constexpr int kFwdMaxVec = 4;
constexpr int kBwdMaxVec = 2;

size_t Align(size_t bytes) { return (bytes + 255) / 256 * 256; }
int64_t TilesL(int64_t L) { return std::max<int64_t>(1, (L + kTileL - 1) / kTileL); }

// Input at position p (-(K-1) <= p < L) of row b, channels c..c+V-1: x, the prefix or zero.
template <int V, int K, typename T>
__device__ __forceinline__ Vec<V> Input(const T* x, const T* prefix, int64_t b, int64_t p,
                                        int64_t c, int64_t L, int64_t C) {
  if (p >= 0) return LoadVec<V>(x + (b * L + p) * C + c);
  if (prefix) return LoadVec<V>(prefix + (b * (K - 1) + (K - 1) + p) * C + c);
  return ZeroVec<V>();
}

// Per-thread constants: weights w[v][k] and bias.
template <int V, int K>
__device__ __forceinline__ void LoadParams(const float* weight, const float* bias, int64_t c,
                                           float (&w)[V][K], float (&bb)[V]) {
#pragma unroll
  for (int v = 0; v < V; ++v) {
    bb[v] = bias ? bias[c + v] : 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) w[v][k] = weight[(c + v) * K + k];
  }
}

// win[K-1] is the newest input; each step shifts the window down one before adding x[t], so the
// K-1 inputs before a run start in win[1..K-1].
// Same order as the reference: bias, then k = 0..K-1 over the window (oldest first).
template <int V, int K>
__device__ __forceinline__ float Pre(const float (&w)[V][K], const float (&bb)[V],
                                     const Vec<V> (&win)[K], int v) {
  float acc = bb[v];
#pragma unroll
  for (int k = 0; k < K; ++k) acc += w[v][k] * win[k].v[v];
  return acc;
}

struct Tile {
  int64_t b, t0, c;
  bool active;
};

template <int V>
__device__ __forceinline__ Tile ThreadTile(int64_t L, int64_t C, int64_t tiles_l) {
  Tile r;
  r.b = blockIdx.x / tiles_l;
  r.t0 = (blockIdx.x % tiles_l) * int64_t(kTileL) + threadIdx.y * int64_t(kSteps);
  r.c = (int64_t(blockIdx.y) * kLanes + threadIdx.x) * V;
  r.active = r.c < C && r.t0 < L;
  return r;
}

template <typename T, int V, int K>
__global__ void __launch_bounds__(kLanes* kSubTiles, 2)
    ForwardKernel(int64_t L, int64_t C, int64_t tiles_l, const T* x, const float* weight,
                  const float* bias, const T* prefix, bool silu, T* y) {
  const Tile tl = ThreadTile<V>(L, C, tiles_l);
  if (!tl.active) return;
  float w[V][K], bb[V];
  LoadParams<V, K>(weight, bias, tl.c, w, bb);
  Vec<V> win[K];
#pragma unroll
  for (int j = 0; j < K - 1; ++j) {
    win[j + 1] = Input<V, K>(x, prefix, tl.b, tl.t0 - (K - 1) + j, tl.c, L, C);
  }
  const int64_t n = L - tl.t0 < kSteps ? L - tl.t0 : kSteps;
  const T* xp = x + (tl.b * L + tl.t0) * C + tl.c;
  T* yp = y + (tl.b * L + tl.t0) * C + tl.c;
  Vec<V> in[kFwdStage];
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    if (s % kFwdStage == 0) {
#pragma unroll
      for (int u = 0; u < kFwdStage; ++u) {
        if (s + u < n) in[u] = LoadVec<V>(xp + (s + u) * C);
      }
    }
    if (s < n) {
#pragma unroll
      for (int k = 0; k < K - 1; ++k) win[k] = win[k + 1];
      win[K - 1] = in[s % kFwdStage];
      Vec<V> out;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const float pre = Pre<V, K>(w, bb, win, v);
        out.v[v] = silu ? pre * StableSigmoidF(pre) : pre;
      }
      StoreVec<V>(yp + s * C, out);
    }
  }
}

// dy of the K-1 rows after each block tile, copied before the main kernel runs when dx aliases
// dy (the next block may already have overwritten them). halo[((b * tiles_l + tile) * (K-1) + j)
// * C + c]; zero past L.
template <typename T>
__global__ void HaloKernel(int64_t B, int64_t L, int64_t C, int64_t K, int64_t tiles_l, const T* dy,
                           T* halo) {
  const int64_t n = B * tiles_l * (K - 1) * C;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % C, r = i / C, j = r % (K - 1), bt = r / (K - 1);
    const int64_t b = bt / tiles_l, t = (bt % tiles_l + 1) * kTileL + j;
    halo[i] = t < L ? dy[(b * L + t) * C + c] : FromFloat<T>(0.f);
  }
}

// Fused backward over one block tile: dpre = dy * silu'(pre) (pre recomputed), dx (and dprefix
// for the first tile of a row), and per-tile dweight/dbias partials. dpre[t] for t in
// [t0, t0 + kSteps + K - 1) is formed in time order; dx[p] = sum_k w[k] dpre[p + K-1 - k] is
// written once its last term is known. A thread only writes dx at rows whose dy it has read;
// dy rows past its run (owned by the next run) are read before the __syncthreads, or from
// `halo` at the block's end.
template <typename T, int V, int K>
__global__ void __launch_bounds__(kLanes* kSubTiles, 2)
    BackwardKernel(int64_t L, int64_t C, int64_t tiles_l, const T* x, const float* weight,
                   const float* bias, const T* prefix, bool silu, const T* dy, const T* halo, T* dx,
                   T* dprefix, double* partial) {
  const Tile tl = ThreadTile<V>(L, C, tiles_l);
  Vec<V> hdy[K > 1 ? K - 1 : 1];
#pragma unroll
  for (int j = 0; j < K - 1; ++j) {
    const int64_t t = tl.t0 + kSteps + j;
    if (!tl.active || t >= L) {
      hdy[j] = ZeroVec<V>();
    } else if (halo && threadIdx.y == kSubTiles - 1) {
      hdy[j] = LoadVec<V>(halo + ((int64_t(blockIdx.x) * (K - 1)) + j) * C + tl.c);
    } else {
      hdy[j] = LoadVec<V>(dy + (tl.b * L + t) * C + tl.c);
    }
  }
  __syncthreads();

  float dw[V][K], db[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    db[v] = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) dw[v][k] = 0.f;
  }
  if (tl.active) {
    float w[V][K], bb[V];
    LoadParams<V, K>(weight, bias, tl.c, w, bb);
    Vec<V> win[K], dp[K];
#pragma unroll
    for (int j = 0; j < K; ++j) dp[j] = ZeroVec<V>();
#pragma unroll
    for (int j = 0; j < K - 1; ++j) {
      win[j + 1] = Input<V, K>(x, prefix, tl.b, tl.t0 - (K - 1) + j, tl.c, L, C);
    }
    const int64_t n = L - tl.t0 < kSteps ? L - tl.t0 : kSteps;
    const int64_t nx = L - tl.t0 < kSteps + K - 1 ? L - tl.t0 : kSteps + K - 1;
    const int64_t row0 = (tl.b * L + tl.t0) * C + tl.c;
    Vec<V> xs[kStage], gs[kStage];
#pragma unroll
    for (int s = 0; s < kSteps + K - 1; ++s) {
      if (s % kStage == 0 && s < kSteps) {
#pragma unroll
        for (int u = 0; u < kStage; ++u) {
          xs[u] = s + u < n ? LoadVec<V>(x + row0 + (s + u) * C) : ZeroVec<V>();
          gs[u] = s + u < n ? LoadVec<V>(dy + row0 + (s + u) * C) : ZeroVec<V>();
        }
      }
      Vec<V> xin, g;
      if (s < kSteps) {
        xin = xs[s % kStage], g = gs[s % kStage];
      } else {
        xin = s < nx ? LoadVec<V>(x + row0 + s * C) : ZeroVec<V>();
        g = hdy[s >= kSteps ? s - kSteps : 0];
      }
#pragma unroll
      for (int k = 0; k < K - 1; ++k) win[k] = win[k + 1], dp[k] = dp[k + 1];
      win[K - 1] = xin;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const float d = silu ? g.v[v] * SiluGradF(Pre<V, K>(w, bb, win, v)) : g.v[v];
        dp[K - 1].v[v] = d;
        if (s < kSteps) {  // rows past L have g == 0, adding exact zeros
          db[v] += d;
#pragma unroll
          for (int k = 0; k < K; ++k) dw[v][k] += d * win[k].v[v];
        }
      }
      // Output position p = t0 + s - (K-1): dx when p >= t0, dprefix for p < 0.
      const int64_t p = tl.t0 + s - (K - 1);
      if ((s >= K - 1 && s - (K - 1) < n) || (s < K - 1 && p < 0 && dprefix)) {
        Vec<V> out;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          float acc = 0.f;
#pragma unroll
          for (int k = 0; k < K; ++k) acc += w[v][k] * dp[K - 1 - k].v[v];
          out.v[v] = acc;
        }
        if (s >= K - 1) {
          StoreVec<V>(dx + row0 + (s - (K - 1)) * C, out);
        } else {
          StoreVec<V>(dprefix + (tl.b * (K - 1) + (K - 1) + p) * C + tl.c, out);
        }
      }
    }
  }

  // Block partials: the kSubTiles runs summed in run order in double, one row of
  // partial[blockIdx.x] (C x (K+1)) per block; k == K is dbias.
  constexpr int kItems = kLanes * V * (K + 1);
  __shared__ float red[kSubTiles][kItems];
#pragma unroll
  for (int v = 0; v < V; ++v) {
#pragma unroll
    for (int k = 0; k <= K; ++k) {
      red[threadIdx.y][(threadIdx.x * V + v) * (K + 1) + k] = k < K ? dw[v][k] : db[v];
    }
  }
  __syncthreads();
  const int64_t c0 = int64_t(blockIdx.y) * kLanes * V;
  const int64_t items = (C - c0) * (K + 1) < kItems ? (C - c0) * (K + 1) : kItems;
  double* out = partial + (int64_t(blockIdx.x) * C + c0) * (K + 1);
  for (int i = threadIdx.y * kLanes + threadIdx.x; i < items; i += kLanes * kSubTiles) {
    double s = 0.0;
#pragma unroll
    for (int j = 0; j < kSubTiles; ++j) s += red[j][i];
    out[i] = s;
  }
}

// dweight/dbias from the blocks' chunk sums: item i = c * (K + 1) + k, k == K being dbias.
struct ParamSink {
  int64_t K;
  float* dweight;
  float* dbias;
  __device__ void operator()(int64_t i, double sum) const {
    const int64_t c = i / (K + 1), k = i % (K + 1);
    if (k < K) {
      dweight[c * K + k] += float(sum);
    } else if (dbias) {
      dbias[c] += float(sum);
    }
  }
};

// Widest vector (4, 2 or 1 elements of `elem` bytes, at most max_vec) that divides C and keeps
// every pointer aligned.
int VecWidth(int max_vec, size_t elem, int64_t C, std::initializer_list<const void*> ptrs) {
  for (const int v : {4, 2}) {
    bool ok = v <= max_vec && C % v == 0;
    for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % (v * elem) == 0;
    if (ok) return v;
  }
  return 1;
}

template <template <typename, int, int> class Launch, typename T, int V, typename... Args>
void DispatchK(int64_t K, Args&&... args) {
  switch (K) {
    case 1:
      return Launch<T, V, 1>::Run(args...);
    case 2:
      return Launch<T, V, 2>::Run(args...);
    case 3:
      return Launch<T, V, 3>::Run(args...);
    case 4:
      return Launch<T, V, 4>::Run(args...);
    case 5:
      return Launch<T, V, 5>::Run(args...);
    case 6:
      return Launch<T, V, 6>::Run(args...);
    case 7:
      return Launch<T, V, 7>::Run(args...);
    default:
      return Launch<T, V, 8>::Run(args...);
  }
}

template <template <typename, int, int> class Launch, typename T, int MaxVec, typename... Args>
void Dispatch(int vec, int64_t K, Args&&... args) {
  static_assert(kConv1dMaxK == 8);
  if constexpr (MaxVec >= 4) {
    if (vec == 4) return DispatchK<Launch, T, 4>(K, args...);
  }
  if (vec == 2) return DispatchK<Launch, T, 2>(K, args...);
  return DispatchK<Launch, T, 1>(K, args...);
}

dim3 TileGrid(int64_t B, int64_t L, int64_t C, int vec) {
  return dim3(static_cast<unsigned int>(B * TilesL(L)), GridFor(C, kLanes * vec));
}

template <typename T, int V, int K>
struct ForwardLaunch {
  static void Run(int64_t B, int64_t L, int64_t C, const T* x, const float* weight,
                  const float* bias, const T* prefix, bool silu, T* y, cudaStream_t stream) {
    ForwardKernel<T, V, K><<<TileGrid(B, L, C, V), dim3(kLanes, kSubTiles), 0, stream>>>(
        L, C, TilesL(L), x, weight, bias, prefix, silu, y);
  }
};

template <typename T, int V, int K>
struct BackwardLaunch {
  static void Run(int64_t B, int64_t L, int64_t C, const T* x, const float* weight,
                  const float* bias, const T* prefix, bool silu, const T* dy, const T* halo, T* dx,
                  T* dprefix, double* partial, cudaStream_t stream) {
    BackwardKernel<T, V, K><<<TileGrid(B, L, C, V), dim3(kLanes, kSubTiles), 0, stream>>>(
        L, C, TilesL(L), x, weight, bias, prefix, silu, dy, halo, dx, dprefix, partial);
  }
};

}  // namespace

template <typename T>
void CausalConv1dForwardCuda(int64_t B, int64_t L, int64_t C, int64_t K, const T* x,
                             const float* weight, const float* bias, const T* prefix, bool silu,
                             T* y, cudaStream_t stream) {
  MAMBA_CHECK(K >= 1 && K <= kConv1dMaxK)
      << "conv1d: kernel size " << K << " outside [1, " << kConv1dMaxK << "]";
  if (B * L * C == 0) return;
  Dispatch<ForwardLaunch, T, kFwdMaxVec>(VecWidth(kFwdMaxVec, sizeof(T), C, {x, prefix, y}), K, B,
                                         L, C, x, weight, bias, prefix, silu, y, stream);
  MAMBA_CUDA_CHECK_LAUNCH("conv1d_fwd");
}

// The halo holds activations: float-sized entries cover both dtypes.
size_t CausalConv1dBackwardWorkspaceBytes(int64_t B, int64_t L, int64_t C, int64_t K) {
  const int64_t tiles = B * TilesL(L);
  return Align(tiles * C * (K + 1) * sizeof(double)) + tiles * (K - 1) * C * sizeof(float);
}

template <typename T>
void CausalConv1dBackwardCuda(int64_t B, int64_t L, int64_t C, int64_t K, const T* x,
                              const float* weight, const float* bias, const T* prefix, bool silu,
                              const T* dy, T* dx, float* dweight, float* dbias, T* dprefix,
                              void* workspace, cudaStream_t stream) {
  MAMBA_CHECK(K >= 1 && K <= kConv1dMaxK)
      << "conv1d: kernel size " << K << " outside [1, " << kConv1dMaxK << "]";
  if (C == 0 || B == 0) return;
  if (L == 0) {  // no outputs feed the prefix: its gradient is zero, the parameters get nothing
    if (dprefix && K > 1) {
      MAMBA_CUDA_CHECK("conv1d_bwd",
                       cudaMemsetAsync(dprefix, 0, B * (K - 1) * C * sizeof(T), stream));
    }
    return;
  }
  if (K == 1) dprefix = nullptr;
  const int64_t tiles = B * TilesL(L);
  double* partial = static_cast<double*>(workspace);
  T* halo = nullptr;
  const int64_t n = B * L * C;
  if (K > 1 && dx < dy + n && dy < dx + n) {  // dx overlaps dy
    halo = reinterpret_cast<T*>(static_cast<char*>(workspace) +
                                Align(tiles * C * (K + 1) * sizeof(double)));
    HaloKernel<<<std::min(GridFor(tiles * (K - 1) * C, 256), 65536u), 256, 0, stream>>>(
        B, L, C, K, TilesL(L), dy, halo);
    MAMBA_CUDA_CHECK_LAUNCH("conv1d_bwd");
  }
  // bf16 takes 4-wide (8-byte) accesses: its packed loads leave room in the registers where fp32
  // spilled.
  constexpr int kMaxVec = std::is_same_v<T, float> ? kBwdMaxVec : 4;
  Dispatch<BackwardLaunch, T, kMaxVec>(
      VecWidth(kMaxVec, sizeof(T), C, {x, prefix, dy, halo, dx, dprefix}), K, B, L, C, x, weight,
      bias, prefix, silu, dy, static_cast<const T*>(halo), dx, dprefix, partial, stream);
  MAMBA_CUDA_CHECK_LAUNCH("conv1d_bwd");
  LaunchChunkSums(C * (K + 1), tiles, partial, ParamSink{K, dweight, dbias}, stream);
  MAMBA_CUDA_CHECK_LAUNCH("conv1d_bwd");
}

template void CausalConv1dForwardCuda<float>(int64_t, int64_t, int64_t, int64_t, const float*,
                                             const float*, const float*, const float*, bool, float*,
                                             cudaStream_t);
template void CausalConv1dForwardCuda<bf16>(int64_t, int64_t, int64_t, int64_t, const bf16*,
                                            const float*, const float*, const bf16*, bool, bf16*,
                                            cudaStream_t);
template void CausalConv1dBackwardCuda<float>(int64_t, int64_t, int64_t, int64_t, const float*,
                                              const float*, const float*, const float*, bool,
                                              const float*, float*, float*, float*, float*, void*,
                                              cudaStream_t);
template void CausalConv1dBackwardCuda<bf16>(int64_t, int64_t, int64_t, int64_t, const bf16*,
                                             const float*, const float*, const bf16*, bool,
                                             const bf16*, bf16*, float*, float*, bf16*, void*,
                                             cudaStream_t);

}  // namespace mamba::kernels
