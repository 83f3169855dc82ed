#include <cuda_bf16.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "worker/kernels/convert.h"
#include "worker/kernels/cuda_check.h"
#include "worker/kernels/cuda_reduce.cuh"
#include "worker/kernels/linear.h"

namespace mamba::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kRowsPerChunk = 64;
constexpr int64_t kMaxRowChunks = 256;

#define MAMBA_CUBLAS_CHECK(op, expr)                                                          \
  do {                                                                                        \
    const cublasStatus_t mamba_status_ = (expr);                                              \
    MAMBA_CHECK(mamba_status_ == CUBLAS_STATUS_SUCCESS)                                       \
        << "cuBLAS error in " << (op) << ": " << #expr << ": "                                \
        << cublasGetStatusName(mamba_status_) << " (" << cublasGetStatusString(mamba_status_) \
        << ")";                                                                               \
  } while (0)

int64_t RowChunks(int64_t M) {
  return std::max<int64_t>(1, std::min(kMaxRowChunks, (M + kRowsPerChunk - 1) / kRowsPerChunk));
}

size_t ElemBytes(GemmMatrix t) { return t.bf16 ? sizeof(__nv_bfloat16) : sizeof(float); }

// Column-major C(m, n) = op(A) op(B) + beta C. A and B are bf16 in kBf16 mode, fp32 otherwise; C
// is fp32, or bf16 in kBf16 mode.
void Gemm(const char* op, cublasHandle_t handle, GemmPrecision precision, cublasOperation_t ta,
          cublasOperation_t tb, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
          const void* b, int64_t ldb, float beta, GemmMatrix c, int64_t ldc) {
  MAMBA_CHECK(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX &&
              ldc <= INT_MAX)
      << op << ": gemm size " << m << "x" << n << "x" << k << " exceeds the cuBLAS int range";
  MAMBA_CHECK(precision == GemmPrecision::kBf16 || !c.bf16)
      << op << ": a bf16 output needs GemmPrecision::kBf16";
  const float alpha = 1.f;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F_PEDANTIC;
  cudaDataType_t in_type = CUDA_R_32F;
  if (precision == GemmPrecision::kTf32) compute = CUBLAS_COMPUTE_32F_FAST_TF32;
  if (precision == GemmPrecision::kBf16) {
    compute = CUBLAS_COMPUTE_32F;  // bf16 products, fp32 accumulation
    in_type = CUDA_R_16BF;
  }
  MAMBA_CUBLAS_CHECK(
      op, cublasGemmEx(handle, ta, tb, int(m), int(n), int(k), &alpha, a, in_type, int(lda), b,
                       in_type, int(ldb), &beta, c.data, c.bf16 ? CUDA_R_16BF : CUDA_R_32F,
                       int(ldc), compute, CUBLAS_GEMM_DEFAULT));
}

// Workspace carving: every piece starts on a 256-byte boundary (cuBLAS's preferred alignment).
size_t AlignUp(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Workspace for the bf16 copy of an n-element operand: only fp32 ones in kBf16 mode need one.
size_t OperandBytes(GemmPrecision precision, int64_t n, GemmMatrix t) {
  return precision == GemmPrecision::kBf16 && !t.bf16 ? AlignUp(n * sizeof(__nv_bfloat16)) : 0;
}

// Bump allocation of bf16 copies in a workspace laid out by the *WorkspaceBytes functions.
class Bf16Scratch {
 public:
  explicit Bf16Scratch(void* base) : next_(static_cast<char*>(base)) {}

  // The n-element operand as the GEMMs take it: bf16 in kBf16 mode (an fp32 one rounded into the
  // scratch), fp32 otherwise.
  const void* Operand(const char* op, GemmPrecision precision, int64_t n, GemmMatrix t,
                      cudaStream_t stream) {
    if (precision != GemmPrecision::kBf16) {
      MAMBA_CHECK(!t.bf16) << op << ": a bf16 operand needs GemmPrecision::kBf16";
      return t.data;
    }
    if (t.bf16) return t.data;
    void* copy = next_;
    next_ += OperandBytes(precision, n, t);
    FloatToBf16Cuda(n, static_cast<const float*>(t.data), copy, stream);
    return copy;
  }

 private:
  char* next_;
};

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void Store(float* p, float v) { *p = v; }
__device__ __forceinline__ void Store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename T>
__global__ void BroadcastRowsKernel(int64_t M, int64_t N, const float* bias, T* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < M * N;
       i += int64_t(gridDim.x) * blockDim.x) {
    Store(y + i, bias ? bias[i % N] : 0.f);
  }
}

// Block (x, c): columns x*blockDim + tid, rows of chunk c, summed in row order.
template <typename T>
__global__ void ColumnSumPartialKernel(int64_t M, int64_t N, int64_t chunks, const T* dy,
                                       double* partial) {
  const int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  const int64_t c = blockIdx.y;
  const int64_t r_begin = M * c / chunks, r_end = M * (c + 1) / chunks;
  double s = 0.0;
  for (int64_t r = r_begin; r < r_end; ++r) s += double(ToFloat(dy[r * N + n]));
  partial[c * N + n] = s;
}

unsigned int CappedBlocks(int64_t n) { return std::min(GridFor(n, kThreads), 1048576u); }

}  // namespace

size_t LinearForwardWorkspaceBytes(GemmPrecision precision, int64_t M, int64_t N, int64_t K,
                                   GemmMatrix x, GemmMatrix w) {
  return OperandBytes(precision, M * K, x) + OperandBytes(precision, N * K, w);
}

void LinearForwardCuda(cublasHandle_t handle, GemmPrecision precision, int64_t M, int64_t N,
                       int64_t K, GemmMatrix x, GemmMatrix w, const float* bias, GemmMatrix y,
                       void* workspace, cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  // A bias (or, with nothing to multiply, zeros) seeds y for a GEMM with beta 1; without one the
  // GEMM overwrites y (beta 0), saving a pass over it.
  const bool seed = bias != nullptr || K == 0;
  if (seed) {
    if (y.bf16) {
      BroadcastRowsKernel<<<CappedBlocks(M * N), kThreads, 0, stream>>>(
          M, N, bias, static_cast<__nv_bfloat16*>(y.data));
    } else {
      BroadcastRowsKernel<<<CappedBlocks(M * N), kThreads, 0, stream>>>(
          M, N, bias, static_cast<float*>(y.data));
    }
    MAMBA_CUDA_CHECK_LAUNCH("linear_fwd");
  }
  if (K == 0) return;
  Bf16Scratch scratch(workspace);
  const void* xa = scratch.Operand("linear_fwd", precision, M * K, x, stream);
  const void* wa = scratch.Operand("linear_fwd", precision, N * K, w, stream);
  // Column-major: y^T(N, M) = w^T(K, N)^T x^T(K, M).
  Gemm("linear_fwd", handle, precision, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, wa, K, xa, K,
       seed ? 1.f : 0.f, y, N);
}

size_t LinearBackwardWorkspaceBytes(GemmPrecision precision, int64_t M, int64_t N, int64_t K,
                                    GemmMatrix dy, GemmMatrix x, GemmMatrix w, GemmMatrix dx) {
  size_t bytes = AlignUp(RowChunks(M) * N * sizeof(double));
  bytes += OperandBytes(precision, M * N, dy) + OperandBytes(precision, M * K, x);
  if (dx.data) bytes += OperandBytes(precision, N * K, w);
  return bytes;
}

void LinearBackwardCuda(cublasHandle_t handle, GemmPrecision precision, int64_t M, int64_t N,
                        int64_t K, GemmMatrix dy, GemmMatrix x, GemmMatrix w, GemmMatrix dx,
                        bool accumulate_dx, float* dw, float* dbias, void* workspace,
                        cudaStream_t stream) {
  double* partial = static_cast<double*>(workspace);
  const bool gemms = M > 0 && N > 0 && K > 0;
  if (gemms) {
    Bf16Scratch scratch(static_cast<char*>(workspace) + AlignUp(RowChunks(M) * N * sizeof(double)));
    const void* dya = scratch.Operand("linear_bwd", precision, M * N, dy, stream);
    const void* xa = scratch.Operand("linear_bwd", precision, M * K, x, stream);
    if (dx.data) {
      const void* wa = scratch.Operand("linear_bwd", precision, N * K, w, stream);
      // dx^T(K, M) = w^T(K, N) dy^T(N, M).
      Gemm("linear_bwd_dx", handle, precision, CUBLAS_OP_N, CUBLAS_OP_N, K, M, N, wa, K, dya, N,
           accumulate_dx ? 1.f : 0.f, dx, K);
    }
    // dw^T(K, N) += x^T(K, M) dy(M, N), dy(M, N) being the transpose of dy^T(N, M).
    Gemm("linear_bwd_dw", handle, precision, CUBLAS_OP_N, CUBLAS_OP_T, K, N, M, xa, K, dya, N, 1.f,
         GemmMatrix{dw, false}, K);
  } else if (dx.data && M > 0 && K > 0 && !accumulate_dx) {  // N == 0: dx is an empty sum
    MAMBA_CUDA_CHECK("linear_bwd", cudaMemsetAsync(dx.data, 0, M * K * ElemBytes(dx), stream));
  }
  if (dbias && M > 0 && N > 0) {
    const int64_t chunks = RowChunks(M);
    const dim3 grid(GridFor(N, kThreads), static_cast<unsigned int>(chunks));
    if (dy.bf16) {
      ColumnSumPartialKernel<<<grid, kThreads, 0, stream>>>(
          M, N, chunks, static_cast<const __nv_bfloat16*>(dy.data), partial);
    } else {
      ColumnSumPartialKernel<<<grid, kThreads, 0, stream>>>(
          M, N, chunks, static_cast<const float*>(dy.data), partial);
    }
    MAMBA_CUDA_CHECK_LAUNCH("linear_bwd_dbias");
    LaunchAddChunkSums(N, chunks, partial, dbias, stream);
    MAMBA_CUDA_CHECK_LAUNCH("linear_bwd_dbias");
  }
}

}  // namespace mamba::kernels
