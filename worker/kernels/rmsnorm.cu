#include <algorithm>

#include "worker/kernels/cuda_check.h"
#include "worker/kernels/cuda_dtype.cuh"
#include "worker/kernels/cuda_reduce.cuh"
#include "worker/kernels/rmsnorm.h"

namespace mamba::kernels {
namespace {

constexpr int kThreads = 256;
// Row chunks of the dweight reduction (at most this many; fixed by `rows`): enough blocks to
// fill the GPU, each walking its rows in order.
constexpr int64_t kMaxRowChunks = 2048;
// Widest row the backward takes: kThreads * 32 columns.
constexpr int64_t kMaxBackwardDim = kThreads * 32;

int64_t RowChunks(int64_t rows) { return std::max<int64_t>(1, std::min(rows, kMaxRowChunks)); }

// A row is owned by the whole block (kWarp false) or, for rows of at most kWarpDim columns, by
// one warp (a block runs kWarps rows at once): a block a row left most of its threads idle on
// narrow models and waited on block-wide barriers per row.
constexpr int64_t kWarpDim = 128;
constexpr int kWarps = kThreads / 32;

// The threads that share a row: their count, this thread's place among them, their sum.
template <bool kWarp>
struct RowTeam {
  static constexpr int kSize = kWarp ? 32 : kThreads;
  __device__ static int Index() { return kWarp ? threadIdx.x & 31 : threadIdx.x; }
  __device__ static int Slot() { return kWarp ? threadIdx.x >> 5 : 0; }  // the team's row slot
  static constexpr int kSlots = kWarp ? kWarps : 1;
  // Every thread of the team gets the sum; the block version's barriers also order the team's
  // earlier reads before its later writes, as the warp's shuffles do within a warp.
  __device__ static float Sum(float v, float* scratch) {
    if constexpr (kWarp) {
      return WarpSum(v);
    } else {
      return BlockSum(v, scratch);
    }
  }
};

template <bool kWarp, typename TX, typename TY>
__global__ void AddRmsNormForwardKernel(int64_t rows, int64_t dim, const float* residual_in,
                                        const TX* x, const float* weight, float eps,
                                        float* residual_out, TY* y, float* rstd) {
  using Team = RowTeam<kWarp>;
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x * int64_t(Team::kSlots) + Team::Slot();
  if (r >= rows) return;  // whole teams only: a warp team's row, or the block's
  const int64_t base = r * dim;
  float sum_sq = 0.f;
  for (int64_t i = Team::Index(); i < dim; i += Team::kSize) {
    const float v = residual_in ? residual_in[base + i] + Load(x + base + i) : Load(x + base + i);
    residual_out[base + i] = v;
    sum_sq += v * v;
  }
  sum_sq = Team::Sum(sum_sq, scratch);
  const float s = rsqrtf(sum_sq / float(dim) + eps);
  if (Team::Index() == 0) rstd[r] = s;
  // Each thread reads back only the entries it wrote itself.
  for (int64_t i = Team::Index(); i < dim; i += Team::kSize) {
    Store(y + base + i, residual_out[base + i] * s * weight[i]);
  }
}

// Block c handles rows [c*rows/chunks, (c+1)*rows/chunks): dx for each row, and the chunk's
// dweight partial (double) in partial[c * dim + i]. A team (the block, or each warp taking every
// kWarps-th row of the chunk) owns a row; its thread t the columns t + j * team size, j < kCols,
// whose dweight partials stay in registers (in double, added in row order) and each row's loads
// are issued together before the row's reduction. Warp teams' partials add up in warp order.
template <bool kWarp, typename T, int kCols>
__global__ void __launch_bounds__(kThreads)
    AddRmsNormBackwardKernel(int64_t rows, int64_t dim, int64_t chunks, const T* dy,
                             const float* dresidual_out, const float* residual_out,
                             const float* weight, const float* rstd, float* dx, bf16* dx_bf16,
                             double* partial) {
  using Team = RowTeam<kWarp>;
  __shared__ float scratch[32];
  __shared__ double team_dw[Team::kSlots][kWarp ? kWarpDim : 1];
  const int64_t c = blockIdx.x;
  const int64_t r_begin = rows * c / chunks, r_end = rows * (c + 1) / chunks;
  double dw[kCols];
  float w[kCols];
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    const int64_t i = Team::Index() + j * int64_t(Team::kSize);
    dw[j] = 0.0;
    w[j] = i < dim ? weight[i] : 0.f;
  }
  for (int64_t r = r_begin + Team::Slot(); r < r_end; r += Team::kSlots) {
    const int64_t base = r * dim;
    const float s = rstd[r];
    float g[kCols], res[kCols];
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      const int64_t i = Team::Index() + j * int64_t(Team::kSize);
      g[j] = i < dim ? Load(dy + base + i) : 0.f;
      res[j] = i < dim ? residual_out[base + i] : 0.f;
    }
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      dot += g[j] * w[j] * res[j];
      dw[j] += double(g[j]) * double(res[j]) * double(s);
    }
    dot = Team::Sum(dot, scratch);  // every read of dy is done before the writes (dx may be dy)
    const float k = s * s * dot / float(dim);
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      const int64_t i = Team::Index() + j * int64_t(Team::kSize);
      if (i >= dim) continue;
      float v = s * (g[j] * w[j] - res[j] * k);
      if (dresidual_out) v += dresidual_out[base + i];
      dx[base + i] = v;
      if (dx_bf16) dx_bf16[base + i] = __float2bfloat16_rn(v);
    }
  }
  if constexpr (!kWarp) {
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      const int64_t i = Team::Index() + j * int64_t(Team::kSize);
      if (i < dim) partial[c * dim + i] = dw[j];
    }
  } else {
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      if (Team::Index() + 32 * j < kWarpDim) team_dw[Team::Slot()][Team::Index() + 32 * j] = dw[j];
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
      double sum = 0.0;
      for (int v = 0; v < kWarps; ++v) sum += team_dw[v][i];
      partial[c * dim + i] = sum;
    }
  }
}

}  // namespace

template <typename TX, typename TY>
void AddRmsNormForwardCuda(int64_t rows, int64_t dim, const float* residual_in, const TX* x,
                           const float* weight, float eps, float* residual_out, TY* y, float* rstd,
                           cudaStream_t stream) {
  if (rows == 0) return;
  MAMBA_CHECK(rows < (int64_t(1) << 31)) << "rmsnorm: too many rows";
  if (dim <= kWarpDim) {
    AddRmsNormForwardKernel<true>
        <<<static_cast<unsigned int>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
            rows, dim, residual_in, x, weight, eps, residual_out, y, rstd);
  } else {
    AddRmsNormForwardKernel<false><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
        rows, dim, residual_in, x, weight, eps, residual_out, y, rstd);
  }
  MAMBA_CUDA_CHECK_LAUNCH("rmsnorm_fwd");
}

size_t AddRmsNormBackwardWorkspaceBytes(int64_t rows, int64_t dim) {
  return RowChunks(rows) * dim * sizeof(double);
}

template <typename T>
void AddRmsNormBackwardCuda(int64_t rows, int64_t dim, const T* dy, const float* dresidual_out,
                            const float* residual_out, const float* weight, const float* rstd,
                            float* dx, bf16* dx_bf16, float* dweight, void* workspace,
                            cudaStream_t stream) {
  if (dim == 0) return;
  const int64_t chunks = RowChunks(rows);
  double* partial = static_cast<double*>(workspace);
  if (rows > 0) {
    MAMBA_CHECK(dim <= kMaxBackwardDim)
        << "rmsnorm_bwd: dim " << dim << " above " << kMaxBackwardDim;
    const unsigned int blocks = static_cast<unsigned int>(chunks);
#define MAMBA_LAUNCH(cols)                                                   \
  AddRmsNormBackwardKernel<false, T, cols><<<blocks, kThreads, 0, stream>>>( \
      rows, dim, chunks, dy, dresidual_out, residual_out, weight, rstd, dx, dx_bf16, partial)
    const int64_t cols = (dim + kThreads - 1) / kThreads;
#define MAMBA_LAUNCH_WARP(cols)                                             \
  AddRmsNormBackwardKernel<true, T, cols><<<blocks, kThreads, 0, stream>>>( \
      rows, dim, chunks, dy, dresidual_out, residual_out, weight, rstd, dx, dx_bf16, partial)
    if (dim <= 32) {
      MAMBA_LAUNCH_WARP(1);
    } else if (dim <= 64) {
      MAMBA_LAUNCH_WARP(2);
    } else if (dim <= kWarpDim) {
      MAMBA_LAUNCH_WARP(4);
    } else if (cols <= 1) {
      MAMBA_LAUNCH(1);
    } else if (cols <= 2) {
      MAMBA_LAUNCH(2);
    } else if (cols <= 4) {
      MAMBA_LAUNCH(4);
    } else if (cols <= 8) {
      MAMBA_LAUNCH(8);
    } else if (cols <= 16) {
      MAMBA_LAUNCH(16);
    } else {
      MAMBA_LAUNCH(32);
    }
#undef MAMBA_LAUNCH
#undef MAMBA_LAUNCH_WARP
    MAMBA_CUDA_CHECK_LAUNCH("rmsnorm_bwd");
  }
  LaunchAddChunkSums(dim, rows > 0 ? chunks : 0, partial, dweight, stream);
  MAMBA_CUDA_CHECK_LAUNCH("rmsnorm_bwd");
}

#define MAMBA_INSTANTIATE_FWD(TX, TY)                                                    \
  template void AddRmsNormForwardCuda<TX, TY>(int64_t, int64_t, const float*, const TX*, \
                                              const float*, float, float*, TY*, float*,  \
                                              cudaStream_t);
MAMBA_INSTANTIATE_FWD(float, float)
MAMBA_INSTANTIATE_FWD(float, bf16)
MAMBA_INSTANTIATE_FWD(bf16, float)
MAMBA_INSTANTIATE_FWD(bf16, bf16)
#undef MAMBA_INSTANTIATE_FWD
template void AddRmsNormBackwardCuda<float>(int64_t, int64_t, const float*, const float*,
                                            const float*, const float*, const float*, float*, bf16*,
                                            float*, void*, cudaStream_t);
template void AddRmsNormBackwardCuda<bf16>(int64_t, int64_t, const bf16*, const float*,
                                           const float*, const float*, const float*, float*, bf16*,
                                           float*, void*, cudaStream_t);

}  // namespace mamba::kernels
