#include <cuda_bf16.h>

#include <algorithm>
#include <climits>
#include <cstdint>

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

// Column-major C(m, n) = op(A) op(B) + beta C; A and B fp32, or bf16 in kBf16 mode; C fp32.
void Gemm(const char* op, cublasHandle_t handle, GemmPrecision precision, cublasOperation_t ta,
          cublasOperation_t tb, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
          const void* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  MAMBA_CHECK(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX &&
              ldc <= INT_MAX)
      << op << ": gemm size " << m << "x" << n << "x" << k << " exceeds the cuBLAS int range";
  const float alpha = 1.f;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F_PEDANTIC;
  cudaDataType_t in_type = CUDA_R_32F;
  if (precision == GemmPrecision::kTf32) compute = CUBLAS_COMPUTE_32F_FAST_TF32;
  if (precision == GemmPrecision::kBf16) {
    compute = CUBLAS_COMPUTE_32F;  // bf16 products, fp32 accumulation
    in_type = CUDA_R_16BF;
  }
  MAMBA_CUBLAS_CHECK(op, cublasGemmEx(handle, ta, tb, int(m), int(n), int(k), &alpha, a, in_type,
                                      int(lda), b, in_type, int(ldb), &beta, c, CUDA_R_32F,
                                      int(ldc), compute, CUBLAS_GEMM_DEFAULT));
}

// Workspace carving: every piece starts on a 256-byte boundary (cuBLAS's preferred alignment).
size_t AlignUp(size_t bytes) { return (bytes + 255) / 256 * 256; }
size_t Bf16Bytes(int64_t n) { return AlignUp(size_t(n) * sizeof(__nv_bfloat16)); }

__global__ void ToBf16Kernel(int64_t n, const float* src, __nv_bfloat16* dst) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    dst[i] = __float2bfloat16_rn(src[i]);
  }
}

// Four at a time: 16-byte loads, 8-byte stores (the conversions are bandwidth-bound).
__global__ void ToBf16x4Kernel(int64_t n4, const float4* src, uint2* dst) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float4 v = src[i];
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y);
    const __nv_bfloat162 hi = __floats2bfloat162_rn(v.z, v.w);
    uint2 out;
    out.x = *reinterpret_cast<const unsigned int*>(&lo);
    out.y = *reinterpret_cast<const unsigned int*>(&hi);
    dst[i] = out;
  }
}

unsigned int CappedBlocks(int64_t n) { return std::min(GridFor(n, kThreads), 1048576u); }

// Rounds n floats to bf16 (nearest even) into `dst` (the workspace); returns dst.
const __nv_bfloat16* ToBf16(const char* op, int64_t n, const float* src, __nv_bfloat16* dst,
                            cudaStream_t stream) {
  if (n % 4 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    ToBf16x4Kernel<<<CappedBlocks(n / 4), kThreads, 0, stream>>>(
        n / 4, reinterpret_cast<const float4*>(src), reinterpret_cast<uint2*>(dst));
  } else {
    ToBf16Kernel<<<CappedBlocks(n), kThreads, 0, stream>>>(n, src, dst);
  }
  MAMBA_CUDA_CHECK_LAUNCH(op);
  return dst;
}

// Bump allocation of bf16 copies in a workspace laid out by the *WorkspaceBytes functions.
class Bf16Scratch {
 public:
  explicit Bf16Scratch(void* base) : next_(static_cast<char*>(base)) {}
  __nv_bfloat16* Take(int64_t n) {
    auto* p = reinterpret_cast<__nv_bfloat16*>(next_);
    next_ += Bf16Bytes(n);
    return p;
  }

 private:
  char* next_;
};

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

}  // namespace

size_t LinearForwardWorkspaceBytes(GemmPrecision precision, int64_t M, int64_t N, int64_t K) {
  return precision == GemmPrecision::kBf16 ? Bf16Bytes(M * K) + Bf16Bytes(N * K) : 0;
}

void LinearForwardCuda(cublasHandle_t handle, GemmPrecision precision, int64_t M, int64_t N,
                       int64_t K, const float* x, const float* w, const float* bias, float* y,
                       void* workspace, cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  // Seed y with the bias (or zeros) so that one GEMM with beta = 1 adds the product to it.
  BroadcastRowsKernel<<<CappedBlocks(M * N), kThreads, 0, stream>>>(M, N, bias, y);
  MAMBA_CUDA_CHECK_LAUNCH("linear_fwd");
  if (K == 0) return;
  const void* xa = x;
  const void* wa = w;
  if (precision == GemmPrecision::kBf16) {
    Bf16Scratch scratch(workspace);
    xa = ToBf16("linear_fwd", M * K, x, scratch.Take(M * K), stream);
    wa = ToBf16("linear_fwd", N * K, w, scratch.Take(N * K), stream);
  }
  // Column-major: y^T(N, M) = w^T(K, N)^T x^T(K, M).
  Gemm("linear_fwd", handle, precision, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, wa, K, xa, K, 1.f, y, N);
}

size_t LinearBackwardWorkspaceBytes(GemmPrecision precision, int64_t M, int64_t N, int64_t K) {
  size_t bytes = AlignUp(RowChunks(M) * N * sizeof(double));
  if (precision == GemmPrecision::kBf16)
    bytes += Bf16Bytes(M * N) + Bf16Bytes(M * K) + Bf16Bytes(N * K);
  return bytes;
}

void LinearBackwardCuda(cublasHandle_t handle, GemmPrecision precision, int64_t M, int64_t N,
                        int64_t K, const float* dy, const float* x, const float* w, float* dx,
                        float* dw, float* dbias, void* workspace, cudaStream_t stream) {
  double* partial = static_cast<double*>(workspace);
  const void* dya = dy;
  const void* xa = x;
  const void* wa = w;
  const bool want_dx = dx && M > 0 && K > 0 && N > 0;
  const bool want_dw = M > 0 && N > 0 && K > 0;
  if (precision == GemmPrecision::kBf16 && want_dw) {
    Bf16Scratch scratch(static_cast<char*>(workspace) + AlignUp(RowChunks(M) * N * sizeof(double)));
    dya = ToBf16("linear_bwd", M * N, dy, scratch.Take(M * N), stream);
    xa = ToBf16("linear_bwd", M * K, x, scratch.Take(M * K), stream);
    if (want_dx) wa = ToBf16("linear_bwd", N * K, w, scratch.Take(N * K), stream);
  }
  if (dx && M > 0 && K > 0 && N == 0) {
    MAMBA_CUDA_CHECK("linear_bwd", cudaMemsetAsync(dx, 0, M * K * sizeof(float), stream));
  }
  if (want_dx) {
    // dx^T(K, M) = w^T(K, N) dy^T(N, M).
    Gemm("linear_bwd_dx", handle, precision, CUBLAS_OP_N, CUBLAS_OP_N, K, M, N, wa, K, dya, N, 0.f,
         dx, K);
  }
  if (M == 0 || N == 0) return;
  if (want_dw) {
    // dw^T(K, N) += x^T(K, M) dy(M, N), dy(M, N) being the transpose of dy^T(N, M).
    Gemm("linear_bwd_dw", handle, precision, CUBLAS_OP_N, CUBLAS_OP_T, K, N, M, xa, K, dya, N, 1.f,
         dw, K);
  }
  if (dbias) {
    const int64_t chunks = RowChunks(M);
    const dim3 grid(GridFor(N, kThreads), static_cast<unsigned int>(chunks));
    ColumnSumPartialKernel<<<grid, kThreads, 0, stream>>>(M, N, chunks, dy, partial);
    MAMBA_CUDA_CHECK_LAUNCH("linear_bwd_dbias");
    AddChunkSumsKernel<<<GridFor(N, kThreads), kThreads, 0, stream>>>(N, chunks, partial, dbias);
    MAMBA_CUDA_CHECK_LAUNCH("linear_bwd_dbias");
  }
}

}  // namespace mamba::kernels
