#include <algorithm>

#include "worker/kernels/cuda_check.h"
#include "worker/kernels/cuda_reduce.cuh"
#include "worker/kernels/rmsnorm.h"

namespace mamba::kernels {
namespace {

constexpr int kThreads = 256;
// Row chunks of the dweight reduction (at most this many; fixed by `rows`).
constexpr int64_t kMaxRowChunks = 256;

int64_t RowChunks(int64_t rows) { return std::max<int64_t>(1, std::min(rows, kMaxRowChunks)); }

__global__ void AddRmsNormForwardKernel(int64_t dim, const float* residual_in, const float* x,
                                        const float* weight, float eps, float* residual_out,
                                        float* y, float* rstd) {
  __shared__ float scratch[32];
  const int64_t base = blockIdx.x * dim;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = residual_in ? residual_in[base + i] + x[base + i] : x[base + i];
    residual_out[base + i] = v;
    sum_sq += v * v;
  }
  sum_sq = BlockSum(sum_sq, scratch);
  const float s = rsqrtf(sum_sq / float(dim) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = s;
  // Each thread reads back only the entries it wrote itself.
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    y[base + i] = residual_out[base + i] * s * weight[i];
  }
}

// Block c handles rows [c*rows/chunks, (c+1)*rows/chunks): dx for each row, and the chunk's
// dweight partial (double) in partial[c * dim + i], owned by the thread of column i.
__global__ void AddRmsNormBackwardKernel(int64_t rows, int64_t dim, int64_t chunks, const float* dy,
                                         const float* dresidual_out, const float* residual_out,
                                         const float* weight, const float* rstd, float* dx,
                                         double* partial) {
  __shared__ float scratch[32];
  const int64_t c = blockIdx.x;
  const int64_t r_begin = rows * c / chunks, r_end = rows * (c + 1) / chunks;
  double* dw = partial + c * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) dw[i] = 0.0;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t base = r * dim;
    const float s = rstd[r];
    float dot = 0.f;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
      const float g = dy[base + i], res = residual_out[base + i];
      dot += g * weight[i] * res;
      dw[i] += double(g) * double(res) * double(s);
    }
    dot = BlockSum(dot, scratch);  // its barriers also order every read of dy before the writes
    const float k = s * s * dot / float(dim);
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
      float v = s * (dy[base + i] * weight[i] - residual_out[base + i] * k);
      if (dresidual_out) v += dresidual_out[base + i];
      dx[base + i] = v;
    }
    __syncthreads();  // dx may alias dy: the next row's reads must not overtake these writes
  }
}

}  // namespace

void AddRmsNormForwardCuda(int64_t rows, int64_t dim, const float* residual_in, const float* x,
                           const float* weight, float eps, float* residual_out, float* y,
                           float* rstd, cudaStream_t stream) {
  if (rows == 0) return;
  MAMBA_CHECK(rows < (int64_t(1) << 31)) << "rmsnorm: too many rows";
  AddRmsNormForwardKernel<<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
      dim, residual_in, x, weight, eps, residual_out, y, rstd);
  MAMBA_CUDA_CHECK_LAUNCH("rmsnorm_fwd");
}

size_t AddRmsNormBackwardWorkspaceBytes(int64_t rows, int64_t dim) {
  return RowChunks(rows) * dim * sizeof(double);
}

void AddRmsNormBackwardCuda(int64_t rows, int64_t dim, const float* dy, const float* dresidual_out,
                            const float* residual_out, const float* weight, const float* rstd,
                            float* dx, float* dweight, void* workspace, cudaStream_t stream) {
  if (dim == 0) return;
  const int64_t chunks = RowChunks(rows);
  double* partial = static_cast<double*>(workspace);
  if (rows > 0) {
    AddRmsNormBackwardKernel<<<static_cast<unsigned int>(chunks), kThreads, 0, stream>>>(
        rows, dim, chunks, dy, dresidual_out, residual_out, weight, rstd, dx, partial);
    MAMBA_CUDA_CHECK_LAUNCH("rmsnorm_bwd");
  }
  AddChunkSumsKernel<<<GridFor(dim, kThreads), kThreads, 0, stream>>>(dim, rows > 0 ? chunks : 0,
                                                                      partial, dweight);
  MAMBA_CUDA_CHECK_LAUNCH("rmsnorm_bwd");
}

}  // namespace mamba::kernels
