#include "worker/kernels/selective_scan_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace mamba::kernels {
namespace {

template <typename T>
T Sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// Effective step size and the derivative of it with respect to the raw delta.
template <typename T>
void StepSize(const ScanForwardArgs<T>& a, int64_t idx, int64_t d, T* dt, T* ddt_draw) {
  T raw = a.delta[idx] + (a.dt_bias ? a.dt_bias[d] : T(0));
  if (a.delta_softplus && raw <= T(20)) {
    *dt = std::log1p(std::exp(raw));
    *ddt_draw = Sigmoid(raw);
  } else {
    *dt = raw;
    *ddt_draw = T(1);
  }
}

// Number of channel blocks of the backward: fixed, so results do not depend on the thread count.
constexpr int64_t kBackwardBlocks = 16;

}  // namespace

template <typename T>
void SelectiveScanForwardCpu(const ScanShape& s, const ScanForwardArgs<T>& a) {
  const int64_t B = s.batch, L = s.len, D = s.dim, N = s.dstate, G = s.groups;
  const int64_t dims_per_group = D / G;
#pragma omp parallel
  {
    std::vector<T> h(N);
#pragma omp for schedule(static) collapse(2)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t d = 0; d < D; ++d) {
        const int64_t g = d / dims_per_group;
        const T* A = a.A + d * N;
        for (int64_t n = 0; n < N; ++n) h[n] = a.h0 ? a.h0[(b * D + d) * N + n] : T(0);
        for (int64_t t = 0; t < L; ++t) {
          const int64_t idx = (b * L + t) * D + d;
          const T* Bt = a.Bm + ((b * L + t) * G + g) * N;
          const T* Ct = a.Cm + ((b * L + t) * G + g) * N;
          T dt, unused;
          StepSize(a, idx, d, &dt, &unused);
          const T u = a.u[idx];
          T y = 0;
          for (int64_t n = 0; n < N; ++n) {
            h[n] = std::exp(dt * A[n]) * h[n] + dt * Bt[n] * u;
            y += Ct[n] * h[n];
          }
          if (a.D_skip) y += a.D_skip[d] * u;
          if (a.z) y *= a.z[idx] * Sigmoid(a.z[idx]);
          a.out[idx] = y;
        }
        if (a.h_last) {
          for (int64_t n = 0; n < N; ++n) a.h_last[(b * D + d) * N + n] = h[n];
        }
      }
    }
  }
}

template <typename T>
void SelectiveScanBackwardCpu(const ScanShape& s, const ScanBackwardArgs<T>& a) {
  const ScanForwardArgs<T>& f = a.fwd;
  const int64_t B = s.batch, L = s.len, D = s.dim, N = s.dstate, G = s.groups;
  const int64_t dims_per_group = D / G;
  const int64_t blocks = std::min(D, kBackwardBlocks);
  const int64_t bc_size = B * L * G * N;
  // Per-block partial sums of dBm and dCm (channels of one group add into the same entries).
  std::vector<T> dB_part(blocks * bc_size, T(0)), dC_part(blocks * bc_size, T(0));

#pragma omp parallel
  {
    std::vector<T> hs((L + 1) * N);  // h_{-1} .. h_{L-1} of one chain, recomputed
    std::vector<T> es(L * N);        // exp(dt_t * A), kept from the recompute for the reverse pass
    std::vector<T> dts(L), ddts(L);  // dt_t and d(dt_t)/d(raw delta_t)
    std::vector<T> dh(N);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t d_begin = D * blk / blocks, d_end = D * (blk + 1) / blocks;
      T* dB_blk = dB_part.data() + blk * bc_size;
      T* dC_blk = dC_part.data() + blk * bc_size;
      for (int64_t d = d_begin; d < d_end; ++d) {
        const int64_t g = d / dims_per_group;
        const T* A = f.A + d * N;
        std::vector<T> dA(N, T(0));
        T dD = 0, dbias = 0;
        for (int64_t b = 0; b < B; ++b) {
          // Recompute the states of this chain.
          for (int64_t n = 0; n < N; ++n) hs[n] = f.h0 ? f.h0[(b * D + d) * N + n] : T(0);
          for (int64_t t = 0; t < L; ++t) {
            const int64_t idx = (b * L + t) * D + d;
            const T* Bt = f.Bm + ((b * L + t) * G + g) * N;
            StepSize(f, idx, d, &dts[t], &ddts[t]);
            const T dt = dts[t], u = f.u[idx];
            for (int64_t n = 0; n < N; ++n) {
              const T e = std::exp(dt * A[n]);
              es[t * N + n] = e;
              hs[(t + 1) * N + n] = e * hs[t * N + n] + dt * Bt[n] * u;
            }
          }
          for (int64_t n = 0; n < N; ++n) dh[n] = a.dh_last ? a.dh_last[(b * D + d) * N + n] : T(0);
          for (int64_t t = L - 1; t >= 0; --t) {
            const int64_t idx = (b * L + t) * D + d;
            const int64_t bc = ((b * L + t) * G + g) * N;
            const T* Bt = f.Bm + bc;
            const T* Ct = f.Cm + bc;
            const T* h_prev = hs.data() + t * N;
            const T* h_cur = hs.data() + (t + 1) * N;
            const T dt = dts[t], ddt_draw = ddts[t];
            const T u = f.u[idx];
            T dy = a.dout[idx];
            if (f.z) {
              T y = 0;
              for (int64_t n = 0; n < N; ++n) y += Ct[n] * h_cur[n];
              if (f.D_skip) y += f.D_skip[d] * u;
              const T zv = f.z[idx], sg = Sigmoid(zv);
              if (a.dz) a.dz[idx] = dy * y * sg * (T(1) + zv * (T(1) - sg));
              dy *= zv * sg;
            }
            T du = 0, ddt = 0;
            if (f.D_skip) {
              dD += dy * u;
              du += dy * f.D_skip[d];
            }
            for (int64_t n = 0; n < N; ++n) {
              dh[n] += Ct[n] * dy;
              dC_blk[bc + n] += h_cur[n] * dy;
              const T e = es[t * N + n];
              ddt += dh[n] * (A[n] * e * h_prev[n] + Bt[n] * u);
              dA[n] += dh[n] * dt * e * h_prev[n];
              dB_blk[bc + n] += dh[n] * dt * u;
              du += dh[n] * dt * Bt[n];
              dh[n] *= e;
            }
            a.du[idx] = du;
            const T draw = ddt * ddt_draw;
            a.ddelta[idx] = draw;
            dbias += draw;
          }
          if (a.dh0) {
            for (int64_t n = 0; n < N; ++n) a.dh0[(b * D + d) * N + n] = dh[n];
          }
        }
        if (a.dA) std::copy(dA.begin(), dA.end(), a.dA + d * N);
        if (a.dD_skip) a.dD_skip[d] = dD;
        if (a.ddt_bias) a.ddt_bias[d] = dbias;
      }
    }
  }
  // Fixed-order reduction of the block partials.
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < bc_size; ++i) {
    T sb = 0, sc = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      sb += dB_part[blk * bc_size + i];
      sc += dC_part[blk * bc_size + i];
    }
    a.dBm[i] = sb;
    a.dCm[i] = sc;
  }
}

template <typename T>
void SelectiveScanStateMapCpu(const ScanShape& s, const ScanForwardArgs<T>& a, T* decay, T* state) {
  const int64_t B = s.batch, L = s.len, D = s.dim, N = s.dstate, G = s.groups;
  const int64_t dims_per_group = D / G;
#pragma omp parallel
  {
    std::vector<T> h(N);
#pragma omp for schedule(static) collapse(2)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t d = 0; d < D; ++d) {
        const int64_t g = d / dims_per_group;
        const T* A = a.A + d * N;
        std::fill(h.begin(), h.end(), T(0));
        T dt_sum = 0;
        for (int64_t t = 0; t < L; ++t) {
          const int64_t idx = (b * L + t) * D + d;
          const T* Bt = a.Bm + ((b * L + t) * G + g) * N;
          T dt, unused;
          StepSize(a, idx, d, &dt, &unused);
          dt_sum += dt;
          if (state == nullptr) continue;  // the decay alone
          const T u = a.u[idx];
          for (int64_t n = 0; n < N; ++n) h[n] = std::exp(dt * A[n]) * h[n] + dt * Bt[n] * u;
        }
        for (int64_t n = 0; n < N; ++n) {
          decay[(b * D + d) * N + n] = std::exp(dt_sum * A[n]);
          if (state != nullptr) state[(b * D + d) * N + n] = h[n];
        }
      }
    }
  }
}

template <typename T>
void SelectiveScanStateGradCpu(const ScanShape& s, const ScanForwardArgs<T>& a, const T* dout,
                               T* dstate) {
  const int64_t B = s.batch, L = s.len, D = s.dim, N = s.dstate, G = s.groups;
  const int64_t dims_per_group = D / G;
#pragma omp parallel
  {
    std::vector<T> g_next(N);  // d loss / d h_t, from the positions after t
#pragma omp for schedule(static) collapse(2)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t d = 0; d < D; ++d) {
        const int64_t g = d / dims_per_group;
        const T* A = a.A + d * N;
        std::fill(g_next.begin(), g_next.end(), T(0));
        for (int64_t t = L - 1; t >= 0; --t) {
          const int64_t idx = (b * L + t) * D + d;
          const T* Ct = a.Cm + ((b * L + t) * G + g) * N;
          T dt, unused;
          StepSize(a, idx, d, &dt, &unused);
          T dy = dout[idx];
          if (a.z) dy *= a.z[idx] * Sigmoid(a.z[idx]);
          // d loss / d h_{t-1} = exp(dt_t A) (C_t dy_t + d loss / d h_t from later positions).
          for (int64_t n = 0; n < N; ++n)
            g_next[n] = std::exp(dt * A[n]) * (g_next[n] + Ct[n] * dy);
        }
        for (int64_t n = 0; n < N; ++n) dstate[(b * D + d) * N + n] = g_next[n];
      }
    }
  }
}

template void SelectiveScanForwardCpu<float>(const ScanShape&, const ScanForwardArgs<float>&);
template void SelectiveScanForwardCpu<double>(const ScanShape&, const ScanForwardArgs<double>&);
template void SelectiveScanBackwardCpu<float>(const ScanShape&, const ScanBackwardArgs<float>&);
template void SelectiveScanBackwardCpu<double>(const ScanShape&, const ScanBackwardArgs<double>&);
template void SelectiveScanStateMapCpu<float>(const ScanShape&, const ScanForwardArgs<float>&,
                                              float*, float*);
template void SelectiveScanStateMapCpu<double>(const ScanShape&, const ScanForwardArgs<double>&,
                                               double*, double*);
template void SelectiveScanStateGradCpu<float>(const ScanShape&, const ScanForwardArgs<float>&,
                                               const float*, float*);
template void SelectiveScanStateGradCpu<double>(const ScanShape&, const ScanForwardArgs<double>&,
                                                const double*, double*);

}  // namespace mamba::kernels
