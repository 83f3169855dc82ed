#include "worker/kernels/conv1d.h"

#include <algorithm>

#include "worker/kernels/cuda_check.h"
#include "worker/kernels/silu_device.cuh"

namespace mamba::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kRowsPerChunk = 64;
constexpr int64_t kMaxRowChunks = 256;

int64_t RowChunks(int64_t rows) {
  return std::max<int64_t>(1, std::min(kMaxRowChunks, (rows + kRowsPerChunk - 1) / kRowsPerChunk));
}

size_t Align(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Input at position p (-(K-1) <= p < L) of batch b, channel c: from x, the prefix, or zero.
__device__ __forceinline__ float Input(const float* x, const float* prefix, int64_t b, int64_t p,
                                       int64_t c, int64_t L, int64_t C, int64_t K) {
  if (p >= 0) return x[(b * L + p) * C + c];
  if (prefix) return prefix[(b * (K - 1) + (K - 1) + p) * C + c];
  return 0.f;
}

__device__ __forceinline__ float PreActivation(const float* x, const float* weight,
                                               const float* bias, const float* prefix, int64_t b,
                                               int64_t t, int64_t c, int64_t L, int64_t C,
                                               int64_t K) {
  float acc = bias ? bias[c] : 0.f;
  for (int64_t k = 0; k < K; ++k) {
    acc += weight[c * K + k] * Input(x, prefix, b, t - (K - 1) + k, c, L, C, K);
  }
  return acc;
}

// One thread per (b, t, c), c fastest: coalesced along channels.
__global__ void ForwardKernel(int64_t B, int64_t L, int64_t C, int64_t K, const float* x,
                              const float* weight, const float* bias, const float* prefix,
                              bool silu, float* y) {
  const int64_t n = B * L * C;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % C, bt = i / C, t = bt % L, b = bt / L;
    const float pre = PreActivation(x, weight, bias, prefix, b, t, c, L, C, K);
    y[i] = silu ? pre * StableSigmoidF(pre) : pre;
  }
}

__global__ void DpreKernel(int64_t B, int64_t L, int64_t C, int64_t K, const float* x,
                           const float* weight, const float* bias, const float* prefix, bool silu,
                           const float* dy, float* dpre) {
  const int64_t n = B * L * C;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (silu) {
      const int64_t c = i % C, bt = i / C, t = bt % L, b = bt / L;
      dpre[i] = dy[i] * SiluGradF(PreActivation(x, weight, bias, prefix, b, t, c, L, C, K));
    } else {
      dpre[i] = dy[i];
    }
  }
}

// Input position p (-(K-1) <= p < L) feeds outputs t = p + (K-1) - k. One thread per entry of
// dx (p >= 0) or, with `to_prefix`, of dprefix (p = j - (K-1), j in [0, K-1)).
__global__ void InputGradKernel(int64_t B, int64_t L, int64_t C, int64_t K, const float* weight,
                                const float* dpre, bool to_prefix, float* out) {
  const int64_t P = to_prefix ? K - 1 : L;
  const int64_t n = B * P * C;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % C, bp = i / C, j = bp % P, b = bp / P;
    const int64_t p = to_prefix ? j - (K - 1) : j;
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t t = p + (K - 1) - k;
      if (t >= 0 && t < L) acc += weight[c * K + k] * dpre[(b * L + t) * C + c];
    }
    out[i] = acc;
  }
}

// Block (x, chunk): channels x*blockDim + tid over the rows (b, t) of the chunk, in row order.
// partial[(chunk * C + c) * (K + 1) + k]: k < K for dweight, k == K for dbias.
__global__ void ParamPartialKernel(int64_t B, int64_t L, int64_t C, int64_t K, int64_t chunks,
                                   const float* x, const float* prefix, const float* dpre,
                                   double* partial) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const int64_t chunk = blockIdx.y, rows = B * L;
  const int64_t r_begin = rows * chunk / chunks, r_end = rows * (chunk + 1) / chunks;
  double dw[kConv1dMaxK] = {}, db = 0.0;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t b = r / L, t = r % L;
    const double g = dpre[r * C + c];
    db += g;
#pragma unroll
    for (int64_t k = 0; k < kConv1dMaxK; ++k) {
      if (k < K) dw[k] += g * double(Input(x, prefix, b, t - (K - 1) + k, c, L, C, K));
    }
  }
  double* out = partial + (chunk * C + c) * (K + 1);
#pragma unroll
  for (int64_t k = 0; k < kConv1dMaxK; ++k) {
    if (k < K) out[k] = dw[k];
  }
  out[K] = db;
}

__global__ void ParamFinalKernel(int64_t C, int64_t K, int64_t chunks, const double* partial,
                                 float* dweight, float* dbias) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;  // over C * (K + 1)
  if (i >= C * (K + 1)) return;
  double s = 0.0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) s += partial[chunk * C * (K + 1) + i];
  const int64_t c = i / (K + 1), k = i % (K + 1);
  if (k < K) {
    dweight[c * K + k] += float(s);
  } else if (dbias) {
    dbias[c] += float(s);
  }
}

unsigned int CappedBlocks(int64_t n) { return std::min(GridFor(n, kThreads), 1048576u); }

}  // namespace

void CausalConv1dForwardCuda(int64_t B, int64_t L, int64_t C, int64_t K, const float* x,
                             const float* weight, const float* bias, const float* prefix,
                             bool silu, float* y, cudaStream_t stream) {
  MAMBA_CHECK(K >= 1 && K <= kConv1dMaxK) << "conv1d: kernel size " << K << " outside [1, "
                                          << kConv1dMaxK << "]";
  if (B * L * C == 0) return;
  ForwardKernel<<<CappedBlocks(B * L * C), kThreads, 0, stream>>>(B, L, C, K, x, weight, bias,
                                                                  prefix, silu, y);
  MAMBA_CUDA_CHECK_LAUNCH("conv1d_fwd");
}

size_t CausalConv1dBackwardWorkspaceBytes(int64_t B, int64_t L, int64_t C, int64_t K) {
  return Align(B * L * C * sizeof(float)) + RowChunks(B * L) * C * (K + 1) * sizeof(double);
}

void CausalConv1dBackwardCuda(int64_t B, int64_t L, int64_t C, int64_t K, const float* x,
                              const float* weight, const float* bias, const float* prefix,
                              bool silu, const float* dy, float* dx, float* dweight, float* dbias,
                              float* dprefix, void* workspace, cudaStream_t stream) {
  MAMBA_CHECK(K >= 1 && K <= kConv1dMaxK) << "conv1d: kernel size " << K << " outside [1, "
                                          << kConv1dMaxK << "]";
  if (C == 0) return;
  float* dpre = static_cast<float*>(workspace);
  double* partial = reinterpret_cast<double*>(static_cast<char*>(workspace) +
                                              Align(B * L * C * sizeof(float)));
  const int64_t n = B * L * C;
  if (n > 0) {
    DpreKernel<<<CappedBlocks(n), kThreads, 0, stream>>>(B, L, C, K, x, weight, bias, prefix,
                                                         silu, dy, dpre);
    MAMBA_CUDA_CHECK_LAUNCH("conv1d_bwd");
    InputGradKernel<<<CappedBlocks(n), kThreads, 0, stream>>>(B, L, C, K, weight, dpre, false,
                                                              dx);
    MAMBA_CUDA_CHECK_LAUNCH("conv1d_bwd");
  }
  if (dprefix && K > 1 && B > 0) {
    InputGradKernel<<<CappedBlocks(B * (K - 1) * C), kThreads, 0, stream>>>(B, L, C, K, weight,
                                                                            dpre, true, dprefix);
    MAMBA_CUDA_CHECK_LAUNCH("conv1d_bwd");
  }
  if (n == 0) return;  // nothing to add to the parameter gradients
  const int64_t chunks = RowChunks(B * L);
  const dim3 grid(GridFor(C, kThreads), static_cast<unsigned int>(chunks));
  ParamPartialKernel<<<grid, kThreads, 0, stream>>>(B, L, C, K, chunks, x, prefix, dpre, partial);
  MAMBA_CUDA_CHECK_LAUNCH("conv1d_bwd");
  ParamFinalKernel<<<GridFor(C * (K + 1), kThreads), kThreads, 0, stream>>>(C, K, chunks, partial,
                                                                            dweight, dbias);
  MAMBA_CUDA_CHECK_LAUNCH("conv1d_bwd");
}

}  // namespace mamba::kernels
