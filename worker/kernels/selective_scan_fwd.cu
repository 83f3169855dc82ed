// Forward kernels of the selective scan, and the segment pre-pass and composition that the
// backward shares. See selective_scan_cuda.h for the work split.
#include "worker/kernels/selective_scan_cuda_kernels.h"

namespace mamba::kernels::cuda {
namespace {

__device__ __forceinline__ void LoadDecay(const Params& p, const Chan& c, int n0,
                                          float (&a2)[kNT]) {
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    a2[j] = n0 + j < p.dstate ? p.A[c.d * p.dstate + n0 + j] * kLog2e : 0.f;
  }
}

}  // namespace

template <typename T, bool kVec, bool kBwd>
__global__ void __launch_bounds__(kFwdThreads, 3) ScanSegmentKernel(const Params p) {
  Chan c;
  if (!Locate(p, &c) || !c.active) return;
  const int64_t t0 = c.seg * p.seg_len, t1 = min(p.len, t0 + p.seg_len);
  const Offsets o(p, c);
  const int N = p.dstate;
  const float bias = p.dt_bias ? p.dt_bias[c.d] : 0.f;
  const int64_t row = (c.b * p.dim + c.d) * p.num_seg + c.seg;
  for (int ns = 0; ns < p.n_slices; ++ns) {
    const int n0 = ns * kNT;
    float a2[kNT], h[kNT], P[kNT], r[kNT];
    LoadDecay(p, c, n0, a2);
#pragma unroll
    for (int j = 0; j < kNT; ++j) h[j] = 0.f, P[j] = 1.f, r[j] = 0.f;
    float sum = 0.f;
    StepIn cur, nxt;
    LoadStep<T, kVec, kBwd, kBwd, kBwd>(p, o, n0, t0, cur);
    for (int64_t t = t0; t < t1; ++t) {
      if (t + 1 < t1) LoadStep<T, kVec, kBwd, kBwd, kBwd>(p, o, n0, t + 1, nxt);
      float dsp;
      const float dt = StepSize(cur.draw + bias, p.softplus, &dsp);
      const float dtu = dt * cur.u;
      const float* bv = cur.bv;
      sum += dt;
      if constexpr (kBwd) {
        const float* cv = cur.cv;
        float dy = cur.dout;
        if (p.z.p) dy *= cur.z / (1.f + expf(-cur.z));
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          const float e = Ex2(dt * a2[j]);
          h[j] = fmaf(e, h[j], dtu * bv[j]);
          P[j] *= e;
          r[j] = fmaf(P[j], cv[j] * dy, r[j]);
        }
      } else {
#pragma unroll
        for (int j = 0; j < kNT; ++j) h[j] = fmaf(Ex2(dt * a2[j]), h[j], dtu * bv[j]);
      }
      cur = nxt;
    }
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      if (n0 + j < N) {
        p.ws_s[row * N + n0 + j] = h[j];
        if constexpr (kBwd) p.ws_r[row * N + n0 + j] = r[j];
      }
    }
    if (ns == 0) p.ws_sum[row] = sum;
  }
}

// One thread per (b, d, n): folds the segments' affine maps in order (forward) and in reverse
// order (backward), giving each segment its entering state and state gradient.
__global__ void ScanComposeKernel(const Params p, bool bwd) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t N = p.dstate;
  if (idx >= p.batch * p.dim * N) return;
  const int64_t n = idx % N, bd = idx / N, d = bd % p.dim;
  const float a2 = p.A[d * N + n] * kLog2e;
  const int64_t S = p.num_seg, base = bd * S;
  // The workspace arrays do not overlap: with that known, the loads of later segments are issued
  // ahead of this one's store and the fold waits only on its own arithmetic (a long chain at 44
  // segments).
  const float* __restrict__ sum = p.ws_sum + base;
  const float* __restrict__ zs = p.ws_s + base * N + n;
  float* __restrict__ hin = p.ws_hin + base * N + n;
  float h = p.h0 ? p.h0[bd * N + n] : 0.f;
#pragma unroll 4
  for (int64_t s = 0; s < S; ++s) {
    hin[s * N] = h;
    if (s + 1 < S) h = fmaf(Ex2(a2 * __ldg(sum + s)), h, __ldg(zs + s * N));
  }
  if (!bwd) return;
  const float* __restrict__ zr = p.ws_r + base * N + n;
  float* __restrict__ gin = p.ws_gin + base * N + n;
  float g = p.dh_last ? p.dh_last[bd * N + n] : 0.f;
#pragma unroll 4
  for (int64_t s = S - 1; s >= 0; --s) {
    gin[s * N] = g;
    if (s > 0) g = fmaf(Ex2(a2 * __ldg(sum + s)), g, __ldg(zr + s * N));
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kFwdThreads, 3) ScanForwardKernel(const Params p) {
  Chan c;
  if (!Locate(p, &c) || !c.active) return;
  const int64_t t0 = c.seg * p.seg_len, t1 = min(p.len, t0 + p.seg_len);
  const Offsets o(p, c);
  const int64_t out_o = c.b * p.out.sb + c.d * p.out.sd;
  const int N = p.dstate;
  const int64_t D = p.dim;
  const float bias = p.dt_bias ? p.dt_bias[c.d] : 0.f;
  const float dsk = p.D_skip ? p.D_skip[c.d] : 0.f;
  const int64_t row = (c.b * D + c.d) * p.num_seg + c.seg;
  const int64_t acc = c.b * p.len * D + c.d;  // [b][t][d] accumulators, t added below
  for (int ns = 0; ns < p.n_slices; ++ns) {
    const int n0 = ns * kNT;
    const bool first = ns == 0, last = ns + 1 == p.n_slices;
    float a2[kNT], h[kNT];
    LoadDecay(p, c, n0, a2);
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const int n = n0 + j;
      h[j] = n >= N      ? 0.f
             : c.seg > 0 ? p.ws_hin[row * N + n]
             : p.h0      ? p.h0[(c.b * D + c.d) * N + n]
                         : 0.f;
    }
    StepIn cur, nxt;
    LoadStep<T, kVec, true, true, false>(p, o, n0, t0, cur);
    for (int64_t t = t0; t < t1; ++t) {
      if (t + 1 < t1) LoadStep<T, kVec, true, true, false>(p, o, n0, t + 1, nxt);
      float dsp;
      const float dt = StepSize(cur.draw + bias, p.softplus, &dsp);
      const float u = cur.u;
      const float dtu = dt * u;
      float y = 0.f;
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        h[j] = fmaf(Ex2(dt * a2[j]), h[j], dtu * cur.bv[j]);
        y = fmaf(cur.cv[j], h[j], y);
      }
      const float zz = cur.z;
      cur = nxt;
      if (!first) y += p.ws_yacc[acc + t * D];
      if (!last) {
        p.ws_yacc[acc + t * D] = y;
        continue;
      }
      y = fmaf(dsk, u, y);
      if (p.z.p) y *= zz / (1.f + expf(-zz));
      St<T>(p.out.p, out_o + t * p.out.sl, y);
    }
    if (c.seg + 1 == p.num_seg && p.h_last) {
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        if (n0 + j < N) p.h_last[(c.b * D + c.d) * N + n0 + j] = h[j];
      }
    }
  }
}

template <typename T, bool kVec>
void LaunchSegments(const Params& p, bool bwd, int64_t segs, cudaStream_t stream) {
  const int64_t blocks = p.chan_blocks * segs;
  if (bwd) {
    ScanSegmentKernel<T, kVec, true><<<blocks, kFwdThreads, 0, stream>>>(p);
  } else {
    ScanSegmentKernel<T, kVec, false><<<blocks, kFwdThreads, 0, stream>>>(p);
  }
}

void LaunchCompose(const Params& p, bool bwd, cudaStream_t stream) {
  ScanComposeKernel<<<CeilDiv(p.batch * p.dim * p.dstate, 256), 256, 0, stream>>>(p, bwd);
}

template <typename T, bool kVec>
void LaunchForwardMain(const Params& p, cudaStream_t stream) {
  ScanForwardKernel<T, kVec><<<p.chan_blocks * p.num_seg, kFwdThreads, 0, stream>>>(p);
}

#define MAMBA_FWD_INSTANTIATE(T, V)                                               \
  template void LaunchSegments<T, V>(const Params&, bool, int64_t, cudaStream_t); \
  template void LaunchForwardMain<T, V>(const Params&, cudaStream_t);
MAMBA_FWD_INSTANTIATE(float, false)
MAMBA_FWD_INSTANTIATE(float, true)
MAMBA_FWD_INSTANTIATE(__nv_bfloat16, false)
MAMBA_FWD_INSTANTIATE(__nv_bfloat16, true)
#undef MAMBA_FWD_INSTANTIATE

}  // namespace mamba::kernels::cuda
