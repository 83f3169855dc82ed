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
  LaunchDependents();
  WaitPrimary();
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

// With many segments the fold above is a long chain of dependent loads (67 segments: 21 us of
// a 1.16 ms forward, H100; this: 9.5 us). For N == 16 a block then takes each (b, d): thread
// (run j, state n) composes the maps of a run of consecutive segments (x -> P x + Z), the runs
// of each state are scanned with shuffles, and each thread walks its run from the value entering
// it. Same maps, added in another (fixed) order.
// Up to this many segments the serial fold is kept: at 16 segments and 10240 channels (backward
// of (2,5120,8192)) the runs kernel made the backward 2 % slower.
constexpr int64_t kComposeSerialMax = 32;
// Runs a (b, d): at 8 (128-thread blocks, all in one wave) the forward compose of
// (1,1536,65536) took 9.5 us, at 16 10.3, at 32 15 (backward 20 / 23 / 30; the forward itself
// 1.147 / 1.150 / 1.154 ms).
constexpr int kComposeRuns = 8;

// One fold (forward: states entering each segment; reverse: state gradients entering each
// segment at its end) of the block's (b, d).
__device__ __forceinline__ void FoldRuns(const Params& p, bool reverse,
                                         float2 (&run_map)[16][kComposeRuns + 1]) {
  const int n = threadIdx.x & 15, j = threadIdx.x >> 4;
  const int64_t bd = blockIdx.x, d = bd % p.dim, N = 16;
  const float a2 = p.A[d * N + n] * kLog2e;
  const int64_t S = p.num_seg, base = bd * S;
  const float* __restrict__ sum = p.ws_sum + base;
  const float* __restrict__ zz = (reverse ? p.ws_r : p.ws_s) + base * N + n;
  float* __restrict__ out = (reverse ? p.ws_gin : p.ws_hin) + base * N + n;
  // Map r (r < S - 1) carries the value across segment seg(r): forward in order, reverse from
  // the last segment down to the second.
  const auto seg = [&](int64_t r) { return reverse ? S - 1 - r : r; };
  const int64_t maps = S - 1, per = (maps + kComposeRuns - 1) / kComposeRuns;
  const int64_t r0 = min(maps, j * per), r1 = min(maps, r0 + per);
  float P = 1.f, Z = 0.f;
#pragma unroll 4
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t s = seg(r);
    const float e = Ex2(a2 * __ldg(sum + s));
    P *= e;
    Z = fmaf(e, Z, __ldg(zz + s * N));
  }
  run_map[n][j] = make_float2(P, Z);
  __syncthreads();
  {  // kComposeRuns lanes scan the runs of one state: exclusive, in place
    const int w = threadIdx.x / kComposeRuns, k = threadIdx.x % kComposeRuns;
    float2 m = run_map[w][k];
#pragma unroll
    for (int off = 1; off < kComposeRuns; off *= 2) {
      const float Pl = __shfl_up_sync(0xffffffffu, m.x, off, kComposeRuns);
      const float Zl = __shfl_up_sync(0xffffffffu, m.y, off, kComposeRuns);
      if (k >= off) m = make_float2(m.x * Pl, fmaf(m.x, Zl, m.y));
    }
    const float Pe = __shfl_up_sync(0xffffffffu, m.x, 1, kComposeRuns);
    const float Ze = __shfl_up_sync(0xffffffffu, m.y, 1, kComposeRuns);
    run_map[w][k] = k == 0 ? make_float2(1.f, 0.f) : make_float2(Pe, Ze);
  }
  __syncthreads();
  const float* first = reverse ? p.dh_last : p.h0;
  const float2 in = run_map[n][j];
  float v = fmaf(in.x, first ? first[bd * N + n] : 0.f, in.y);
#pragma unroll 4
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t s = seg(r);
    out[s * N] = v;
    v = fmaf(Ex2(a2 * __ldg(sum + s)), v, __ldg(zz + s * N));
  }
  if (r0 < r1 && r1 == maps) out[seg(maps) * N] = v;  // the last segment's entering value
}

__global__ void __launch_bounds__(16 * kComposeRuns)
    ScanComposeRunsKernel(const Params p, bool bwd) {
  __shared__ float2 run_map[16][kComposeRuns + 1];  // [state][run], padded
  LaunchDependents();
  WaitPrimary();
  FoldRuns(p, false, run_map);
  if (!bwd) return;
  __syncthreads();
  FoldRuns(p, true, run_map);
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
  // After the segment pre-pass, which it waits for (WaitPrimary) once its blocks are resident.
  if (p.dstate == 16 && p.num_seg > kComposeSerialMax) {
    LaunchAfterPrimary(ScanComposeRunsKernel, p.batch * p.dim, 16 * kComposeRuns, 0, stream, p,
                       bwd);
  } else {
    LaunchAfterPrimary(ScanComposeKernel, CeilDiv(p.batch * p.dim * p.dstate, 256), 256, 0, stream,
                       p, bwd);
  }
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
