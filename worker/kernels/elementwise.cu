#include "worker/kernels/cuda_check.h"
#include "worker/kernels/cuda_dtype.cuh"
#include "worker/kernels/cuda_reduce.cuh"
#include "worker/kernels/elementwise.h"

namespace mamba::kernels {
namespace {

constexpr int kThreads = 256;
// Partial sums of SumSquares: a constant, so the summation order is the same on every device.
constexpr int kSumBlocks = 256;

unsigned int Blocks(int64_t n) {
  const unsigned int b = GridFor(n, kThreads);
  return b > 1048576u ? 1048576u : b;
}

#define MAMBA_GRID_STRIDE(i, n)                                             \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); \
       i += int64_t(gridDim.x) * blockDim.x)

__global__ void NegExpKernel(int64_t n, const float* x, float* y) {
  MAMBA_GRID_STRIDE(i, n) y[i] = -expf(x[i]);
}

__global__ void AddProductKernel(int64_t n, const float* a, const float* b, float* dst) {
  MAMBA_GRID_STRIDE(i, n) dst[i] += a[i] * b[i];
}

template <typename TS, typename TD>
__global__ void AddKernel(int64_t n, const TS* src, TD* dst) {
  MAMBA_GRID_STRIDE(i, n) Store(dst + i, Load(dst + i) + Load(src + i));
}

__global__ void ScaleKernel(int64_t n, float* x, float s) { MAMBA_GRID_STRIDE(i, n) x[i] *= s; }

// Block b sums the elements b*kThreads + tid + k*kSumBlocks*kThreads in k order.
__global__ void SumSquaresPartialKernel(int64_t n, const float* x, double* partial) {
  __shared__ double scratch[32];
  double s = 0;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n;
       i += int64_t(kSumBlocks) * kThreads) {
    s += double(x[i]) * double(x[i]);
  }
  s = BlockSum(s, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// Thread j adds partial j of every span, in span order; then one fixed tree.
__global__ void SumSquaresFinalKernel(int64_t spans, const double* partial, double* result) {
  __shared__ double scratch[32];
  double s = 0;
  for (int64_t t = 0; t < spans; ++t) s += partial[t * kSumBlocks + threadIdx.x];
  s = BlockSum(s, scratch);
  if (threadIdx.x == 0) *result = s;
}

}  // namespace

void NegExpCuda(int64_t n, const float* x, float* y, cudaStream_t stream) {
  if (n == 0) return;
  NegExpKernel<<<Blocks(n), kThreads, 0, stream>>>(n, x, y);
  MAMBA_CUDA_CHECK_LAUNCH("negexp");
}

void AddProductCuda(int64_t n, const float* a, const float* b, float* dst, cudaStream_t stream) {
  if (n == 0) return;
  AddProductKernel<<<Blocks(n), kThreads, 0, stream>>>(n, a, b, dst);
  MAMBA_CUDA_CHECK_LAUNCH("addproduct");
}

template <typename TS, typename TD>
void AddCuda(int64_t n, const TS* src, TD* dst, cudaStream_t stream) {
  if (n == 0) return;
  AddKernel<<<Blocks(n), kThreads, 0, stream>>>(n, src, dst);
  MAMBA_CUDA_CHECK_LAUNCH("add");
}

void ScaleCuda(int64_t n, float* x, float s, cudaStream_t stream) {
  if (n == 0) return;
  ScaleKernel<<<Blocks(n), kThreads, 0, stream>>>(n, x, s);
  MAMBA_CUDA_CHECK_LAUNCH("scale");
}

size_t SumSquaresWorkspaceBytes(size_t count) { return count * kSumBlocks * sizeof(double); }

void SumSquaresCuda(const FloatSpan* xs, size_t count, double* result, void* workspace,
                    cudaStream_t stream) {
  double* partial = static_cast<double*>(workspace);
  for (size_t t = 0; t < count; ++t) {
    SumSquaresPartialKernel<<<kSumBlocks, kThreads, 0, stream>>>(xs[t].n, xs[t].data,
                                                                 partial + t * kSumBlocks);
    MAMBA_CUDA_CHECK_LAUNCH("sum_squares");
  }
  static_assert(kSumBlocks % 32 == 0 && kSumBlocks <= 1024, "one block combines the partials");
  SumSquaresFinalKernel<<<1, kSumBlocks, 0, stream>>>(int64_t(count), partial, result);
  MAMBA_CUDA_CHECK_LAUNCH("sum_squares");
}

template void AddCuda<float, float>(int64_t, const float*, float*, cudaStream_t);
template void AddCuda<float, bf16>(int64_t, const float*, bf16*, cudaStream_t);
template void AddCuda<bf16, float>(int64_t, const bf16*, float*, cudaStream_t);
template void AddCuda<bf16, bf16>(int64_t, const bf16*, bf16*, cudaStream_t);

namespace {

template <typename W>
__global__ void Copy2DKernel(const char* src, int64_t src_pitch, char* dst, int64_t dst_pitch,
                             int64_t row_words, int64_t rows) {
  const int64_t n = row_words * rows;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / row_words, c = i - r * row_words;
    reinterpret_cast<W*>(dst + r * dst_pitch)[c] =
        reinterpret_cast<const W*>(src + r * src_pitch)[c];
  }
}

}  // namespace

void Copy2DCuda(const void* src, int64_t src_pitch, void* dst, int64_t dst_pitch, int64_t row_bytes,
                int64_t rows, cudaStream_t stream) {
  if (rows == 0 || row_bytes == 0) return;
  const auto s = reinterpret_cast<uintptr_t>(src), d = reinterpret_cast<uintptr_t>(dst);
  const bool words =
      (s | d | uint64_t(src_pitch) | uint64_t(dst_pitch) | uint64_t(row_bytes)) % 4 == 0;
  const int64_t unit = words ? 4 : 1, n = row_bytes / unit * rows;
  unsigned int blocks = GridFor(n, kThreads);
  if (blocks > 65536u) blocks = 65536u;
  const char* sp = static_cast<const char*>(src);
  char* dp = static_cast<char*>(dst);
  if (words) {
    Copy2DKernel<uint32_t>
        <<<blocks, kThreads, 0, stream>>>(sp, src_pitch, dp, dst_pitch, row_bytes / 4, rows);
  } else {
    Copy2DKernel<unsigned char>
        <<<blocks, kThreads, 0, stream>>>(sp, src_pitch, dp, dst_pitch, row_bytes, rows);
  }
  MAMBA_CUDA_CHECK_LAUNCH("copy_2d");
}

}  // namespace mamba::kernels
