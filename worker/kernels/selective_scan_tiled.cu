// Tiled selective scan for N == 16 (the common case), forward and backward.
//
// Work split: a block owns 32 channels of one (batch, group) and one segment of the sequence;
// a thread owns one channel and 4 of its 16 states (4 lanes per channel), so B*D*4 threads run
// without splitting L when B*D is large. Tiles of kT steps of u, delta, z, dout, Bm and Cm are
// staged in shared memory with coalesced loads; per (t, channel) quantities (step size,
// dt*u, gated dout) are computed once there, not once per state. The lanes of a channel add
// their partial sums through shared memory (forward) or shuffles (backward), in a fixed order.
#include "worker/kernels/selective_scan_cuda_kernels.h"

namespace mamba::kernels::cuda {
namespace {

constexpr int kCh = 32;       // channels per block
constexpr int kTh = kCh * 4;  // threads per block
constexpr int kFT = 32;       // forward tile steps
constexpr int kBT = 16;       // backward tile steps

enum Mode { kFwdMain = 0, kFwdPre = 1, kBwdPre = 2 };

__device__ __forceinline__ int64_t CeilDivDev(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float Rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Approximate hardware exp2 and reciprocal (relative error ~2^-22) instead of the accurate
// library calls, which were about two thirds of the forward's instructions.
__device__ __forceinline__ float Sigmoid(float x) { return Rcp(1.f + Ex2(-x * kLog2e)); }

// softplus(x) = max(x, 0) + log1p(e) with e = exp(-|x|) in (0, 1], and log1p(e) = 2 atanh(s),
// s = e / (2 + e) <= 1/3, as the odd series to s^13 (truncation < 2e-8 relative). *dsp gets
// softplus'(x) = sigmoid(x).
__device__ __forceinline__ float Softplus(float x, float* dsp) {
  const float e = Ex2(-fabsf(x) * kLog2e);
  const float s = e * Rcp(2.f + e);
  const float w = s * s;
  float q = 1.f / 13.f;
  q = fmaf(q, w, 1.f / 11.f);
  q = fmaf(q, w, 1.f / 9.f);
  q = fmaf(q, w, 1.f / 7.f);
  q = fmaf(q, w, 1.f / 5.f);
  q = fmaf(q, w, 1.f / 3.f);
  q = fmaf(q, w, 1.f);
  const float r = Rcp(1.f + e);
  *dsp = x >= 0.f ? r : e * r;
  return fmaf(2.f * s, q, fmaxf(x, 0.f));
}

__device__ __forceinline__ float FastStepSize(float raw, bool softplus, float* dsp) {
  if (softplus) return Softplus(raw, dsp);
  *dsp = 1.f;
  return raw;
}

// Block -> (segment, b, g, first channel); false when the block is past the last batch.
struct TileBlock {
  int64_t seg, b, g, d0;  // d0: first channel (global index)
  int64_t nvalid;         // channels of this block inside the group
};

__device__ __forceinline__ TileBlock LocateBlock(const Params& p) {
  TileBlock k;
  const int64_t cb = blockIdx.x % p.chan_blocks;
  k.seg = blockIdx.x / p.chan_blocks;
  const int64_t per_g = p.chan_warps;  // here: channel blocks per group
  k.b = cb / (p.groups * per_g);
  const int64_t rem = cb % (p.groups * per_g);
  k.g = rem / per_g;
  const int64_t c0 = (rem % per_g) * kCh;
  k.d0 = k.g * p.dims_per_group + c0;
  k.nvalid = min(static_cast<int64_t>(kCh), p.dims_per_group - c0);
  return k;
}

// Raw tile inputs a thread stages: element k is (step (tid >> 5) + 4k, channel tid & 31) for
// activations, (step (tid >> 4) + 8k, state tid & 15) for Bm/Cm. Held as loaded (bf16 bits
// unconverted) so that the conversion, and with it the wait for the load, happens at first use.
template <typename T>
using Bits = std::conditional_t<std::is_same_v<T, float>, float, unsigned short>;

template <typename T>
__device__ __forceinline__ float ToF(Bits<T> x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return __uint_as_float(static_cast<uint32_t>(x) << 16);
  }
}

template <typename T, int kTT, int kNT = kTh>
struct Raw {
  static constexpr int kA = kTT * kCh / kNT, kB = kTT * 16 / kNT;
  Bits<T> u[kA], dl[kA], z[kA], dout[kA];
  Bits<T> bm[kB], cm[kB];
};

// This thread's element at step t of an activation or Bm/Cm array: one 64-bit multiply-add
// chain per tile, then constant-stride pointer steps.
template <typename T>
__device__ __forceinline__ const Bits<T>* ActAt(const Strided3& a, int64_t b, int64_t t,
                                                int64_t d) {
  return static_cast<const Bits<T>*>(a.p) + (b * a.sb + t * a.sl + d * a.sd);
}

// kNT threads stage a tile: activations kNT / 32 steps apart, Bm/Cm kNT / 16 steps apart.
template <typename T, int kTT, bool kU, bool kZ, bool kDout, bool kC, int kNT = kTh>
__device__ __forceinline__ void LoadRaw(const Params& p, const TileBlock& k, int64_t tb, int64_t t1,
                                        Raw<T, kTT, kNT>& r) {
  constexpr int kSa = kNT / 32, kSb = kNT / 16;
  const int tid = threadIdx.x;
  const int c = tid & 31;
  const bool cok = c < k.nvalid;
  const int64_t d = k.d0 + c;
  const Bits<T> zero = 0;
  const int64_t ta = tb + (tid >> 5);
  const Bits<T>* pdl = ActAt<T>(p.delta, k.b, ta, d);
  const Bits<T>* pu = ActAt<T>(p.u, k.b, ta, d);
  const Bits<T>* pz = ActAt<T>(p.z, k.b, ta, d);
  const Bits<T>* pdo = ActAt<T>(p.dout, k.b, ta, d);
#pragma unroll
  for (int i = 0; i < Raw<T, kTT, kNT>::kA; ++i) {
    const bool ok = cok && ta + kSa * i < t1;
    r.u[i] = r.z[i] = r.dout[i] = zero;
    r.dl[i] = ok ? __ldg(pdl + kSa * i * p.delta.sl) : zero;
    if constexpr (kU) r.u[i] = ok ? __ldg(pu + kSa * i * p.u.sl) : zero;
    if constexpr (kZ) r.z[i] = ok && p.z.p ? __ldg(pz + kSa * i * p.z.sl) : zero;
    if constexpr (kDout) r.dout[i] = ok ? __ldg(pdo + kSa * i * p.dout.sl) : zero;
  }
  const int n = tid & 15;
  const int64_t tn = tb + (tid >> 4);
  const Bits<T>* pb = static_cast<const Bits<T>*>(p.Bm.p) +
                      (k.b * p.Bm.sb + tn * p.Bm.sl + k.g * p.Bm.sg + n * p.Bm.sn);
  const Bits<T>* pc = static_cast<const Bits<T>*>(p.Cm.p) +
                      (k.b * p.Cm.sb + tn * p.Cm.sl + k.g * p.Cm.sg + n * p.Cm.sn);
#pragma unroll
  for (int i = 0; i < Raw<T, kTT, kNT>::kB; ++i) {
    const bool ok = tn + kSb * i < t1;
    r.cm[i] = zero;
    r.bm[i] = ok ? __ldg(pb + kSb * i * p.Bm.sl) : zero;
    if constexpr (kC) r.cm[i] = ok ? __ldg(pc + kSb * i * p.Cm.sl) : zero;
  }
}

// Per-(t, channel) tile values in shared memory. Steps past the end and channels past the group
// get dt = dtu = dy = 0: the state is then left unchanged and contributes nothing.
// kDy: gated dout (backward passes). kEpi: what the kernel's epilogue reads, u and z
// (forward) or u, softplus' and dz / (y + D*u) (backward).
template <int kTT, bool kDy, bool kEpi>
struct StepSmem {
  static constexpr int kF = kEpi && !kDy ? kTT : 1, kB = kEpi && kDy ? kTT : 1;
  float dt[kTT][kCh], dtu[kTT][kCh];
  float dy[kDy ? kTT : 1][kCh];
  float u[kEpi ? kTT : 1][kCh], z[kF][kCh], dsp[kB][kCh], dzf[kB][kCh];
  float4 bm[kTT][4], cm[kTT][4];
};

// S: a StepSmem<kTT, ...> with room for what kDy and kEpi ask to write.
template <typename T, int kTT, bool kDy, bool kC, bool kEpi, typename S, int kNT = kTh>
__device__ __forceinline__ void PrepTile(const Params& p, const TileBlock& k, int64_t tb,
                                         int64_t t1, float bias, const Raw<T, kTT, kNT>& r, S& s) {
  const int tid = threadIdx.x;
  const int c = tid & 31;
  const bool cok = c < k.nvalid;
#pragma unroll
  for (int i = 0; i < Raw<T, kTT, kNT>::kA; ++i) {
    const int tt = (tid >> 5) + kNT / 32 * i;
    const bool ok = cok && tb + tt < t1;
    float dsp = 0.f;
    const float dt = ok ? FastStepSize(ToF<T>(r.dl[i]) + bias, p.softplus, &dsp) : 0.f;
    s.dt[tt][c] = dt;
    s.dtu[tt][c] = dt * ToF<T>(r.u[i]);
    if constexpr (kEpi) s.u[tt][c] = ToF<T>(r.u[i]);
    if constexpr (kEpi && !kDy) s.z[tt][c] = ToF<T>(r.z[i]);
    if constexpr (kDy) {
      const float z = ToF<T>(r.z[i]), dout = ToF<T>(r.dout[i]);
      const float sg = p.z.p ? Sigmoid(z) : 0.f;
      s.dy[tt][c] = p.z.p ? dout * z * sg : dout;
      if constexpr (kEpi) {
        s.dsp[tt][c] = dsp;
        s.dzf[tt][c] = p.z.p ? dout * sg * (1.f + z * (1.f - sg)) : 0.f;
      }
    }
  }
  float* bm = reinterpret_cast<float*>(s.bm);
  float* cm = reinterpret_cast<float*>(s.cm);
#pragma unroll
  for (int i = 0; i < Raw<T, kTT, kNT>::kB; ++i) {
    const int idx = tid + kNT * i;  // (tt, n) = (idx >> 4, idx & 15)
    bm[idx] = ToF<T>(r.bm[i]);
    if constexpr (kC) cm[idx] = ToF<T>(r.cm[i]);
  }
}

// kS consecutive states n0.. of a float4[4] row of 16 (Bm or Cm at one step).
template <int kS>
__device__ __forceinline__ void StateSlice(const float4 (&row)[4], int sl, float (&v)[kS]) {
  if constexpr (kS == 8) {
    const float4 q = row[2 * sl], w = row[2 * sl + 1];
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
    v[4] = w.x, v[5] = w.y, v[6] = w.z, v[7] = w.w;
  } else if constexpr (kS == 4) {
    const float4 q = row[sl];
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    static_assert(kS == 2);
    const float2 q = reinterpret_cast<const float2*>(row)[sl];
    v[0] = q.x, v[1] = q.y;
  }
}

// Forward main pass, forward segment pre-pass and backward segment pre-pass (see Mode), with kL
// lanes per channel, each owning 16 / kL states. The forward uses 8 lanes: twice the warps of
// 4 lanes for the same channels, which row (8,1536,2048) needs (< 3 blocks per SM at 4 lanes).
template <int kMode, bool kF32, int kL>
constexpr int ScanMinBlocks() {
  return kL == 2 ? 8 : kL == 8 ? 3 : kMode == kBwdPre || !kF32 ? 4 : 6;
}

template <typename T, int kMode, int kL>
__global__ void __launch_bounds__(kCh* kL, ScanMinBlocks<kMode, std::is_same_v<T, float>, kL>())
    TiledScanKernel(const Params p) {
  constexpr int kTT = kFT, kS = 16 / kL, kNT = kCh * kL;
  constexpr bool kMain = kMode == kFwdMain, kBwd = kMode == kBwdPre;
  static_assert(!kBwd || kL == 4, "the backward checkpoints are written as float4 per lane");
  __shared__ StepSmem<kTT, kBwd, kMain> s;
  // Per-lane partial outputs [kTT][kCh][kL] (main pass), dynamic: 32 KB at 8 lanes.
  extern __shared__ float4 dyn[];
  auto yp = reinterpret_cast<float(*)[kCh][kL]>(dyn);
  const TileBlock k = LocateBlock(p);
  if (k.b >= p.batch) return;
  const int tid = threadIdx.x, ch = tid / kL, sl = tid % kL;
  const bool cok = ch < k.nvalid;
  const int64_t D = p.dim, S = p.num_seg;
  const int64_t d = k.d0 + (cok ? ch : 0);
  const int64_t t0 = k.seg * p.seg_len, t1 = min(p.len, t0 + p.seg_len);
  const int64_t row = (k.b * D + d) * S + k.seg;  // workspace row of (b, d, seg)
  // Epilogue channel (tid & 31) values.
  const int ce = tid & 31;
  const bool ceok = ce < k.nvalid;
  const int64_t de = k.d0 + (ceok ? ce : 0);
  const float bias = p.dt_bias ? p.dt_bias[de] : 0.f;
  const float dsk = p.D_skip ? p.D_skip[de] : 0.f;

  float a2[kS], h[kS], P[kS], r[kS];
#pragma unroll
  for (int j = 0; j < kS; ++j) {
    const int n = kS * sl + j;
    a2[j] = cok ? p.A[d * 16 + n] * kLog2e : 0.f;
    h[j] = 0.f, P[j] = 1.f, r[j] = 0.f;
    if constexpr (kMain) {
      if (cok) {
        h[j] = k.seg > 0 ? p.ws_hin[row * 16 + n] : p.h0 ? p.h0[(k.b * D + d) * 16 + n] : 0.f;
      }
    }
  }
  float sum = 0.f;
  Raw<T, kTT, kNT> nx;
  LoadRaw<T, kTT, true, kMain || kBwd, kBwd, kMain || kBwd, kNT>(p, k, t0, t1, nx);
  for (int64_t tb = t0; tb < t1; tb += kTT) {
    PrepTile<T, kTT, kBwd, kMain || kBwd, kMain, StepSmem<kTT, kBwd, kMain>, kNT>(p, k, tb, t1,
                                                                                  bias, nx, s);
    __syncthreads();
    // The next tile's loads fly while this one is scanned.
    if (tb + kTT < t1) {
      LoadRaw<T, kTT, true, kMain || kBwd, kBwd, kMain || kBwd, kNT>(p, k, tb + kTT, t1, nx);
    }
    // Halves of kBT steps: the backward pre-pass leaves a checkpoint at each backward tile start.
    for (int hf = 0; hf < kTT / kBT; ++hf) {
#pragma unroll 8
      for (int t2 = 0; t2 < kBT; ++t2) {
        const int tt = hf * kBT + t2;
        const float dt = s.dt[tt][ch], dtu = s.dtu[tt][ch];
        float bv[kS];
        StateSlice<kS>(s.bm[tt], sl, bv);
        float e[kS];
#pragma unroll
        for (int j = 0; j < kS; ++j) {
          e[j] = Ex2(dt * a2[j]);
          h[j] = fmaf(e[j], h[j], dtu * bv[j]);
        }
        if constexpr (kMain || kBwd) {
          float cv[kS];
          StateSlice<kS>(s.cm[tt], sl, cv);
          if constexpr (kMain) {
            float y = cv[0] * h[0];
#pragma unroll
            for (int j = 1; j < kS; ++j) y = fmaf(cv[j], h[j], y);
            yp[tt][ch][sl] = y;
          } else {
            const float dy = s.dy[tt][ch];
#pragma unroll
            for (int j = 0; j < kS; ++j) {
              P[j] *= e[j];
              r[j] = fmaf(P[j], cv[j] * dy, r[j]);
            }
          }
        }
        if constexpr (!kMain) sum += dt;
      }
      if constexpr (kBwd) {
        // Zero-start state and step sum at the start of the segment's next backward tile.
        const int64_t next = tb + (hf + 1) * kBT;
        if (cok && next < t1) {
          const int64_t ci = row * (p.seg_len / kBT - 1) + (next - t0) / kBT - 1;
          reinterpret_cast<float4*>(p.ws_ck)[ci * 4 + sl] = make_float4(h[0], h[1], h[2], h[3]);
          if (sl == 0) p.ws_cks[ci] = sum;
        }
      }
    }
    __syncthreads();
    if constexpr (kMain) {
      const int64_t obase = k.b * p.out.sb + (tb + (tid >> 5)) * p.out.sl + de * p.out.sd;
#pragma unroll
      for (int i = 0; i < Raw<T, kTT, kNT>::kA; ++i) {
        const int tt = (tid >> 5) + kNT / 32 * i;
        if (!ceok || tb + tt >= t1) continue;
        // The lanes' partials in a fixed order (pairs, then pairs of pairs).
        float y;
        if constexpr (kL == 2) {
          const float2 q = *reinterpret_cast<const float2*>(yp[tt][ce]);
          y = q.x + q.y;
        } else {
          const float4* q4 = reinterpret_cast<const float4*>(yp[tt][ce]);
          const float4 q = q4[0];
          y = (q.x + q.y) + (q.z + q.w);
          if constexpr (kL == 8) {
            const float4 w = q4[1];
            y += (w.x + w.y) + (w.z + w.w);
          }
        }
        y = fmaf(dsk, s.u[tt][ce], y);
        if (p.z.p) {
          const float z = s.z[tt][ce];
          y *= z * Sigmoid(z);
        }
        St<T>(p.out.p, obase + kNT / 32 * i * p.out.sl, y);
      }
    }
  }
  if (!cok) return;
  if constexpr (kMain) {
    if (k.seg + 1 == S && p.h_last) {
#pragma unroll
      for (int j = 0; j < kS; ++j) p.h_last[(k.b * D + d) * 16 + kS * sl + j] = h[j];
    }
  } else {
#pragma unroll
    for (int j = 0; j < kS; ++j) {
      p.ws_s[row * 16 + kS * sl + j] = h[j];
      if constexpr (kBwd) p.ws_r[row * 16 + kS * sl + j] = r[j];
    }
    if (sl == 0) p.ws_sum[row] = sum;
  }
}

// Backward main pass. A segment is p.seg_len / kBT tiles. From the last tile back, each tile's
// states are recomputed into shared memory from its entering state (the pre-pass's checkpoint
// plus the decayed segment entering state) and walked backwards with the state gradient g.
struct BwdSmem {
  StepSmem<kBT, true, true> s;
  // State before each step, per thread. Once a warp has read its row tt, the row's first 64
  // floats of the warp's part hold its sums of step tt (RedAt, DbcAt), for the epilogue.
  float4 hist[kBT][kTh];
  float chan[2][4][kCh];  // dD, dbias partials per row of threads
};

// y, sum g*e*h*A, sum g*B of step tt and channel c, summed over the channel's lanes.
__device__ __forceinline__ float4& RedAt(BwdSmem& sm, int tt, int c) {
  return sm.hist[tt][(c >> 3) * 32 + (c & 7)];
}
// dBm (m < 16) and dCm (16 + m) of step tt summed over the 8 channels of warp w.
__device__ __forceinline__ float& DbcAt(BwdSmem& sm, int w, int tt, int m) {
  return reinterpret_cast<float*>(&sm.hist[tt][w * 32 + 8])[m];
}

template <typename T>
__global__ void __launch_bounds__(kTh, 4) TiledBackwardKernel(const Params p, int64_t cpg) {
  extern __shared__ float4 dyn[];
  BwdSmem& sm = *reinterpret_cast<BwdSmem*>(dyn);
  const TileBlock k = LocateBlock(p);
  if (k.b >= p.batch) return;
  const int tid = threadIdx.x, ch = tid >> 2, sl = tid & 3, lane = tid & 31, warp = tid >> 5;
  const bool cok = ch < k.nvalid;
  const int64_t D = p.dim, S = p.num_seg, L = p.len, N = 16;
  const int64_t d = k.d0 + (cok ? ch : 0);
  const int64_t t0 = k.seg * p.seg_len, t1 = min(L, t0 + p.seg_len);
  const int64_t row = (k.b * D + d) * S + k.seg;
  const int ce = tid & 31;
  const bool ceok = ce < k.nvalid;
  const int64_t de = k.d0 + (ceok ? ce : 0);
  const float bias = p.dt_bias ? p.dt_bias[de] : 0.f;
  const float dsk = p.D_skip ? p.D_skip[de] : 0.f;

  float A[4], a2[4], h[4], g[4], dA[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int n = 4 * sl + j;
    A[j] = cok ? p.A[d * N + n] : 0.f;
    a2[j] = A[j] * kLog2e;
    h[j] = g[j] = dA[j] = 0.f;
    if (cok) {
      h[j] = k.seg > 0 ? p.ws_hin[row * N + n] : p.h0 ? p.h0[(k.b * D + d) * N + n] : 0.f;
      g[j] = k.seg + 1 < S ? p.ws_gin[row * N + n]
             : p.dh_last   ? p.dh_last[(k.b * D + d) * N + n]
                           : 0.f;
    }
  }
  const int ntiles = static_cast<int>(CeilDivDev(t1 - t0, kBT));
  const int64_t ck_row = row * (p.seg_len / kBT - 1);
  Raw<T, kBT> rr;  // next tile of the backward walk
  LoadRaw<T, kBT, true, true, true, true>(p, k, t0 + (ntiles - 1) * kBT, t1, rr);
  float dD_acc = 0.f, dbias_acc = 0.f;
  const bool one_block = cpg == 1;
  for (int r = ntiles - 1; r >= 0; --r) {
    const int64_t tb = t0 + r * kBT;
    // The state entering tile r: the pre-pass's zero-start state there plus the decayed state
    // entering the segment (no forward sweep).
    float hh[4] = {h[0], h[1], h[2], h[3]};
    if (r > 0 && cok) {
      const int64_t ci = ck_row + r - 1;
      const float4 c = reinterpret_cast<const float4*>(p.ws_ck)[ci * 4 + sl];
      const float sdt = p.ws_cks[ci];
      const float cv[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) hh[j] = fmaf(Ex2(a2[j] * sdt), h[j], cv[j]);
    }
    __syncthreads();
    PrepTile<T, kBT, true, true, true>(p, k, tb, t1, bias, rr, sm.s);
    __syncthreads();
    if (r > 0) LoadRaw<T, kBT, true, true, true, true>(p, k, tb - kBT, t1, rr);
#pragma unroll 4
    for (int tt = 0; tt < kBT; ++tt) {
      const float dt = sm.s.dt[tt][ch], dtu = sm.s.dtu[tt][ch];
      const float4 b4 = sm.s.bm[tt][sl];
      const float bv[4] = {b4.x, b4.y, b4.z, b4.w};
      sm.hist[tt][tid] = make_float4(hh[0], hh[1], hh[2], hh[3]);
#pragma unroll
      for (int j = 0; j < 4; ++j) hh[j] = fmaf(Ex2(dt * a2[j]), hh[j], dtu * bv[j]);
    }
#pragma unroll 2
    for (int tt = kBT - 1; tt >= 0; --tt) {
      const float dt = sm.s.dt[tt][ch], dtu = sm.s.dtu[tt][ch], dy = sm.s.dy[tt][ch];
      const float4 b4 = sm.s.bm[tt][sl], c4 = sm.s.cm[tt][sl], h4 = sm.hist[tt][tid];
      const float bv[4] = {b4.x, b4.y, b4.z, b4.w}, cv[4] = {c4.x, c4.y, c4.z, c4.w};
      const float hp[4] = {h4.x, h4.y, h4.z, h4.w};
      float hn[4];  // the state after step tt: the one before step tt + 1
#pragma unroll
      for (int j = 0; j < 4; ++j) hn[j] = hh[j], hh[j] = hp[j];
      float v[8];  // dBm (j) and dCm (4 + j) of this channel
      float y = 0.f, ga = 0.f, gb = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float e = Ex2(dt * a2[j]);
        y = fmaf(cv[j], hn[j], y);
        g[j] = fmaf(cv[j], dy, g[j]);
        v[4 + j] = hn[j] * dy;
        v[j] = g[j] * dtu;
        const float geh = g[j] * e * hp[j];
        ga = fmaf(geh, A[j], ga);
        dA[j] = fmaf(geh, dt, dA[j]);
        gb = fmaf(g[j], bv[j], gb);
        g[j] *= e;
      }
      __syncwarp();  // the warp's reads of hist[tt], which its sums overwrite, are done
      // Sum over the 4 lanes of the channel: lane sl keeps quantity sl of (y, ga, gb, 0).
      {
        float q[4] = {y, ga, gb, 0.f};
#pragma unroll
        for (int w = 2; w >= 1; w >>= 1) {
          const bool up = sl & w;
#pragma unroll
          for (int i = 0; i < w; ++i) {
            const float send = up ? q[i] : q[i + w];
            const float keep = up ? q[i + w] : q[i];
            q[i] = keep + __shfl_xor_sync(0xffffffffu, send, w);
          }
        }
        reinterpret_cast<float*>(&RedAt(sm, tt, ch))[sl] = q[0];
      }
      // Sum over the 8 channels of the warp: lane keeps value (lane >> 2) of its slice.
#pragma unroll
      for (int w = 4; w >= 1; w >>= 1) {
        const bool up = (lane >> 2) & w;
#pragma unroll
        for (int i = 0; i < w; ++i) {
          const float send = up ? v[i] : v[i + w];
          const float keep = up ? v[i + w] : v[i];
          v[i] = keep + __shfl_xor_sync(0xffffffffu, send, 4 * w);
        }
      }
      const int kv = lane >> 2;  // (kind, j) = (kv >> 2, kv & 3)
      DbcAt(sm, warp, tt, (kv >> 2) * 16 + 4 * sl + (kv & 3)) = v[0];
    }
    __syncthreads();
    // Epilogue per (t, channel).
    const int64_t te = tb + (tid >> 5);
    const int64_t obu = k.b * p.du.sb + te * p.du.sl + de * p.du.sd;
    const int64_t obd = k.b * p.ddelta.sb + te * p.ddelta.sl + de * p.ddelta.sd;
    const int64_t obz = k.b * p.dz.sb + te * p.dz.sl + de * p.dz.sd;
#pragma unroll
    for (int i = 0; i < Raw<T, kBT>::kA; ++i) {
      const int tt = (tid >> 5) + 4 * i;
      if (!ceok || tb + tt >= t1) continue;
      const float4 rd = RedAt(sm, tt, ce);
      const float y = rd.x, ga = rd.y, gb = rd.z;
      const float dt = sm.s.dt[tt][ce], dy = sm.s.dy[tt][ce];
      const float u = sm.s.u[tt][ce];
      const float dsp = sm.s.dsp[tt][ce];
      const float du = fmaf(dsk, dy, gb * dt);
      const float ddelta = fmaf(gb, u, ga) * dsp;
      St<T>(p.du.p, obu + 4 * i * p.du.sl, du);
      St<T>(p.ddelta.p, obd + 4 * i * p.ddelta.sl, ddelta);
      if (p.z.p && p.dz.p) St<T>(p.dz.p, obz + 4 * i * p.dz.sl, sm.s.dzf[tt][ce] * fmaf(dsk, u, y));
      dD_acc = fmaf(dy, u, dD_acc);
      dbias_acc += ddelta;
    }
    // dBm/dCm of this tile: sum over the block's 4 warps, then a partial per channel block.
#pragma unroll
    for (int i = 0; i < kBT * 32 / kTh; ++i) {
      const int idx = tid + kTh * i, tt = idx >> 5, m = idx & 31;
      const int64_t t = tb + tt;
      if (t >= t1) continue;
      const float v =
          (DbcAt(sm, 0, tt, m) + DbcAt(sm, 1, tt, m)) + (DbcAt(sm, 2, tt, m) + DbcAt(sm, 3, tt, m));
      const int kind = m >> 4, n = m & 15;
      if (one_block) {
        const Strided4& o = kind == 0 ? p.dBm : p.dCm;
        St<T>(o.p, k.b * o.sb + t * o.sl + k.g * o.sg + n * o.sn, v);
      } else {
        const int64_t cbg = (k.d0 - k.g * p.dims_per_group) / kCh;
        // [cbg][b][t][g][kind][n]
        p.ws_dbc[(((cbg * p.batch + k.b) * L + t) * p.groups + k.g) * 32 + m] = v;
      }
    }
  }
  sm.chan[0][tid >> 5][ce] = dD_acc;
  sm.chan[1][tid >> 5][ce] = dbias_acc;
  if (cok) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = 4 * sl + j;
      p.ws_dA[((k.b * S + k.seg) * D + d) * N + n] = dA[j];
      if (k.seg == 0 && p.dh0) p.dh0[(k.b * D + d) * N + n] = g[j];
    }
  }
  __syncthreads();
  if (tid < kCh && ceok) {
    const int64_t i = (k.b * S + k.seg) * D + de;
    p.ws_dD[i] = (sm.chan[0][0][ce] + sm.chan[0][1][ce]) + (sm.chan[0][2][ce] + sm.chan[0][3][ce]);
    p.ws_dbias[i] =
        (sm.chan[1][0][ce] + sm.chan[1][1][ce]) + (sm.chan[1][2][ce] + sm.chan[1][3][ce]);
  }
}

// dBm, dCm: sum of the channel blocks' partials in order. Layout [cbg][b][t][g][2][16].
template <typename T>
__global__ void TiledReduceBCKernel(const Params p, int64_t cpg) {
  const int64_t count = p.batch * p.len * p.groups * 32;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= count) return;
  float s = 0.f;
  for (int64_t c = 0; c < cpg; ++c) s += p.ws_dbc[c * count + i];
  const int64_t n = i & 15, kind = (i >> 4) & 1, g = (i >> 5) % p.groups;
  const int64_t t = (i / (32 * p.groups)) % p.len, b = i / (32 * p.groups * p.len);
  const Strided4& o = kind == 0 ? p.dBm : p.dCm;
  St<T>(o.p, b * o.sb + t * o.sl + g * o.sg + n * o.sn, s);
}

}  // namespace

int TiledForwardTile() { return kFT; }
int TiledBackwardTile() { return kBT; }
int64_t TiledBlocks(const Params& p) { return p.batch * p.groups * CeilDiv(p.dims_per_group, kCh); }

template <typename T>
void LaunchTiledPre(const Params& p, bool bwd, int64_t segs, int lanes, cudaStream_t stream) {
  const int64_t blocks = p.chan_blocks * segs;
  if (bwd) {
    TiledScanKernel<T, kBwdPre, 4><<<blocks, kTh, 0, stream>>>(p);
  } else if (lanes == 2) {
    TiledScanKernel<T, kFwdPre, 2><<<blocks, kTh / 2, 0, stream>>>(p);
  } else if (lanes == 4) {
    TiledScanKernel<T, kFwdPre, 4><<<blocks, kTh, 0, stream>>>(p);
  } else {
    TiledScanKernel<T, kFwdPre, 8><<<blocks, 2 * kTh, 0, stream>>>(p);
  }
}

template <typename T>
void LaunchTiledForward(const Params& p, int lanes, cudaStream_t stream) {
  const int64_t blocks = p.chan_blocks * p.num_seg;
  const size_t yp = kFT * kCh * lanes * sizeof(float);
  // Static StepSmem plus the partials pass 48 KB at 8 lanes.
  static const bool attr = [] {
    cudaFuncSetAttribute(TiledScanKernel<T, kFwdMain, 2>,
                         cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    cudaFuncSetAttribute(TiledScanKernel<T, kFwdMain, 4>,
                         cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    cudaFuncSetAttribute(TiledScanKernel<T, kFwdMain, 8>,
                         cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    return true;
  }();
  (void)attr;
  if (lanes == 2) {
    TiledScanKernel<T, kFwdMain, 2><<<blocks, kTh / 2, yp, stream>>>(p);
  } else if (lanes == 4) {
    TiledScanKernel<T, kFwdMain, 4><<<blocks, kTh, yp, stream>>>(p);
  } else {
    TiledScanKernel<T, kFwdMain, 8><<<blocks, 2 * kTh, yp, stream>>>(p);
  }
}

template <typename T>
cudaError_t LaunchTiledBackward(const Params& p, cudaStream_t stream) {
  const size_t smem = sizeof(BwdSmem);
  static const cudaError_t attr = cudaFuncSetAttribute(
      TiledBackwardKernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
  if (attr != cudaSuccess) return attr;
  const int64_t cpg = p.chan_warps;
  TiledBackwardKernel<T><<<p.chan_blocks * p.num_seg, kTh, smem, stream>>>(p, cpg);
  if (cpg > 1) {
    const int64_t count = p.batch * p.len * p.groups * 32;
    TiledReduceBCKernel<T><<<CeilDiv(count, 256), 256, 0, stream>>>(p, cpg);
  }
  return cudaSuccess;
}

#define MAMBA_TILED_INSTANTIATE(T)                                                  \
  template void LaunchTiledPre<T>(const Params&, bool, int64_t, int, cudaStream_t); \
  template void LaunchTiledForward<T>(const Params&, int, cudaStream_t);            \
  template cudaError_t LaunchTiledBackward<T>(const Params&, cudaStream_t);
MAMBA_TILED_INSTANTIATE(float)
MAMBA_TILED_INSTANTIATE(__nv_bfloat16)
#undef MAMBA_TILED_INSTANTIATE

}  // namespace mamba::kernels::cuda
