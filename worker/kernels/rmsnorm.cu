#include <algorithm>

#include "worker/kernels/cuda_check.h"
#include "worker/kernels/cuda_dtype.cuh"
#include "worker/kernels/cuda_reduce.cuh"
#include "worker/kernels/rmsnorm.h"

namespace mamba::kernels {
namespace {

constexpr int kThreads = 256;
// Row chunks of the dweight reduction (at most this many; fixed by `rows`).
constexpr int64_t kMaxRowChunks = 256;

int64_t RowChunks(int64_t rows) { return std::max<int64_t>(1, std::min(rows, kMaxRowChunks)); }

template <typename TX, typename TY>
__global__ void AddRmsNormForwardKernel(int64_t dim, const float* residual_in, const TX* x,
                                        const float* weight, float eps, float* residual_out, TY* y,
                                        float* rstd) {
  __shared__ float scratch[32];
  const int64_t base = blockIdx.x * dim;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = residual_in ? residual_in[base + i] + Load(x + base + i) : Load(x + base + i);
    residual_out[base + i] = v;
    sum_sq += v * v;
  }
  sum_sq = BlockSum(sum_sq, scratch);
  const float s = rsqrtf(sum_sq / float(dim) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = s;
  // Each thread reads back only the entries it wrote itself.
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    Store(y + base + i, residual_out[base + i] * s * weight[i]);
  }
}

// Block c handles rows [c*rows/chunks, (c+1)*rows/chunks): dx for each row, and the chunk's
// dweight partial (double) in partial[c * dim + i], owned by the thread of column i.
template <typename T>
__global__ void AddRmsNormBackwardKernel(int64_t rows, int64_t dim, int64_t chunks, const T* dy,
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
      const float g = Load(dy + base + i), res = residual_out[base + i];
      dot += g * weight[i] * res;
      dw[i] += double(g) * double(res) * double(s);
    }
    dot = BlockSum(dot, scratch);  // its barriers also order every read of dy before the writes
    const float k = s * s * dot / float(dim);
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
      float v = s * (Load(dy + base + i) * weight[i] - residual_out[base + i] * k);
      if (dresidual_out) v += dresidual_out[base + i];
      dx[base + i] = v;
    }
    __syncthreads();  // dx may alias dy: the next row's reads must not overtake these writes
  }
}

}  // namespace

template <typename TX, typename TY>
void AddRmsNormForwardCuda(int64_t rows, int64_t dim, const float* residual_in, const TX* x,
                           const float* weight, float eps, float* residual_out, TY* y, float* rstd,
                           cudaStream_t stream) {
  if (rows == 0) return;
  MAMBA_CHECK(rows < (int64_t(1) << 31)) << "rmsnorm: too many rows";
  AddRmsNormForwardKernel<<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
      dim, residual_in, x, weight, eps, residual_out, y, rstd);
  MAMBA_CUDA_CHECK_LAUNCH("rmsnorm_fwd");
}

size_t AddRmsNormBackwardWorkspaceBytes(int64_t rows, int64_t dim) {
  return RowChunks(rows) * dim * sizeof(double);
}

template <typename T>
void AddRmsNormBackwardCuda(int64_t rows, int64_t dim, const T* dy, const float* dresidual_out,
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
                                            const float*, const float*, const float*, float*,
                                            float*, void*, cudaStream_t);
template void AddRmsNormBackwardCuda<bf16>(int64_t, int64_t, const bf16*, const float*,
                                           const float*, const float*, const float*, float*, float*,
                                           void*, cudaStream_t);

}  // namespace mamba::kernels
