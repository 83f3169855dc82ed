// Device-side pieces shared by the selective-scan kernels: parameters, typed loads and stores,
// the thread -> (batch, channel) map, and the warp reduce-scatter used for dBm/dCm.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "worker/kernels/selective_scan_cuda.h"

namespace mamba::kernels::cuda {

constexpr int kNT = 16;  // states a thread holds in registers (one slice of N)
constexpr float kLog2e = 1.4426950408889634f;

// Backward tiling: a segment of kBwdR tiles of kBwdK steps; checkpoints at tile starts and the
// states of one tile live in shared memory ((kBwdK + kBwdR) * kNT floats a thread).
constexpr int kBwdK = 8;
constexpr int kBwdR = 8;
constexpr int kBwdSeg = kBwdK * kBwdR;
constexpr int kBwdThreads = 64;
constexpr int kFwdThreads = 128;

// n / d for n < 2^31 by a multiply-high and a shift (Granlund-Montgomery): a runtime integer
// division compiles to a reciprocal on the exponential unit, whose queue the scans keep full,
// so each one in a block's set-up waited behind other warps' exponentials (the forward
// pre-pass spent ~5 % of its warp samples there, H100).
struct FastDiv {
  uint32_t d = 1, mul = 0, shr = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t div) : d(div) {
    if (d <= 1) return;
    uint32_t l = 0;
    while ((uint64_t{1} << l) < d) ++l;
    mul = static_cast<uint32_t>(((uint64_t{1} << (31 + l)) + d - 1) / d);
    shr = l - 1;
  }
  __host__ __device__ uint32_t Div(uint32_t n) const {
#ifdef __CUDA_ARCH__
    return d == 1 ? n : __umulhi(n, mul) >> shr;
#else
    return d == 1 ? n : static_cast<uint32_t>((uint64_t{n} * mul) >> 32) >> shr;
#endif
  }
};

struct Params : ScanProblem {
  const ScanScratch* scratch = nullptr;  // host side only: where the workspace comes from
  int64_t dims_per_group = 0, chan_warps = 0, chan_blocks = 0;
  // Tiled kernels: block -> (segment, channel block) -> (b, g, channel block in the group).
  FastDiv div_chan_blocks, div_group_blocks, div_chan_warps;
  int n_slices = 1;
  int64_t seg_len = 0, num_seg = 1;
  // Workspace (fp32). Per segment: [b][d][seg][n] or [b][d][seg].
  float* ws_s = nullptr;    // zero-start final state of each segment
  float* ws_r = nullptr;    // state gradient a segment sends back, from zero at its end
  float* ws_sum = nullptr;  // sum of the step sizes of each segment
  float* ws_hin = nullptr;  // state entering each segment
  float* ws_gin = nullptr;  // state gradient entering each segment at its end
  // bf16 tiled forward with segments: the pre-pass's step sizes in fp16, [b][t][d] (all but the
  // last segment's steps are written).
  unsigned short* ws_dt16 = nullptr;
  // Tiled backward: zero-start state and step-size sum at the start of each tile after a
  // segment's first: [b][d][seg][tile - 1][n] and [b][d][seg][tile - 1].
  float* ws_ck = nullptr;
  float* ws_cks = nullptr;
  // Accumulators over state slices when N > kNT: [b][t][d].
  float* ws_yacc = nullptr;
  float* ws_duacc = nullptr;
  float* ws_ddtacc = nullptr;
  // Partials summed in a fixed order by the reduce kernels.
  float* ws_dA = nullptr;     // [b][seg][d][n]
  float* ws_dD = nullptr;     // [b][seg][d]
  float* ws_dbias = nullptr;  // [b][seg][d]
  float* ws_dbc = nullptr;    // [chan_warp][b][t][g][2][n]: dBm then dCm summed over a warp
};

// Programmatic dependent launch (segment pre-pass -> compose -> forward main pass; see
// LaunchAfterPrimary): a kernel launched so may start while the one before still runs and waits
// (WaitPrimary) before reading what that one wrote. Both are no-ops in a kernel launched without
// it.
__device__ __forceinline__ void LaunchDependents() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
__device__ __forceinline__ void WaitPrimary() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

__device__ __forceinline__ float Ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <typename T>
__device__ __forceinline__ float Ld(const void* p, int64_t i) {
  if constexpr (std::is_same_v<T, float>) {
    return __ldg(static_cast<const float*>(p) + i);
  } else {
    // Through the read-only path, as for fp32: plain loads cannot be hoisted past stores.
    const unsigned short bits = __ldg(static_cast<const unsigned short*>(p) + i);
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  }
}

template <typename T>
__device__ __forceinline__ void St(const void* p, int64_t i, float v) {
  if constexpr (std::is_same_v<T, float>) {
    static_cast<float*>(const_cast<void*>(p))[i] = v;
  } else {
    static_cast<__nv_bfloat16*>(const_cast<void*>(p))[i] = __float2bfloat16_rn(v);
  }
}

// 16 entries of a Bm/Cm row starting at state n0. kVec: the row is n-contiguous, 16-byte
// aligned and N is a multiple of 16 (checked on the host), so it loads in 16-byte pieces.
template <typename T, bool kVec>
__device__ __forceinline__ void LoadRow(const Strided4& t, int64_t base, int n0, int N,
                                        float (&v)[kNT]) {
  if constexpr (kVec) {
    if constexpr (std::is_same_v<T, float>) {
      const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(t.p) + base + n0);
#pragma unroll
      for (int i = 0; i < kNT / 4; ++i) {
        const float4 f = __ldg(q + i);
        v[4 * i] = f.x;
        v[4 * i + 1] = f.y;
        v[4 * i + 2] = f.z;
        v[4 * i + 3] = f.w;
      }
    } else {
      const uint4* q =
          reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(t.p) + base + n0);
#pragma unroll
      for (int i = 0; i < kNT / 8; ++i) {
        const uint4 w = __ldg(q + i);
        const uint32_t x[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          v[8 * i + 2 * k] = __uint_as_float(x[k] << 16);
          v[8 * i + 2 * k + 1] = __uint_as_float(x[k] & 0xffff0000u);
        }
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      v[j] = n0 + j < N ? Ld<T>(t.p, base + static_cast<int64_t>(n0 + j) * t.sn) : 0.f;
    }
  }
}

// softplus(raw) (or raw) and its derivative with respect to raw.
__device__ __forceinline__ float StepSize(float raw, bool softplus, float* dsp) {
  if (softplus && raw <= 20.f) {
    const float e = expf(raw);
    *dsp = e / (1.f + e);
    return log1pf(e);
  }
  *dsp = 1.f;
  return raw;
}

struct Chan {
  int64_t b, g, d, cw;
  bool active;  // false for lanes past the group's last channel (they still join shuffles)
  int64_t seg;
};

// Block -> (segment, channel block); warp -> (b, g, channel warp); lane -> channel. Returns
// false for a whole warp past the last batch.
__device__ __forceinline__ bool Locate(const Params& p, Chan* c) {
  const int64_t cb = blockIdx.x % p.chan_blocks;
  c->seg = blockIdx.x / p.chan_blocks;
  const int64_t wid = (cb * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t per_b = p.groups * p.chan_warps;
  c->b = wid / per_b;
  if (c->b >= p.batch) return false;
  const int64_t rem = wid % per_b;
  c->g = rem / p.chan_warps;
  c->cw = rem % p.chan_warps;
  const int64_t dl = c->cw * 32 + lane;
  c->active = dl < p.dims_per_group;
  c->d = c->g * p.dims_per_group + (c->active ? dl : p.dims_per_group - 1);
  return true;
}

// Sum over the warp of v[i] for i = lane, in a fixed order: a butterfly that halves the vector
// each round (31 shuffles for 32 sums instead of 32 * 5).
__device__ __forceinline__ float ReduceScatter32(float (&v)[32]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int w = 16; w >= 1; w >>= 1) {
    const bool upper = lane & w;
#pragma unroll
    for (int i = 0; i < w; ++i) {
      const float send = upper ? v[i] : v[i + w];
      const float keep = upper ? v[i + w] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, w);
    }
  }
  return v[0];
}

// Per-thread row offsets of one (b, d) into the (B, L, D) inputs and of one (b, g) into Bm/Cm.
struct Offsets {
  int64_t u, delta, z, dout, Bm, Cm;
  __device__ Offsets(const Params& p, const Chan& c)
      : u(c.b * p.u.sb + c.d * p.u.sd),
        delta(c.b * p.delta.sb + c.d * p.delta.sd),
        z(c.b * p.z.sb + c.d * p.z.sd),
        dout(c.b * p.dout.sb + c.d * p.dout.sd),
        Bm(c.b * p.Bm.sb + c.g * p.Bm.sg),
        Cm(c.b * p.Cm.sb + c.g * p.Cm.sg) {}
};

// The inputs of one time step. Loops load step t +- 1 into a second StepIn while computing step
// t, so the loads' latency overlaps the exponentials instead of stalling every step.
struct StepIn {
  float draw, u, z, dout;
  float bv[kNT], cv[kNT];
};

// kC: load Cm; kZ: load z (when present); kDout: load dout.
template <typename T, bool kVec, bool kC, bool kZ, bool kDout>
__device__ __forceinline__ void LoadStep(const Params& p, const Offsets& o, int n0, int64_t t,
                                         StepIn& s) {
  s.draw = Ld<T>(p.delta.p, o.delta + t * p.delta.sl);
  s.u = Ld<T>(p.u.p, o.u + t * p.u.sl);
  LoadRow<T, kVec>(p.Bm, o.Bm + t * p.Bm.sl, n0, p.dstate, s.bv);
  if constexpr (kC) LoadRow<T, kVec>(p.Cm, o.Cm + t * p.Cm.sl, n0, p.dstate, s.cv);
  if constexpr (kZ) s.z = p.z.p ? Ld<T>(p.z.p, o.z + t * p.z.sl) : 0.f;
  if constexpr (kDout) s.dout = Ld<T>(p.dout.p, o.dout + t * p.dout.sl);
}

// Sum of p[k * stride] for k in [0, n), added in order (the bits of a plain loop), with the loads
// in batches of 8 in flight: the reductions of per-segment and per-block partials.
__device__ __forceinline__ float SumInOrder(const float* p, int64_t n, int64_t stride) {
  float s = 0.f;
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    float x[8];
#pragma unroll
    for (int m = 0; m < 8; ++m) x[m] = p[(k + m) * stride];
#pragma unroll
    for (int m = 0; m < 8; ++m) s += x[m];
  }
  for (; k < n; ++k) s += p[k * stride];
  return s;
}

// dA, dD_skip and ddt_bias, each the sum of its [part][count] partials over parts in order, in
// one launch: outputs [0, na) are dA, then dD_skip's, then ddt_bias's; this is output i. A thread
// an output, so that a warp's loads are contiguous.
__device__ __forceinline__ void SumGradPart(const Params& p, int64_t parts, int64_t na, int64_t i) {
  const int64_t D = p.dim;
  const float* part;
  float* out;
  int64_t count, j;
  if (i < na) {
    part = p.ws_dA, out = p.dA, count = na, j = i;
  } else if (i < na + D) {
    part = p.ws_dD, out = p.dD_skip, count = D, j = i - na;
  } else if (i < na + 2 * D) {
    part = p.ws_dbias, out = p.ddt_bias, count = D, j = i - na - D;
  } else {
    return;
  }
  if (out) out[j] = SumInOrder(part + j, parts, count);
}

}  // namespace mamba::kernels::cuda
