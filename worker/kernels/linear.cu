#include "worker/kernels/linear.h"

#include <algorithm>
#include <climits>

#include "worker/kernels/cuda_check.h"

namespace mamba::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kRowsPerChunk = 64;
constexpr int64_t kMaxRowChunks = 256;

#define MAMBA_CUBLAS_CHECK(op, expr)                                                  \
  do {                                                                                \
    const cublasStatus_t mamba_status_ = (expr);                                      \
    MAMBA_CHECK(mamba_status_ == CUBLAS_STATUS_SUCCESS)                               \
        << "cuBLAS error in " << (op) << ": " << #expr << ": "                        \
        << cublasGetStatusName(mamba_status_) << " (" << cublasGetStatusString(mamba_status_) \
        << ")";                                                                       \
  } while (0)

int64_t RowChunks(int64_t M) {
  return std::max<int64_t>(1, std::min(kMaxRowChunks, (M + kRowsPerChunk - 1) / kRowsPerChunk));
}

// Column-major C(m, n) = op(A) op(B) + beta C in fp32 storage.
void Gemm(const char* op, cublasHandle_t handle, bool tf32, cublasOperation_t ta,
          cublasOperation_t tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  MAMBA_CHECK(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX &&
              ldc <= INT_MAX)
      << op << ": gemm size " << m << "x" << n << "x" << k << " exceeds the cuBLAS int range";
  const float alpha = 1.f;
  const cublasComputeType_t compute =
      tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F_PEDANTIC;
  MAMBA_CUBLAS_CHECK(op, cublasGemmEx(handle, ta, tb, int(m), int(n), int(k), &alpha, a,
                                      CUDA_R_32F, int(lda), b, CUDA_R_32F, int(ldb), &beta, c,
                                      CUDA_R_32F, int(ldc), compute, CUBLAS_GEMM_DEFAULT));
}

__global__ void BroadcastRowsKernel(int64_t M, int64_t N, const float* bias, float* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < M * N;
       i += int64_t(gridDim.x) * blockDim.x) {
    y[i] = bias ? bias[i % N] : 0.f;
  }
}

// Block (x, c): columns x*blockDim + tid, rows of chunk c, summed in row order.
__global__ void ColumnSumPartialKernel(int64_t M, int64_t N, int64_t chunks, const float* dy,
                                       double* partial) {
  const int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  const int64_t c = blockIdx.y;
  const int64_t r_begin = M * c / chunks, r_end = M * (c + 1) / chunks;
  double s = 0.0;
  for (int64_t r = r_begin; r < r_end; ++r) s += double(dy[r * N + n]);
  partial[c * N + n] = s;
}

__global__ void ColumnSumFinalKernel(int64_t N, int64_t chunks, const double* partial,
                                     float* dbias) {
  const int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  double s = 0.0;
  for (int64_t c = 0; c < chunks; ++c) s += partial[c * N + n];
  dbias[n] += float(s);
}

unsigned int CappedBlocks(int64_t n) { return std::min(GridFor(n, kThreads), 1048576u); }

}  // namespace

void LinearForwardCuda(cublasHandle_t handle, bool tf32, int64_t M, int64_t N, int64_t K,
                       const float* x, const float* w, const float* bias, float* y,
                       cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  // Seed y with the bias (or zeros) so that one GEMM with beta = 1 adds the product to it.
  BroadcastRowsKernel<<<CappedBlocks(M * N), kThreads, 0, stream>>>(M, N, bias, y);
  MAMBA_CUDA_CHECK_LAUNCH("linear_fwd");
  if (K == 0) return;
  // Column-major: y^T(N, M) = w^T(K, N)^T x^T(K, M).
  Gemm("linear_fwd", handle, tf32, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, w, K, x, K, 1.f, y, N);
}

size_t LinearBackwardWorkspaceBytes(int64_t M, int64_t N) {
  return RowChunks(M) * N * sizeof(double);
}

void LinearBackwardCuda(cublasHandle_t handle, bool tf32, int64_t M, int64_t N, int64_t K,
                        const float* dy, const float* x, const float* w, float* dx, float* dw,
                        float* dbias, void* workspace, cudaStream_t stream) {
  if (dx && M > 0 && K > 0) {
    if (N == 0) {
      MAMBA_CUDA_CHECK("linear_bwd", cudaMemsetAsync(dx, 0, M * K * sizeof(float), stream));
    } else {
      // dx^T(K, M) = w^T(K, N) dy^T(N, M).
      Gemm("linear_bwd_dx", handle, tf32, CUBLAS_OP_N, CUBLAS_OP_N, K, M, N, w, K, dy, N, 0.f, dx,
           K);
    }
  }
  if (M == 0 || N == 0) return;
  if (K > 0) {
    // dw^T(K, N) += x^T(K, M) dy(M, N), dy(M, N) being the transpose of dy^T(N, M).
    Gemm("linear_bwd_dw", handle, tf32, CUBLAS_OP_N, CUBLAS_OP_T, K, N, M, x, K, dy, N, 1.f, dw,
         K);
  }
  if (dbias) {
    const int64_t chunks = RowChunks(M);
    double* partial = static_cast<double*>(workspace);
    const dim3 grid(GridFor(N, kThreads), static_cast<unsigned int>(chunks));
    ColumnSumPartialKernel<<<grid, kThreads, 0, stream>>>(M, N, chunks, dy, partial);
    MAMBA_CUDA_CHECK_LAUNCH("linear_bwd_dbias");
    ColumnSumFinalKernel<<<GridFor(N, kThreads), kThreads, 0, stream>>>(N, chunks, partial, dbias);
    MAMBA_CUDA_CHECK_LAUNCH("linear_bwd_dbias");
  }
}

}  // namespace mamba::kernels
