#include "worker/kernels/conv1d_cpu.h"

#include <algorithm>
#include <vector>

#include "worker/kernels/silu_cpu.h"

namespace mamba::kernels {
namespace {

// Below this much work an OpenMP fork/join costs more than it saves on a few cores (and
// stalls badly when the cores are shared).
constexpr int64_t kMinParallelWork = 1 << 14;

// Channels per parameter-gradient work item: fixed, so the summation order never depends on the
// thread count.
constexpr int64_t kChannelChunk = 32;

// Input at position p of batch b (p may be negative: then it comes from the prefix, or is zero).
template <typename T>
const T* InputRow(const T* x, const T* prefix, int64_t b, int64_t p, int64_t L, int64_t C,
                  int64_t K) {
  if (p >= 0) return x + (b * L + p) * C;
  if (prefix) return prefix + (b * (K - 1) + (K - 1) + p) * C;
  return nullptr;
}

// pre[b, t, :] into out (C entries).
template <typename T>
void PreActivation(int64_t b, int64_t t, int64_t L, int64_t C, int64_t K, const T* x,
                   const T* weight, const T* bias, const T* prefix, T* out) {
  for (int64_t c = 0; c < C; ++c) out[c] = bias ? bias[c] : T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T* in = InputRow(x, prefix, b, t - (K - 1) + k, L, C, K);
    if (!in) continue;
    for (int64_t c = 0; c < C; ++c) out[c] += weight[c * K + k] * in[c];
  }
}

}  // namespace

template <typename T>
void CausalConv1dForwardCpu(int64_t B, int64_t L, int64_t C, int64_t K, const T* x, const T* weight,
                            const T* bias, const T* prefix, bool silu, T* y) {
  const bool parallel = B * L * C * K >= kMinParallelWork;
#pragma omp parallel for schedule(static) collapse(2) if (parallel)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < L; ++t) {
      T* out = y + (b * L + t) * C;
      PreActivation(b, t, L, C, K, x, weight, bias, prefix, out);
      if (silu) {
        for (int64_t c = 0; c < C; ++c) out[c] *= StableSigmoid(out[c]);
      }
    }
  }
}

template <typename T>
void CausalConv1dBackwardCpu(int64_t B, int64_t L, int64_t C, int64_t K, const T* x,
                             const T* weight, const T* bias, const T* prefix, bool silu,
                             const T* dy, T* dx, T* dweight, T* dbias, T* dprefix) {
  const bool parallel = B * L * C * K >= kMinParallelWork;
  // Gradient w.r.t. pre.
  std::vector<T> dpre(dy, dy + B * L * C);
  if (silu) {
#pragma omp parallel if (parallel)
    {
      std::vector<T> pre(C);
#pragma omp for schedule(static) collapse(2)
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t t = 0; t < L; ++t) {
          PreActivation(b, t, L, C, K, x, weight, bias, prefix, pre.data());
          T* g = dpre.data() + (b * L + t) * C;
          for (int64_t c = 0; c < C; ++c) g[c] *= SiluGrad(pre[c]);
        }
      }
    }
  }

  // Input position p (in -(K-1) .. L-1) feeds outputs t = p + (K-1) - k for k in [0, K).
  auto input_grad = [&](int64_t b, int64_t p, T* out) {
    std::fill(out, out + C, T(0));
    for (int64_t k = 0; k < K; ++k) {
      const int64_t t = p + (K - 1) - k;
      if (t < 0 || t >= L) continue;
      const T* g = dpre.data() + (b * L + t) * C;
      for (int64_t c = 0; c < C; ++c) out[c] += weight[c * K + k] * g[c];
    }
  };
#pragma omp parallel for schedule(static) collapse(2) if (parallel)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t p = 0; p < L; ++p) input_grad(b, p, dx + (b * L + p) * C);
  }
  if (dprefix && K > 1) {
#pragma omp parallel for schedule(static) collapse(2) if (parallel)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < K - 1; ++j)
        input_grad(b, j - (K - 1), dprefix + (b * (K - 1) + j) * C);
    }
  }

  // Parameter gradients: each channel chunk owned by one thread, summed in (b, t) order in double.
  const int64_t chunks = (C + kChannelChunk - 1) / kChannelChunk;
#pragma omp parallel if (parallel)
  {
    std::vector<double> dw(kChannelChunk * K), db(kChannelChunk);
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t c0 = ch * kChannelChunk, c1 = std::min(C, c0 + kChannelChunk);
      std::fill(dw.begin(), dw.end(), 0.0);
      std::fill(db.begin(), db.end(), 0.0);
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t t = 0; t < L; ++t) {
          const T* g = dpre.data() + (b * L + t) * C;
          for (int64_t c = c0; c < c1; ++c) db[c - c0] += double(g[c]);
          for (int64_t k = 0; k < K; ++k) {
            const T* in = InputRow(x, prefix, b, t - (K - 1) + k, L, C, K);
            if (!in) continue;
            for (int64_t c = c0; c < c1; ++c) dw[(c - c0) * K + k] += double(g[c]) * double(in[c]);
          }
        }
      }
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t k = 0; k < K; ++k) dweight[c * K + k] += T(dw[(c - c0) * K + k]);
        if (dbias) dbias[c] += T(db[c - c0]);
      }
    }
  }
}

template void CausalConv1dForwardCpu<float>(int64_t, int64_t, int64_t, int64_t, const float*,
                                            const float*, const float*, const float*, bool, float*);
template void CausalConv1dForwardCpu<double>(int64_t, int64_t, int64_t, int64_t, const double*,
                                             const double*, const double*, const double*, bool,
                                             double*);
template void CausalConv1dBackwardCpu<float>(int64_t, int64_t, int64_t, int64_t, const float*,
                                             const float*, const float*, const float*, bool,
                                             const float*, float*, float*, float*, float*);
template void CausalConv1dBackwardCpu<double>(int64_t, int64_t, int64_t, int64_t, const double*,
                                              const double*, const double*, const double*, bool,
                                              const double*, double*, double*, double*, double*);

}  // namespace mamba::kernels
