#include "worker/kernels/linear_cpu.h"

#ifndef MAMBA_NO_CBLAS
#include <cblas.h>
#endif

#include <algorithm>
#include <climits>

#include "worker/check.h"

namespace mamba::kernels {
namespace {

// Below this much work an OpenMP fork/join costs more than it saves on a few cores (and
// stalls badly when the cores are shared).
constexpr int64_t kMinParallelWork = 1 << 14;

#ifdef MAMBA_NO_CBLAS
// Kernels-only builds on machines without BLAS: a plain row-major gemm, summed in double.
// C(m, n) = alpha * op(A) * op(B) + beta * C.
template <typename T>
void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
#pragma omp parallel for schedule(static) if (m * n * k >= kMinParallelWork)
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < k; ++p) {
        const double av = trans_a ? a[p * lda + i] : a[i * lda + p];
        const double bv = trans_b ? b[j * ldb + p] : b[p * ldb + j];
        s += av * bv;
      }
      c[i * ldc + j] = T(alpha * s + (beta == T(0) ? 0.0 : double(beta) * double(c[i * ldc + j])));
    }
  }
}
#else
// CBLAS takes int sizes (OpenBLAS without INTERFACE64).
void CheckFitsInt(int64_t m, int64_t n, int64_t k) {
  MAMBA_CHECK(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX)
      << "gemm size " << m << "x" << n << "x" << k << " exceeds the BLAS int range";
}

// Row-major gemm: C(m, n) = alpha * op(A) * op(B) + beta * C, dispatched on the element type.
void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  CheckFitsInt(m, n, k);
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
          const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
          int64_t ldc) {
  CheckFitsInt(m, n, k);
  cblas_dgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

#endif  // MAMBA_NO_CBLAS

// The gemms are split into fixed blocks of output rows run by OpenMP threads, each block one
// single-threaded BLAS call. One thread pool (OpenMP) instead of two (OpenMP + OpenBLAS's own)
// avoids the two pools spinning against each other on few cores, and fixed blocks keep results
// independent of the thread count.
constexpr int64_t kRowBlock = 256;

void UseSingleThreadedBlas() {
#ifndef MAMBA_NO_CBLAS
  static const bool done = [] {
    openblas_set_num_threads(1);
    return true;
  }();
  (void)done;
#endif
}

// C(m, n) (row-major, ldc) = op(A) * op(B) + beta * C, with A's rows (or, transposed, columns)
// split into blocks of C's rows.
template <typename T>
void BlockedGemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a,
                 int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  UseSingleThreadedBlas();
  const int64_t blocks = (m + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(dynamic) if (blocks > 1 && m * n * k >= (1 << 20))
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t r0 = blk * kRowBlock, rows = std::min(kRowBlock, m - r0);
    const T* a_blk = trans_a ? a + r0 : a + r0 * lda;
    Gemm(trans_a, trans_b, rows, n, k, T(1), a_blk, lda, b, ldb, beta, c + r0 * ldc, ldc);
  }
}

}  // namespace

template <typename T>
void LinearForwardCpu(int64_t M, int64_t N, int64_t K, const T* x, const T* w, const T* bias,
                      T* y) {
  if (M == 0 || N == 0) return;
  // Seed y with the bias so that one gemm with beta = 1 adds the product to it.
  if (bias) {
#pragma omp parallel for schedule(static) if (M * N >= kMinParallelWork)
    for (int64_t m = 0; m < M; ++m) std::copy(bias, bias + N, y + m * N);
  } else {
    std::fill(y, y + M * N, T(0));
  }
  if (K == 0) return;
  BlockedGemm(false, true, M, N, K, x, K, w, K, T(1), y, N);
}

template <typename T>
void LinearBackwardCpu(int64_t M, int64_t N, int64_t K, const T* dy, const T* x, const T* w, T* dx,
                       T* dw, T* dbias, bool accumulate_dx) {
  if (dx && M > 0 && K > 0) {
    if (N == 0) {
      if (!accumulate_dx) std::fill(dx, dx + M * K, T(0));
    } else {
      // dx(M, K) (+)= dy(M, N) w(N, K)
      BlockedGemm(false, false, M, K, N, dy, N, w, K, T(accumulate_dx ? 1 : 0), dx, K);
    }
  }
  if (M == 0) return;
  if (N > 0 && K > 0) BlockedGemm(true, false, N, K, M, dy, N, x, K, T(1), dw, K);  // dw += dy^T x
  if (dbias) {
#pragma omp parallel for schedule(static) if (M * N >= kMinParallelWork)
    for (int64_t n = 0; n < N; ++n) {
      double sum = 0;
      for (int64_t m = 0; m < M; ++m) sum += double(dy[m * N + n]);
      dbias[n] += T(sum);
    }
  }
}

template void LinearForwardCpu<float>(int64_t, int64_t, int64_t, const float*, const float*,
                                      const float*, float*);
template void LinearForwardCpu<double>(int64_t, int64_t, int64_t, const double*, const double*,
                                       const double*, double*);
template void LinearBackwardCpu<float>(int64_t, int64_t, int64_t, const float*, const float*,
                                       const float*, float*, float*, float*, bool);
template void LinearBackwardCpu<double>(int64_t, int64_t, int64_t, const double*, const double*,
                                        const double*, double*, double*, double*, bool);

}  // namespace mamba::kernels
