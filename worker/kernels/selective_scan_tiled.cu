// Tiled selective scan for N == 16 (the common case), forward and backward.
//
// Work split: a block owns 32 channels of one (batch, group) and one segment of the sequence;
// a thread owns one channel and 4 of its 16 states (4 lanes per channel), so B*D*4 threads run
// without splitting L when B*D is large. Tiles of kT steps of u, delta, z, dout, Bm and Cm are
// staged in shared memory with coalesced loads; per (t, channel) quantities (step size,
// dt*u, gated dout) are computed once there, not once per state. The lanes of a channel add
// their partial sums through shared memory (forward) or shuffles (backward), in a fixed order.
#include <cuda_fp16.h>

#include <atomic>

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

__device__ __forceinline__ float Lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// bf16 inputs: log1p(e) as ln 2 * log2(1 + e), 6 instructions instead of 16. Absolute error
// ~2e-7 (lg2.approx and the rounding of 1 + e), so relative error up to ~2e-4 at step sizes
// near 1e-3: 50x below what rounding the input to bf16 already moves them there
// (|x| * 2^-9 relative).
__device__ __forceinline__ float SoftplusLg2(float x, float* dsp) {
  const float e = Ex2(-fabsf(x) * kLog2e);
  const float r = Rcp(1.f + e);
  *dsp = x >= 0.f ? r : e * r;
  return fmaf(Lg2(1.f + e), 0.6931471805599453f, fmaxf(x, 0.f));
}

// The step size from raw = delta + dt_bias (softplus or not) and its derivative; computed
// without branches (the softplus is evaluated and discarded when not asked for).
template <typename T>
__device__ __forceinline__ float FastStepSize(float raw, bool softplus, float* dsp) {
  float d;
  const float sp = std::is_same_v<T, float> ? Softplus(raw, &d) : SoftplusLg2(raw, &d);
  *dsp = softplus ? d : 1.f;
  return softplus ? sp : raw;
}

// Block -> (segment, b, g, first channel); false when the block is past the last batch.
struct TileBlock {
  int64_t seg, b, g, d0;  // d0: first channel (global index)
  int64_t nvalid;         // channels of this block inside the group
};

// kFastDiv: by FastDiv (see there). The bf16 backward main pass (at its 128-register cap) keeps
// the plain divisions: with FastDiv its vector variant spilled and ran 2 % slower (H100); the
// fp32 one stopped spilling and ran 0.5-1 % faster.
template <bool kFastDiv = true>
__device__ __forceinline__ TileBlock LocateBlock(const Params& p) {
  TileBlock k;
  if constexpr (!kFastDiv) {
    const int64_t cb = blockIdx.x % p.chan_blocks;
    k.seg = blockIdx.x / p.chan_blocks;
    const int64_t per_g = p.chan_warps;
    k.b = cb / (p.groups * per_g);
    const int64_t rem = cb % (p.groups * per_g);
    k.g = rem / per_g;
    const int64_t c0 = (rem % per_g) * kCh;
    k.d0 = k.g * p.dims_per_group + c0;
    k.nvalid = min(static_cast<int64_t>(kCh), p.dims_per_group - c0);
    return k;
  }
  const uint32_t seg = p.div_chan_blocks.Div(blockIdx.x);
  const uint32_t cb = blockIdx.x - seg * p.div_chan_blocks.d;
  const uint32_t b = p.div_group_blocks.Div(cb), rem = cb - b * p.div_group_blocks.d;
  const uint32_t g = p.div_chan_warps.Div(rem);  // chan_warps: here channel blocks per group
  k.seg = seg, k.b = b, k.g = g;
  const int64_t c0 = static_cast<int64_t>(rem - g * p.div_chan_warps.d) * kCh;
  k.d0 = k.g * p.dims_per_group + c0;
  k.nvalid = min(static_cast<int64_t>(kCh), p.dims_per_group - c0);
  return k;
}

// Raw tile inputs a thread stages, as 32-bit words held as loaded (bf16 bits unconverted) so
// that the conversion, and with it the wait for the load, happens at first use. Two layouts:
// - scalar (any strides): element i is (step (tid >> 5) + kNT/32 * i, channel tid & 31) for
//   activations, (step (tid >> 4) + kNT/16 * i, state tid & 15) for Bm/Cm; one word each.
// - vector (channel- and state-contiguous, aligned; checked on the host): a thread loads kVE
//   consecutive channels of one step per activation vector and kB consecutive states of one
//   step of Bm and Cm, packed (two bf16 a word). One 8- or 16-byte load replaces up to 8 scalar
//   loads and their 64-bit address arithmetic, which was a fifth of the forward's instructions.
template <typename T>
using Bits = std::conditional_t<std::is_same_v<T, float>, float, unsigned short>;

template <typename T, int kTT, int kNT, bool kVec>
struct TileMap {
  static constexpr int kA = kTT * kCh / kNT;  // activation elements a thread stages per array
  static constexpr int kB = kTT * 16 / kNT;   // Bm (and Cm) elements a thread stages
  static constexpr int kMaxVE = 16 / int(sizeof(Bits<T>));
  static constexpr int kVE = !kVec ? 1 : kA < kMaxVE ? kA : kMaxVE;  // elements per vector
  static constexpr int kCG = kCh / kVE;    // threads sharing one step of the tile
  static constexpr int kRows = kNT / kCG;  // steps between a thread's vectors
  static constexpr int kWA = kVec ? kA * int(sizeof(Bits<T>)) / 4 : kA;  // words per array
  static constexpr int kWB = kVec ? kB * int(sizeof(Bits<T>)) / 4 : kB;
  static_assert(!kVec || (kA % kVE == 0 && kWB >= 1), "tile does not split into vectors");
  // Step and channel of this thread's activation element i.
  __device__ static int Step(int tid, int i) { return tid / kCG + kRows * (i / kVE); }
  __device__ static int Chan(int tid, int i) { return (tid % kCG) * kVE + i % kVE; }
  // Index (step * 16 + state) of this thread's Bm/Cm element i.
  __device__ static int BcIndex(int tid, int i) { return kVec ? tid * kB + i : tid + kNT * i; }
};

template <typename T, int kTT, int kNT, bool kVec>
struct Raw {
  using M = TileMap<T, kTT, kNT, kVec>;
  uint32_t u[M::kWA], dl[M::kWA], z[M::kWA], dout[M::kWA];
  uint32_t bm[M::kWB], cm[M::kWB];
};

// Element i of a staged array, as float.
template <typename T, bool kVec>
__device__ __forceinline__ float Elem(const uint32_t* w, int i) {
  if constexpr (std::is_same_v<T, float>) {
    return __uint_as_float(w[i]);
  } else if constexpr (!kVec) {
    return __uint_as_float(w[i] << 16);
  } else {
    return __uint_as_float(i & 1 ? w[i >> 1] & 0xffff0000u : w[i >> 1] << 16);
  }
}

template <typename T>
__device__ __forceinline__ uint32_t LdBits(const Bits<T>* p) {
  if constexpr (std::is_same_v<T, float>) {
    return __float_as_uint(__ldg(p));
  } else {
    return __ldg(p);
  }
}

// kBytes (4, 8 or 16) from p into w[0, kBytes / 4), or zeros.
template <int kBytes>
__device__ __forceinline__ void LdVec(const void* p, bool ok, uint32_t* w) {
  if constexpr (kBytes == 16) {
    const uint4 q = ok ? __ldg(static_cast<const uint4*>(p)) : make_uint4(0, 0, 0, 0);
    w[0] = q.x, w[1] = q.y, w[2] = q.z, w[3] = q.w;
  } else if constexpr (kBytes == 8) {
    const uint2 q = ok ? __ldg(static_cast<const uint2*>(p)) : make_uint2(0, 0);
    w[0] = q.x, w[1] = q.y;
  } else {
    static_assert(kBytes == 4);
    w[0] = ok ? __ldg(static_cast<const uint32_t*>(p)) : 0u;
  }
}

// This thread's element at step t of an activation or Bm/Cm array: one 64-bit multiply-add
// chain per tile, then constant-stride pointer steps.
template <typename T>
__device__ __forceinline__ const Bits<T>* ActAt(const Strided3& a, int64_t b, int64_t t,
                                                int64_t d) {
  return static_cast<const Bits<T>*>(a.p) + (b * a.sb + t * a.sl + d * a.sd);
}

// The bf16 forward with L split computes each step size once: the pre-pass rounds it to fp16,
// scans with the rounded value and stores it (p.ws_dt16, [b][t][d]); the main pass loads those
// instead of the raw delta (the same bytes) and skips dt_bias and the softplus, two of its 20
// exponential-unit operations a (step, channel). fp16 keeps 11 significant bits, 8x finer than
// the bf16 delta they come from. A step size too large for fp16 (>= 65520) is stored as
// infinity, and both passes then use the fp32 value (the main pass recomputes it). Conversions
// are packed pairs (F2FP, HADD2): with scalar conversions (F2F, as far as we can tell on the
// exponential unit's pipe, behind the scan's exponentials) the pre-pass was 28 us slower on
// (1,1536,65536), packed 14 (session 7). The price: the fp32 final state of a split bf16
// forward moves by ~1e-4 relative (bf16 outputs round at 2^-9). Vector layout only: one
// 16-byte store of 8 step sizes where the pre-pass staged them.
template <typename T, bool kVec>
constexpr bool kHandsStepSizes = kVec && !std::is_same_v<T, float>;

__device__ __forceinline__ int64_t Dt16At(const Params& p, int64_t b, int64_t t, int64_t d) {
  return (b * p.len + t) * p.dim + d;
}

// kNT threads stage the tile of steps [tb, min(tb + kTT, t1)).
// from_pre (forward main pass): the step sizes come from p.ws_dt16 (see kHandsStepSizes).
template <typename T, int kTT, bool kU, bool kZ, bool kDout, bool kC, int kNT, bool kVec>
__device__ __forceinline__ void LoadRaw(const Params& p, const TileBlock& k, int64_t tb, int64_t t1,
                                        Raw<T, kTT, kNT, kVec>& r, bool from_pre = false) {
  using M = TileMap<T, kTT, kNT, kVec>;
  const int tid = threadIdx.x;
  if constexpr (kVec) {
    constexpr int kVB = M::kVE * int(sizeof(Bits<T>)), kWV = kVB / 4;
    const int c0 = M::Chan(tid, 0);
    const bool cok = c0 < k.nvalid;  // whole vectors: dims_per_group % kVE == 0
    const int64_t d = k.d0 + c0;
#pragma unroll
    for (int v = 0; v < M::kA / M::kVE; ++v) {
      const int64_t t = tb + M::Step(tid, v * M::kVE);
      const bool ok = cok && t < t1;
      // The vector layout's activations share one (batch, step) layout: one offset for all.
      const int64_t off = k.b * p.u.sb + t * p.u.sl + d;
      const auto at = [off](const Strided3& a) { return static_cast<const Bits<T>*>(a.p) + off; };
      const void* dl = at(p.delta);
      if constexpr (kHandsStepSizes<T, kVec>) {
        if (from_pre) dl = p.ws_dt16 + Dt16At(p, k.b, t, d);
      }
      LdVec<kVB>(dl, ok, r.dl + v * kWV);
      if constexpr (kU) LdVec<kVB>(at(p.u), ok, r.u + v * kWV);
      if constexpr (kZ) LdVec<kVB>(at(p.z), ok && p.z.p, r.z + v * kWV);
      if constexpr (kDout) LdVec<kVB>(at(p.dout), ok, r.dout + v * kWV);
    }
    constexpr int kBB = M::kB * int(sizeof(Bits<T>));
    const int idx = M::BcIndex(tid, 0);
    const int64_t t = tb + (idx >> 4);
    const int n = idx & 15;
    const bool ok = t < t1;
    const Bits<T>* pb =
        static_cast<const Bits<T>*>(p.Bm.p) + (k.b * p.Bm.sb + t * p.Bm.sl + k.g * p.Bm.sg + n);
    LdVec<kBB>(pb, ok, r.bm);
    if constexpr (kC) {
      const Bits<T>* pc =
          static_cast<const Bits<T>*>(p.Cm.p) + (k.b * p.Cm.sb + t * p.Cm.sl + k.g * p.Cm.sg + n);
      LdVec<kBB>(pc, ok, r.cm);
    }
  } else {
    constexpr int kSa = kNT / 32, kSb = kNT / 16;
    const int c = tid & 31;
    const bool cok = c < k.nvalid;
    const int64_t d = k.d0 + c;
    const int64_t ta = tb + (tid >> 5);
    const Bits<T>* pdl = ActAt<T>(p.delta, k.b, ta, d);
    const Bits<T>* pu = ActAt<T>(p.u, k.b, ta, d);
    const Bits<T>* pz = ActAt<T>(p.z, k.b, ta, d);
    const Bits<T>* pdo = ActAt<T>(p.dout, k.b, ta, d);
#pragma unroll
    for (int i = 0; i < M::kA; ++i) {
      const bool ok = cok && ta + kSa * i < t1;
      r.u[i] = r.z[i] = r.dout[i] = 0u;
      r.dl[i] = ok ? LdBits<T>(pdl + kSa * i * p.delta.sl) : 0u;
      if constexpr (kU) r.u[i] = ok ? LdBits<T>(pu + kSa * i * p.u.sl) : 0u;
      if constexpr (kZ) r.z[i] = ok && p.z.p ? LdBits<T>(pz + kSa * i * p.z.sl) : 0u;
      if constexpr (kDout) r.dout[i] = ok ? LdBits<T>(pdo + kSa * i * p.dout.sl) : 0u;
    }
    const int n = tid & 15;
    const int64_t tn = tb + (tid >> 4);
    const Bits<T>* pb = static_cast<const Bits<T>*>(p.Bm.p) +
                        (k.b * p.Bm.sb + tn * p.Bm.sl + k.g * p.Bm.sg + n * p.Bm.sn);
    const Bits<T>* pc = static_cast<const Bits<T>*>(p.Cm.p) +
                        (k.b * p.Cm.sb + tn * p.Cm.sl + k.g * p.Cm.sg + n * p.Cm.sn);
#pragma unroll
    for (int i = 0; i < M::kB; ++i) {
      const bool ok = tn + kSb * i < t1;
      r.cm[i] = 0u;
      r.bm[i] = ok ? LdBits<T>(pb + kSb * i * p.Bm.sl) : 0u;
      if constexpr (kC) r.cm[i] = ok ? LdBits<T>(pc + kSb * i * p.Cm.sl) : 0u;
    }
  }
}

// Per-(t, channel) tile values in shared memory. Steps past the end and channels past the group
// get dt = dtu = dy = 0: the state is then left unchanged and contributes nothing.
// kDy: gated dout (backward passes). kEpi: what the kernel's epilogue reads, u and z
// (forward, scalar layout; with kRegUZ, the forward main pass's vector layout, they stay in
// registers) or u, softplus' and dz / (y + D*u) (backward). bias: dt_bias of the block's
// channels (the vector layout's threads prepare several channels).
// Rows are padded to kCh + 1 entries: the vector layout's threads write 8 rows at once, which
// would otherwise fall into the same banks. The step size and dt*u sit side by side, so that a
// scan step reads them with one 8-byte load: the scans' shared-memory instructions share the
// MIO queue with the exponentials, and one fewer a step made every row 1-3.5 % faster (H100,
// session 4).
template <int kTT, bool kDy, bool kEpi, bool kRegUZ = false>
struct StepSmem {
  static constexpr int kU = kEpi && !kRegUZ ? kTT : 1, kF = kEpi && !kDy && !kRegUZ ? kTT : 1;
  static constexpr int kB = kEpi && kDy ? kTT : 1, kP = kCh + 1;
  float2 dt[kTT][kP];  // (step size, step size * u): one 8-byte load in the scans
  float dy[kDy ? kTT : 1][kP];
  float u[kU][kP], z[kF][kP], dsp[kB][kP], dzf[kB][kP];
  float4 bm[kTT][4], cm[kTT][4];
  float bias[kCh], dsk[kCh];  // dt_bias and D_skip of the block's channels
};

// Fills s.bias and s.dsk for the block's channels; the caller synchronizes before their first
// use.
template <typename S>
__device__ __forceinline__ void StageChannelParams(const Params& p, const TileBlock& k, S& s) {
  const int c = threadIdx.x;
  if (c < kCh) {
    s.bias[c] = p.dt_bias && c < k.nvalid ? p.dt_bias[k.d0 + c] : 0.f;
    s.dsk[c] = p.D_skip && c < k.nvalid ? p.D_skip[k.d0 + c] : 0.f;
  }
}

template <int kN>
__device__ __forceinline__ void StShared(float* p, const float (&v)[kN]) {
  if constexpr (kN == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    static_assert(kN == 2);
    *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
  }
}

// S: a StepSmem<kTT, ...> with room for what kDy and kEpi ask to write.
// kHand (bf16 forward, vector layout; see kHandsStepSizes): 1 = the pre-pass, which rounds the
// step sizes and stores them; 2 = the main pass, which takes them from r.dl when from_pre.
template <typename T, int kTT, bool kDy, bool kC, bool kEpi, typename S, int kNT, bool kVec,
          int kHand = 0>
__device__ __forceinline__ void PrepTile(const Params& p, const TileBlock& k, int64_t tb,
                                         int64_t t1, const Raw<T, kTT, kNT, kVec>& r, S& s,
                                         bool from_pre = false) {
  using M = TileMap<T, kTT, kNT, kVec>;
  const int tid = threadIdx.x;
  const int steps = static_cast<int>(t1 - tb < kTT ? t1 - tb : kTT), nvalid = int(k.nvalid);
  // Forward: all shared loads before the first shared store. nvcc keeps loads below stores it
  // cannot prove disjoint, which made each element's softplus chain (load, ex2, lg2, store)
  // wait for the previous one's; loaded first, the chains overlap: every forward row 2-4 %
  // faster (H100). The backward's prep got 1-2 % slower that way and keeps its order.
  float bias[M::kA] = {};
  if constexpr (!kDy) {
#pragma unroll
    for (int i = 0; i < M::kA; ++i) bias[i] = s.bias[M::Chan(tid, i)];
  }
  if constexpr (kHand > 0) {
    static_assert(kHandsStepSizes<T, kVec> && !kDy && M::kVE == 8, "bf16 forward, vector layout");
    float dt[M::kA];
    uint32_t half2s[M::kA / 2];
    if (kHand == 1 || !from_pre) {
#pragma unroll
      for (int i = 0; i < M::kA; ++i) {
        float dsp;
        dt[i] = FastStepSize<T>(Elem<T, kVec>(r.dl, i) + bias[i], p.softplus, &dsp);
      }
    }
#pragma unroll
    for (int i = 0; i < M::kA; i += 2) {
      if constexpr (kHand == 1) {
        const __half2 h = __floats2half2_rn(dt[i], dt[i + 1]);
        half2s[i / 2] = *reinterpret_cast<const uint32_t*>(&h);
        const float2 f = __half22float2(h);
        dt[i] = isinf(f.x) ? dt[i] : f.x;
        dt[i + 1] = isinf(f.y) ? dt[i + 1] : f.y;
      } else if (from_pre) {
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&r.dl[i / 2]));
        dt[i] = f.x, dt[i + 1] = f.y;
      }
    }
    if constexpr (kHand == 2) {
      if (from_pre) {
        bool big = false;
#pragma unroll
        for (int i = 0; i < M::kA; ++i) big |= isinf(dt[i]);
        if (big) {  // rare: recomputed in fp32 from the raw delta, as the pre-pass used it
#pragma unroll
          for (int i = 0; i < M::kA; ++i) {
            const int tt = M::Step(tid, i), c = M::Chan(tid, i);
            if (isinf(dt[i]) && c < nvalid && tt < steps) {
              float dsp;
              const float raw = Ld<T>(p.delta.p, k.b * p.u.sb + (tb + tt) * p.u.sl + k.d0 + c);
              dt[i] = FastStepSize<T>(raw + bias[i], p.softplus, &dsp);
            }
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < M::kA; ++i) {
      const int tt = M::Step(tid, i), c = M::Chan(tid, i);
      const float d = c < nvalid && tt < steps ? dt[i] : 0.f;
      s.dt[tt][c] = make_float2(d, d * Elem<T, kVec>(r.u, i));
    }
    if constexpr (kHand == 1) {
#pragma unroll
      for (int v = 0; v < M::kA / M::kVE; ++v) {
        const int tt = M::Step(tid, v * M::kVE), c0 = M::Chan(tid, v * M::kVE);
        if (c0 < nvalid && tt < steps) {
          const uint32_t* w = half2s + v * M::kVE / 2;
          void* q = p.ws_dt16 + Dt16At(p, k.b, tb + tt, k.d0 + c0);
          asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(q), "r"(w[0]), "r"(w[1]),
                       "r"(w[2]), "r"(w[3])
                       : "memory");
        }
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < M::kA; ++i) {
      const int tt = M::Step(tid, i), c = M::Chan(tid, i);
      const bool ok = c < nvalid && tt < steps;
      // Computed for every element and then selected: a conditional call became a branch around
      // each element's exponentials.
      float dsp;
      const float raw = Elem<T, kVec>(r.dl, i) + (kDy ? s.bias[c] : bias[i]);
      float dt = FastStepSize<T>(raw, p.softplus, &dsp);
      dt = ok ? dt : 0.f;
      dsp = ok ? dsp : 0.f;
      const float u = Elem<T, kVec>(r.u, i);
      s.dt[tt][c] = make_float2(dt, dt * u);
      if constexpr (S::kU > 1) s.u[tt][c] = u;
      if constexpr (S::kF > 1) s.z[tt][c] = Elem<T, kVec>(r.z, i);
      if constexpr (kDy) {
        const float z = Elem<T, kVec>(r.z, i), dout = Elem<T, kVec>(r.dout, i);
        const float sg = p.z.p ? Sigmoid(z) : 0.f;
        s.dy[tt][c] = p.z.p ? dout * z * sg : dout;
        if constexpr (kEpi) {
          s.dsp[tt][c] = dsp;
          s.dzf[tt][c] = p.z.p ? dout * sg * (1.f + z * (1.f - sg)) : 0.f;
        }
      }
    }
  }
  float* bm = reinterpret_cast<float*>(s.bm);
  float* cm = reinterpret_cast<float*>(s.cm);
  if constexpr (kVec) {
    // One 8- or 16-byte store per thread: consecutive threads, consecutive addresses.
    float b[M::kB], c[M::kB];
#pragma unroll
    for (int i = 0; i < M::kB; ++i) {
      b[i] = Elem<T, kVec>(r.bm, i);
      c[i] = Elem<T, kVec>(r.cm, i);
    }
    StShared<M::kB>(bm + M::BcIndex(tid, 0), b);
    if constexpr (kC) StShared<M::kB>(cm + M::BcIndex(tid, 0), c);
  } else {
#pragma unroll
    for (int i = 0; i < M::kB; ++i) {
      const int idx = M::BcIndex(tid, i);
      bm[idx] = Elem<T, kVec>(r.bm, i);
      if constexpr (kC) cm[idx] = Elem<T, kVec>(r.cm, i);
    }
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

// The kL lanes' partial outputs of one (step, channel), summed in a fixed order (pairs, then
// pairs of pairs).
template <int kL>
__device__ __forceinline__ float LanesSum(const float (&part)[kL]) {
  if constexpr (kL == 2) {
    const float2 q = *reinterpret_cast<const float2*>(part);
    return q.x + q.y;
  } else {
    const float4* q4 = reinterpret_cast<const float4*>(part);
    const float4 q = q4[0];
    float y = (q.x + q.y) + (q.z + q.w);
    if constexpr (kL == 8) {
      const float4 w = q4[1];
      y += (w.x + w.y) + (w.z + w.w);
    }
    return y;
  }
}

// Stores kVE consecutive channels of one step (channel-contiguous and aligned: the vector
// layout's condition), rounded to nearest even for bf16 as St does. In PTX: nvcc 13 split a
// plain uint4 store into four 4-byte stores here.
template <typename T, int kVE>
__device__ __forceinline__ void StVec(const Strided3& o, int64_t off, const float (&y)[kVE]) {
  void* q = static_cast<Bits<T>*>(const_cast<void*>(o.p)) + off;
  uint32_t w[4];
  if constexpr (std::is_same_v<T, float>) {
    static_assert(kVE == 4);
#pragma unroll
    for (int j = 0; j < 4; ++j) w[j] = __float_as_uint(y[j]);
  } else {
    static_assert(kVE == 8 || kVE == 4);
#pragma unroll
    for (int j = 0; j < kVE / 2; ++j) {
      const __nv_bfloat162 h2 = __floats2bfloat162_rn(y[2 * j], y[2 * j + 1]);
      w[j] = static_cast<uint32_t>(__bfloat16_as_ushort(h2.x)) |
             static_cast<uint32_t>(__bfloat16_as_ushort(h2.y)) << 16;
    }
  }
  if constexpr (kVE * sizeof(Bits<T>) == 16) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(q), "r"(w[0]), "r"(w[1]),
                 "r"(w[2]), "r"(w[3])
                 : "memory");
  } else {
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(q), "r"(w[0]), "r"(w[1]) : "memory");
  }
}

// Where the forward's per-lane partials of (step tt, channel c) live in the vector layout: rows
// of kYpRow = 36 slots, a free one after each 8 channels, so that the epilogue's 16-byte reads
// (a quarter warp: steps tt, tt + 1 x channels c, c + 8, c + 16, c + 24) hit 8 different bank
// groups while a thread's 8 channels sit at fixed offsets from one address, and the scan's
// writes (8 consecutive channels of one step) stay contiguous. (It was a rotation of each 8
// channels by step and group: the same banks, but 5 instructions an element to place.)
template <bool kVec>
constexpr int kYpRow = kVec ? kCh + kCh / 8 : kCh;
__device__ __forceinline__ int YpSlot(int c) { return c + (c >> 3); }

// Forward main pass, forward segment pre-pass and backward segment pre-pass (see Mode), with kL
// lanes per channel, each owning 16 / kL states, and kCP channels per thread (ch, ch + 32 / kCP).
// The forward uses 8 lanes: twice the warps of 4 lanes for the same channels, which row
// (8,1536,2048) needs (< 3 blocks per SM at 4 lanes).
// The backward pre-pass at 5 blocks an SM (<= 102 registers, no spills) made the bf16 backward
// of (16,2048,4096), (1,1536,65536) and (2,5120,8192) 0.5-0.8 % faster than at 4 (H100,
// interleaved A/B; (8,1536,2048) and fp32 unchanged); at 6 it spills. The bf16 forward
// pre-pass at 6 (78 registers, was 4): the (1,1536,65536) bf16 forward 1.315-1.317 vs
// 1.346-1.354 ms (interleaved A/B).
template <int kMode, bool kF32, int kL, int kCP>
constexpr int ScanMinBlocks() {
  if (kCP == 2) return 8;
  if (kMode == kBwdPre) return 5;
  return kL == 2 ? 8 : kL == 8 ? 3 : !kF32 && kMode == kFwdMain ? 4 : 6;
}

// kVec: the vector tile layout (see Raw), when the host found the tensors contiguous and aligned.
// kCP = 2 (the forward main pass where the GPU still fills, the bf16 backward pre-pass): a thread
// scans two channels with the same Bm/Cm values, so the step's shared loads of Bm and Cm (16
// bytes each a thread, 4 wavefronts a warp whatever the broadcast) serve twice the states; tiles
// are kFT / 2 steps so that a block's shared memory halves with its threads.
// kHandIn: the forward main pass after a pre-pass that hands it the step sizes (kHandsStepSizes).
template <typename T, int kMode, int kL, bool kVec, int kCP, bool kHandIn>
__global__ void __launch_bounds__(kCh* kL / kCP,
                                  ScanMinBlocks<kMode, std::is_same_v<T, float>, kL, kCP>())
    TiledScanKernel(const Params p) {
  constexpr int kTT = kFT / kCP, kS = 16 / kL, kNT = kCh * kL / kCP, kChT = kCh / kCP;
  constexpr bool kMain = kMode == kFwdMain, kBwd = kMode == kBwdPre;
  static_assert(!kBwd || kL == 4, "the backward checkpoints are written as float4 per lane");
  static_assert(!kVec || kL == 4, "the vector layout's partials are one float4 per channel");
  using Smem = StepSmem<kTT, kBwd, kMain, kMain && kVec>;
  __shared__ Smem s;
  // Per-lane partial outputs [kTT][kYpRow][kL] (main pass), dynamic: 32 KB at 8 lanes.
  extern __shared__ float4 dyn[];
  auto yp = reinterpret_cast<float(*)[kYpRow<kVec>][kL]>(dyn);
  const TileBlock k = LocateBlock(p);
  if (k.b >= p.batch) return;
  const int tid = threadIdx.x, ch = tid / kL, sl = tid % kL;
  const int64_t D = p.dim, S = p.num_seg;
  const int64_t t0 = k.seg * p.seg_len, t1 = min(p.len, t0 + p.seg_len);
  bool cok[kCP];
  int64_t d[kCP], row[kCP];  // row: workspace row of (b, d, seg)
#pragma unroll
  for (int q = 0; q < kCP; ++q) {
    cok[q] = ch + q * kChT < k.nvalid;
    d[q] = k.d0 + (cok[q] ? ch + q * kChT : 0);
    row[q] = (k.b * D + d[q]) * S + k.seg;
  }
  // Epilogue channel (tid & 31) values.
  const int ce = tid & 31;
  const bool ceok = ce < k.nvalid;
  const int64_t de = k.d0 + (ceok ? ce : 0);
  const float dsk = p.D_skip ? p.D_skip[de] : 0.f;
  if constexpr (kMode == kFwdPre) LaunchDependents();  // the compose may get ready
  StageChannelParams(p, k, s);
  // The main pass waits for the compose where it reads what the pre-pass and the compose wrote:
  // the entering states (segment 0 starts from h0) and, handed over, the step sizes.
  if (kMain && (k.seg > 0 || kHandIn)) WaitPrimary();
  __syncthreads();

  float a2[kCP][kS], h[kCP][kS], P[kCP][kS], r[kCP][kS];
#pragma unroll
  for (int q = 0; q < kCP; ++q) {
#pragma unroll
    for (int j = 0; j < kS; ++j) {
      const int n = kS * sl + j;
      a2[q][j] = cok[q] ? p.A[d[q] * 16 + n] * kLog2e : 0.f;
      h[q][j] = 0.f, P[q][j] = 1.f, r[q][j] = 0.f;
      if constexpr (kMain) {
        if (cok[q]) {
          h[q][j] = k.seg > 0 ? p.ws_hin[row[q] * 16 + n]
                    : p.h0    ? p.h0[(k.b * D + d[q]) * 16 + n]
                              : 0.f;
        }
      }
    }
  }
  float sum[kCP] = {};
  // Step sizes handed from the pre-pass to the main pass (see kHandsStepSizes): the pre-pass
  // covers every segment but the last.
  static_assert(!kHandIn || (kMain && kHandsStepSizes<T, kVec>));
  constexpr int kHand = kMode == kFwdPre && kHandsStepSizes<T, kVec> ? 1 : kHandIn ? 2 : 0;
  const bool from_pre = kHandIn && k.seg + 1 < S;
  Raw<T, kTT, kNT, kVec> nx;
  LoadRaw<T, kTT, true, kMain || kBwd, kBwd, kMain || kBwd, kNT, kVec>(p, k, t0, t1, nx, from_pre);
  for (int64_t tb = t0; tb < t1; tb += kTT) {
    PrepTile<T, kTT, kBwd, kMain || kBwd, kMain, Smem, kNT, kVec, kHand>(p, k, tb, t1, nx, s,
                                                                         from_pre);
    // The vector layout's epilogue thread is the one that staged the element: u and z stay in
    // registers (as loaded) instead of a round trip through shared memory.
    [[maybe_unused]] uint32_t u_raw[kMain && kVec ? TileMap<T, kTT, kNT, kVec>::kWA : 1],
        z_raw[kMain && kVec ? TileMap<T, kTT, kNT, kVec>::kWA : 1];
    if constexpr (kMain && kVec) {
#pragma unroll
      for (int w = 0; w < TileMap<T, kTT, kNT, kVec>::kWA; ++w)
        u_raw[w] = nx.u[w], z_raw[w] = nx.z[w];
    }
    __syncthreads();
    // The next tile's loads fly while this one is scanned.
    if (tb + kTT < t1) {
      LoadRaw<T, kTT, true, kMain || kBwd, kBwd, kMain || kBwd, kNT, kVec>(p, k, tb + kTT, t1, nx,
                                                                           from_pre);
    }
    // Halves of kBT steps: the backward pre-pass leaves a checkpoint at each backward tile start.
    // The main pass stores each step's partial output one step late, after the next step's
    // shared loads: nvcc does not move those loads above a shared store it cannot prove
    // disjoint from them, which made every step wait for the previous one's whole chain.
    float y_prev[kCP] = {};
    // Steps unrolled: a whole half in the one-channel main pass (forward (8,1536,2048) and
    // (2,5120,8192) 1.3-3 % faster than at 8, H100), 8 elsewhere (the two-channel main pass was
    // not faster at 16).
    constexpr int kUnroll = kMain && kCP == 1 ? kBT : 8;
    for (int hf = 0; hf < kTT / kBT; ++hf) {
#pragma unroll(kUnroll)
      for (int t2 = 0; t2 < kBT; ++t2) {
        const int tt = hf * kBT + t2;
        float2 dd[kCP];
#pragma unroll
        for (int q = 0; q < kCP; ++q) dd[q] = s.dt[tt][ch + q * kChT];
        float bv[kS], cv[kS];
        StateSlice<kS>(s.bm[tt], sl, bv);
        if constexpr (kMain || kBwd) StateSlice<kS>(s.cm[tt], sl, cv);
        if constexpr (kMain) {
          if (tt > 0) {
#pragma unroll
            for (int q = 0; q < kCP; ++q) {
              const int c = ch + q * kChT;
              yp[tt - 1][kVec ? YpSlot(c) : c][sl] = y_prev[q];
            }
          }
        }
        float e[kCP][kS];
#pragma unroll
        for (int q = 0; q < kCP; ++q) {
#pragma unroll
          for (int j = 0; j < kS; ++j) {
            e[q][j] = Ex2(dd[q].x * a2[q][j]);
            h[q][j] = fmaf(e[q][j], h[q][j], dd[q].y * bv[j]);
          }
        }
        if constexpr (kMain) {
#pragma unroll
          for (int q = 0; q < kCP; ++q) {
            float y = cv[0] * h[q][0];
#pragma unroll
            for (int j = 1; j < kS; ++j) y = fmaf(cv[j], h[q][j], y);
            y_prev[q] = y;
          }
        } else if constexpr (kBwd) {
#pragma unroll
          for (int q = 0; q < kCP; ++q) {
            const float dy = s.dy[tt][ch + q * kChT];
#pragma unroll
            for (int j = 0; j < kS; ++j) {
              P[q][j] *= e[q][j];
              r[q][j] = fmaf(P[q][j], cv[j] * dy, r[q][j]);
            }
          }
        }
        if constexpr (!kMain) {
#pragma unroll
          for (int q = 0; q < kCP; ++q) sum[q] += dd[q].x;
        }
      }
      if constexpr (kBwd) {
        // Zero-start state and step sum at the start of the segment's next backward tile.
        const int64_t next = tb + (hf + 1) * kBT;
#pragma unroll
        for (int q = 0; q < kCP; ++q) {
          if (cok[q] && next < t1) {
            const int64_t ci = row[q] * (p.seg_len / kBT - 1) + (next - t0) / kBT - 1;
            reinterpret_cast<float4*>(p.ws_ck)[ci * 4 + sl] =
                make_float4(h[q][0], h[q][1], h[q][2], h[q][3]);
            if (sl == 0) p.ws_cks[ci] = sum[q];
          }
        }
      }
    }
    if constexpr (kMain) {
#pragma unroll
      for (int q = 0; q < kCP; ++q) {
        const int c = ch + q * kChT;
        yp[kTT - 1][kVec ? YpSlot(c) : c][sl] = y_prev[q];
      }
    }
    __syncthreads();
    if constexpr (kMain && kVec) {
      // The thread that staged these (step, channel) pairs finishes them, with their u and z
      // still in its registers (u_raw, z_raw).
      using M = TileMap<T, kTT, kNT, kVec>;
      const int steps = static_cast<int>(t1 - tb < kTT ? t1 - tb : kTT);
      const bool gate = p.z.p != nullptr;
#pragma unroll
      for (int v = 0; v < M::kA / M::kVE; ++v) {
        const int tt = M::Step(tid, v * M::kVE), c0 = M::Chan(tid, 0);
        if (c0 >= k.nvalid || tt >= steps) continue;
        float y[M::kVE];
#pragma unroll
        for (int j = 0; j < M::kVE; ++j) {
          const int c = c0 + j;
          const float z = Elem<T, kVec>(z_raw, v * M::kVE + j);
          const float g = z * Sigmoid(z);  // selected, not branched on: no divergence to join
          y[j] = LanesSum<kL>(yp[tt][YpSlot(c)]);
          y[j] = fmaf(s.dsk[c], Elem<T, kVec>(u_raw, v * M::kVE + j), y[j]) * (gate ? g : 1.f);
        }
        StVec<T, M::kVE>(p.out, k.b * p.u.sb + (tb + tt) * p.u.sl + k.d0 + c0, y);
      }
    } else if constexpr (kMain) {
      const int64_t obase = k.b * p.out.sb + (tb + (tid >> 5)) * p.out.sl + de * p.out.sd;
#pragma unroll
      for (int i = 0; i < TileMap<T, kTT, kNT, kVec>::kA; ++i) {
        const int tt = (tid >> 5) + kNT / 32 * i;
        if (!ceok || tb + tt >= t1) continue;
        float y = LanesSum<kL>(yp[tt][ce]);
        y = fmaf(dsk, s.u[tt][ce], y);
        if (p.z.p) {
          const float z = s.z[tt][ce];
          y *= z * Sigmoid(z);
        }
        St<T>(p.out.p, obase + kNT / 32 * i * p.out.sl, y);
      }
    }
  }
#pragma unroll
  for (int q = 0; q < kCP; ++q) {
    if (!cok[q]) continue;
    if constexpr (kMain) {
      if (k.seg + 1 == S && p.h_last) {
#pragma unroll
        for (int j = 0; j < kS; ++j) p.h_last[(k.b * D + d[q]) * 16 + kS * sl + j] = h[q][j];
      }
    } else {
#pragma unroll
      for (int j = 0; j < kS; ++j) {
        p.ws_s[row[q] * 16 + kS * sl + j] = h[q][j];
        if constexpr (kBwd) p.ws_r[row[q] * 16 + kS * sl + j] = r[q][j];
      }
      if (sl == 0) p.ws_sum[row[q]] = sum[q];
    }
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
  float chan[2][kBT][kCh];  // dD, dbias partials per row of threads (4 rows scalar, 16 vector)
};

// y, sum g*e*h*A, sum g*B of step tt and channel c, summed over the channel's lanes. Within a
// warp's 8 slots the channels are rotated by c >> 3, so that the vector epilogue's quarter warp
// (channels 0, 4, ..., 28 plus j) reads 8 different 16-byte bank groups.
__device__ __forceinline__ float4& RedAt(BwdSmem& sm, int tt, int c) {
  return sm.hist[tt][(c >> 3) * 32 + (((c & 7) + (c >> 3)) & 7)];
}
// dBm (m < 16) and dCm (16 + m) of step tt summed over the 8 channels of warp w.
__device__ __forceinline__ float& DbcAt(BwdSmem& sm, int w, int tt, int m) {
  return reinterpret_cast<float*>(&sm.hist[tt][w * 32 + 8])[m];
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kTh, 4) TiledBackwardKernel(const Params p, int64_t cpg) {
  extern __shared__ float4 dyn[];
  BwdSmem& sm = *reinterpret_cast<BwdSmem*>(dyn);
  const TileBlock k = LocateBlock<std::is_same_v<T, float>>(p);
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
  const float dsk = p.D_skip ? p.D_skip[de] : 0.f;
  StageChannelParams(p, k, sm.s);  // read after the first barrier of the tile loop

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
  Raw<T, kBT, kTh, kVec> rr;  // next tile of the backward walk
  LoadRaw<T, kBT, true, true, true, true, kTh, kVec>(p, k, t0 + (ntiles - 1) * kBT, t1, rr);
  // dD and dbias partials: of channel ce (scalar epilogue) or of the vector's channels.
  float dD_acc[kVec ? 4 : 1] = {}, dbias_acc[kVec ? 4 : 1] = {};
  const bool one_block = cpg == 1;
  // Tile r's checkpoint (the pre-pass's zero-start state at its start and the step-size sum to
  // there), loaded one tile ahead like the inputs.
  float4 ck = make_float4(0.f, 0.f, 0.f, 0.f);
  float ck_sum = 0.f;
  const auto load_ck = [&](int r) {
    if (r > 0 && cok) {
      const int64_t ci = ck_row + r - 1;
      ck = reinterpret_cast<const float4*>(p.ws_ck)[ci * 4 + sl];
      ck_sum = p.ws_cks[ci];
    }
  };
  load_ck(ntiles - 1);
  for (int r = ntiles - 1; r >= 0; --r) {
    const int64_t tb = t0 + r * kBT;
    // The state entering tile r: the pre-pass's zero-start state there plus the decayed state
    // entering the segment (no forward sweep).
    float hh[4] = {h[0], h[1], h[2], h[3]};
    if (r > 0 && cok) {
      const float cv[4] = {ck.x, ck.y, ck.z, ck.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) hh[j] = fmaf(Ex2(a2[j] * ck_sum), h[j], cv[j]);
    }
    __syncthreads();
    PrepTile<T, kBT, true, true, true, StepSmem<kBT, true, true>, kTh, kVec>(p, k, tb, t1, rr,
                                                                             sm.s);
    __syncthreads();
    if (r > 0) LoadRaw<T, kBT, true, true, true, true, kTh, kVec>(p, k, tb - kBT, t1, rr);
    load_ck(r - 1);
#pragma unroll 4
    for (int tt = 0; tt < kBT; ++tt) {
      const float2 dd = sm.s.dt[tt][ch];
      const float dt = dd.x, dtu = dd.y;
      const float4 b4 = sm.s.bm[tt][sl];
      const float bv[4] = {b4.x, b4.y, b4.z, b4.w};
      sm.hist[tt][tid] = make_float4(hh[0], hh[1], hh[2], hh[3]);
#pragma unroll
      for (int j = 0; j < 4; ++j) hh[j] = fmaf(Ex2(dt * a2[j]), hh[j], dtu * bv[j]);
    }
    // Each step's sums are stored one step late, after the next step's shared loads (as in the
    // forward: nvcc keeps shared loads below earlier shared stores).
    float red_prev = 0.f, dbc_prev = 0.f;
    const int kv = lane >> 2;  // (kind, j) = (kv >> 2, kv & 3)
    const int dbc_m = (kv >> 2) * 16 + 4 * sl + (kv & 3);
#pragma unroll 2
    for (int tt = kBT - 1; tt >= 0; --tt) {
      const float2 dd = sm.s.dt[tt][ch];
      const float dt = dd.x, dtu = dd.y, dy = sm.s.dy[tt][ch];
      const float4 b4 = sm.s.bm[tt][sl], c4 = sm.s.cm[tt][sl], h4 = sm.hist[tt][tid];
      if (tt + 1 < kBT) {
        __syncwarp();  // the warp's reads of hist[tt + 1], which its sums overwrite, are done
        reinterpret_cast<float*>(&RedAt(sm, tt + 1, ch))[sl] = red_prev;
        DbcAt(sm, warp, tt + 1, dbc_m) = dbc_prev;
      }
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
        // The same bits in either order; nvcc schedules them differently: measured (interleaved
        // A/B) 0.3-0.6 % faster for bf16 with g's update first, 1.5 % slower for fp32.
        if constexpr (std::is_same_v<T, float>) {
          const float geh = g[j] * e * hp[j];
          ga = fmaf(geh, A[j], ga);
          dA[j] = fmaf(geh, dt, dA[j]);
          gb = fmaf(g[j], bv[j], gb);
          g[j] *= e;
        } else {
          gb = fmaf(g[j], bv[j], gb);
          g[j] *= e;
          const float geh = g[j] * hp[j];
          ga = fmaf(geh, A[j], ga);
          dA[j] = fmaf(geh, dt, dA[j]);
        }
      }
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
        red_prev = q[0];
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
      dbc_prev = v[0];
    }
    __syncwarp();
    reinterpret_cast<float*>(&RedAt(sm, 0, ch))[sl] = red_prev;
    DbcAt(sm, warp, 0, dbc_m) = dbc_prev;
    __syncthreads();
    // Epilogue per (t, channel).
    if constexpr (kVec) {
      // A thread finishes 4 consecutive channels of one step: one 8/16-byte store per output.
      using M = TileMap<T, kBT, kTh, true>;
      static_assert(M::kVE == 4 && M::kA == 4, "one vector of 4 channels a thread");
      const int tt = M::Step(tid, 0), c0 = M::Chan(tid, 0);
      if (c0 < k.nvalid && tb + tt < t1) {
        float du[4], ddelta[4], dz[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int c = c0 + j;
          const float4 rd = RedAt(sm, tt, c);
          const float y = rd.x, ga = rd.y, gb = rd.z;
          const float dt = sm.s.dt[tt][c].x, dy = sm.s.dy[tt][c], u = sm.s.u[tt][c];
          const float dsk_c = sm.s.dsk[c];
          du[j] = fmaf(dsk_c, dy, gb * dt);
          ddelta[j] = fmaf(gb, u, ga) * sm.s.dsp[tt][c];
          dz[j] = sm.s.dzf[tt][c] * fmaf(dsk_c, u, y);
          dD_acc[j] = fmaf(dy, u, dD_acc[j]);
          dbias_acc[j] += ddelta[j];
        }
        const int64_t off = k.b * p.u.sb + (tb + tt) * p.u.sl + k.d0 + c0;  // u's layout
        StVec<T, 4>(p.du, off, du);
        StVec<T, 4>(p.ddelta, off, ddelta);
        if (p.z.p && p.dz.p) StVec<T, 4>(p.dz, off, dz);
      }
    } else {
      const int64_t te = tb + (tid >> 5);
      const int64_t obu = k.b * p.du.sb + te * p.du.sl + de * p.du.sd;
      const int64_t obd = k.b * p.ddelta.sb + te * p.ddelta.sl + de * p.ddelta.sd;
      const int64_t obz = k.b * p.dz.sb + te * p.dz.sl + de * p.dz.sd;
#pragma unroll
      for (int i = 0; i < kBT * kCh / kTh; ++i) {
        const int tt = (tid >> 5) + 4 * i;
        if (!ceok || tb + tt >= t1) continue;
        const float4 rd = RedAt(sm, tt, ce);
        const float y = rd.x, ga = rd.y, gb = rd.z;
        const float dt = sm.s.dt[tt][ce].x, dy = sm.s.dy[tt][ce];
        const float u = sm.s.u[tt][ce];
        const float dsp = sm.s.dsp[tt][ce];
        const float du = fmaf(dsk, dy, gb * dt);
        const float ddelta = fmaf(gb, u, ga) * dsp;
        St<T>(p.du.p, obu + 4 * i * p.du.sl, du);
        St<T>(p.ddelta.p, obd + 4 * i * p.ddelta.sl, ddelta);
        if (p.z.p && p.dz.p) {
          St<T>(p.dz.p, obz + 4 * i * p.dz.sl, sm.s.dzf[tt][ce] * fmaf(dsk, u, y));
        }
        dD_acc[0] = fmaf(dy, u, dD_acc[0]);
        dbias_acc[0] += ddelta;
      }
    }
    // dBm/dCm of this tile: sum over the block's 4 warps, then a partial per channel block. A
    // thread takes 4 consecutive entries m0.. of one step (one 16-byte read per warp).
    {
      static_assert(kBT * 32 == kTh * 4, "one float4 of dBm/dCm entries a thread");
      const int tt = tid >> 3, m0 = (tid & 7) * 4;
      const int64_t t = tb + tt;
      if (t < t1) {
        float4 q[4];
#pragma unroll
        for (int w = 0; w < 4; ++w) q[w] = *reinterpret_cast<const float4*>(&DbcAt(sm, w, tt, m0));
        const float v[4] = {
            (q[0].x + q[1].x) + (q[2].x + q[3].x), (q[0].y + q[1].y) + (q[2].y + q[3].y),
            (q[0].z + q[1].z) + (q[2].z + q[3].z), (q[0].w + q[1].w) + (q[2].w + q[3].w)};
        if (one_block) {
          const int kind = m0 >> 4;
          const Strided4& o = kind == 0 ? p.dBm : p.dCm;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            St<T>(o.p, k.b * o.sb + t * o.sl + k.g * o.sg + ((m0 & 15) + j) * o.sn, v[j]);
          }
        } else {
          const int64_t cbg = (k.d0 - k.g * p.dims_per_group) / kCh;
          // [cbg][b][t][g][kind][n]
          *reinterpret_cast<float4*>(
              &p.ws_dbc[(((cbg * p.batch + k.b) * L + t) * p.groups + k.g) * 32 + m0]) =
              make_float4(v[0], v[1], v[2], v[3]);
        }
      }
    }
  }
  // dD, dbias: the rows of threads' partials of each channel, summed in row order.
  constexpr int kRows = kVec ? kBT : 4;
  if constexpr (kVec) {
    using M = TileMap<T, kBT, kTh, true>;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      sm.chan[0][M::Step(tid, 0)][M::Chan(tid, 0) + j] = dD_acc[j];
      sm.chan[1][M::Step(tid, 0)][M::Chan(tid, 0) + j] = dbias_acc[j];
    }
  } else {
    sm.chan[0][tid >> 5][ce] = dD_acc[0];
    sm.chan[1][tid >> 5][ce] = dbias_acc[0];
  }
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
    float sd = 0.f, sb = 0.f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) sd += sm.chan[0][r][ce], sb += sm.chan[1][r][ce];
    p.ws_dD[i] = sd;
    p.ws_dbias[i] = sb;
  }
}

// dBm, dCm: sum of the channel blocks' partials in order. Layout [cbg][b][t][g][2][16].
// Blocks past bc_blocks sum the dA, dD and ddt_bias partials instead (SumGradPart): one launch
// for every reduction after the backward.
template <typename T>
__global__ void TiledReduceBCKernel(const Params p, int64_t cpg, int64_t bc_blocks) {
  if (blockIdx.x >= bc_blocks) {
    const int64_t i = (blockIdx.x - bc_blocks) * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    SumGradPart(p, p.batch * p.num_seg, p.dim * 16, i);
    return;
  }
  const int64_t count = p.batch * p.len * p.groups * 32;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= count) return;
  const float s = SumInOrder(p.ws_dbc + i, cpg, count);
  const int64_t n = i & 15, kind = (i >> 4) & 1, g = (i >> 5) % p.groups;
  const int64_t t = (i / (32 * p.groups)) % p.len, b = i / (32 * p.groups * p.len);
  const Strided4& o = kind == 0 ? p.dBm : p.dCm;
  St<T>(o.p, b * o.sb + t * o.sl + g * o.sg + n * o.sn, s);
}

}  // namespace

int TiledForwardTile() { return kFT; }
int TiledBackwardTile() { return kBT; }
int64_t TiledBlocks(const Params& p) { return p.batch * p.groups * CeilDiv(p.dims_per_group, kCh); }

// The vector tile layout's condition: activations channel-contiguous with step and batch
// strides and bases on 16-byte boundaries, all with u's layout (one offset serves every array),
// groups of whole 8-channel vectors, and Bm/Cm state-contiguous likewise. (8 elements: the
// widest vector, bf16 at 16 bytes.)
bool ActVectorizable(const Strided3& a) {
  return a.p == nullptr || (a.sd == 1 && a.sl % 8 == 0 && a.sb % 8 == 0 &&
                            reinterpret_cast<uintptr_t>(a.p) % 16 == 0);
}
bool BcVectorizable(const Strided4& a, DType dtype) {
  const int64_t per16 = dtype == DType::kF32 ? 4 : 8;
  return a.sn == 1 && a.sl % per16 == 0 && a.sb % per16 == 0 && a.sg % per16 == 0 &&
         reinterpret_cast<uintptr_t>(a.p) % 16 == 0;
}
bool TiledVectorizable(const Params& p, bool bwd) {
  const auto like_u = [&](const Strided3& a) {
    return a.p == nullptr || (a.sb == p.u.sb && a.sl == p.u.sl);
  };
  if (!like_u(p.delta) || !like_u(p.z) || !like_u(bwd ? p.dout : p.out)) return false;
  if (bwd && (!like_u(p.du) || !like_u(p.ddelta) || !like_u(p.dz))) return false;
  const bool outs = bwd ? ActVectorizable(p.dout) && ActVectorizable(p.du) &&
                              ActVectorizable(p.ddelta) && ActVectorizable(p.dz)
                        : ActVectorizable(p.out);
  return p.dims_per_group % 8 == 0 && ActVectorizable(p.u) && ActVectorizable(p.delta) &&
         ActVectorizable(p.z) && BcVectorizable(p.Bm, p.dtype) && BcVectorizable(p.Cm, p.dtype) &&
         outs;
}

// The forward takes the vector layout in bf16 only: in fp32 (capped at 80 registers for 6 blocks
// an SM) it spilled and ran 5-9% slower than the scalar layout (H100, bench/RESULTS.md v7).
template <typename T>
constexpr bool kVecForward = !std::is_same_v<T, float>;

constexpr int kMaxDevices = 16;

// One launch of TiledScanKernel over `blocks` blocks (the main pass's partials in dynamic shared
// memory: with the static StepSmem they pass 48 KB at 8 lanes).
// With per_sm set, launches nothing and reports how many blocks of that kernel fit on an SM.
template <typename T, int kMode, int kL, bool kVec, int kCP = 1, bool kHandIn = false>
void LaunchTiledScan(const Params& p, int64_t blocks, cudaStream_t stream, int* per_sm) {
  const auto kernel = TiledScanKernel<T, kMode, kL, kVec, kCP, kHandIn>;
  constexpr int kThreads = kCh * kL / kCP;
  size_t yp = 0;
  if constexpr (kMode == kFwdMain) {
    static const cudaError_t attr =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    (void)attr;  // a failure shows as the launch's error
    yp = kFT / kCP * kYpRow<kVec> * kL * sizeof(float);
  }
  if (per_sm) {  // asked on every split forward: remembered per device
    static std::atomic<int> known[kMaxDevices];  // blocks an SM + 1; 0: not asked yet
    int dev = 0;
    cudaGetDevice(&dev);
    if (dev < kMaxDevices && known[dev].load(std::memory_order_relaxed) > 0) {
      *per_sm = known[dev].load(std::memory_order_relaxed) - 1;
      return;
    }
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, kernel, kThreads, yp) != cudaSuccess)
      *per_sm = 0;
    if (dev < kMaxDevices) known[dev].store(*per_sm + 1, std::memory_order_relaxed);
    return;
  }
  if (kMode == kFwdMain && p.num_seg > 1) {  // after the compose: see WaitPrimary
    LaunchAfterPrimary(kernel, blocks, kThreads, yp, stream, p);
    return;
  }
  kernel<<<blocks, kThreads, yp, stream>>>(p);
}

// The forward passes at 4 lanes, vector or scalar layout, kCP channels a thread; the main pass
// in its own variant where it takes the pre-pass's step sizes (the one without that code keeps
// its registers: with it the bf16 rows that do not split ran ~1 % slower).
template <typename T, int kMode, int kCP>
void LaunchTiledForward4(const Params& p, int64_t blocks, cudaStream_t stream, int* per_sm) {
  if constexpr (kVecForward<T>) {
    if (TiledVectorizable(p, false)) {
      if constexpr (kMode == kFwdMain && kHandsStepSizes<T, true>) {
        if (p.ws_dt16)
          return LaunchTiledScan<T, kMode, 4, true, kCP, true>(p, blocks, stream, per_sm);
      }
      return LaunchTiledScan<T, kMode, 4, true, kCP>(p, blocks, stream, per_sm);
    }
  }
  LaunchTiledScan<T, kMode, 4, false, kCP>(p, blocks, stream, per_sm);
}

template <typename T>
bool TiledForwardHandsStepSizes(const Params& p, const FwdShape& f) {
  return kHandsStepSizes<T, kVecForward<T>> && f.lanes == 4 && TiledVectorizable(p, false);
}

template <typename T>
void LaunchTiledPre(const Params& p, bool bwd, int64_t segs, const FwdShape& f, cudaStream_t stream,
                    int* per_sm) {
  const int64_t blocks = p.chan_blocks * segs;
  if (bwd) {
    // bf16: two channels a thread, 0.8-1.2 % faster backward on every row (H100, session 5); in
    // fp32 -0.6..+1.2 %, so one.
    constexpr int kCP = std::is_same_v<T, float> ? 1 : 2;
    if (TiledVectorizable(p, true))
      return LaunchTiledScan<T, kBwdPre, 4, true, kCP>(p, blocks, stream, per_sm);
    return LaunchTiledScan<T, kBwdPre, 4, false, kCP>(p, blocks, stream, per_sm);
  }
  // The lanes-2/8 variants are tuning knobs measured slower (bench/RESULTS.md, v6): scalar only.
  if (f.lanes == 2) return LaunchTiledScan<T, kFwdPre, 2, false>(p, blocks, stream, per_sm);
  if (f.lanes == 8) return LaunchTiledScan<T, kFwdPre, 8, false>(p, blocks, stream, per_sm);
  LaunchTiledForward4<T, kFwdPre, 1>(p, blocks, stream, per_sm);
}

template <typename T>
void LaunchTiledForward(const Params& p, const FwdShape& f, cudaStream_t stream, int* per_sm) {
  const int64_t blocks = p.chan_blocks * p.num_seg;
  if (f.lanes == 2) return LaunchTiledScan<T, kFwdMain, 2, false>(p, blocks, stream, per_sm);
  if (f.lanes == 8) return LaunchTiledScan<T, kFwdMain, 8, false>(p, blocks, stream, per_sm);
  if (f.chans == 2) return LaunchTiledForward4<T, kFwdMain, 2>(p, blocks, stream, per_sm);
  LaunchTiledForward4<T, kFwdMain, 1>(p, blocks, stream, per_sm);
}

template <typename T>
cudaError_t LaunchTiledBackward(const Params& p, cudaStream_t stream) {
  const size_t smem = sizeof(BwdSmem);
  static const cudaError_t attr[2] = {
      cudaFuncSetAttribute(TiledBackwardKernel<T, false>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024),
      cudaFuncSetAttribute(TiledBackwardKernel<T, true>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024)};
  if (attr[0] != cudaSuccess) return attr[0];
  if (attr[1] != cudaSuccess) return attr[1];
  const int64_t cpg = p.chan_warps;
  const int64_t blocks = p.chan_blocks * p.num_seg;
  if (TiledVectorizable(p, true)) {
    TiledBackwardKernel<T, true><<<blocks, kTh, smem, stream>>>(p, cpg);
  } else {
    TiledBackwardKernel<T, false><<<blocks, kTh, smem, stream>>>(p, cpg);
  }
  return cudaSuccess;
}

template <typename T>
void LaunchTiledBackwardReduce(const Params& p, cudaStream_t stream) {
  const int64_t cpg = p.chan_warps;
  const int64_t bc_blocks = cpg > 1 ? CeilDiv(p.batch * p.len * p.groups * 32, 256) : 0;
  const int64_t grad_blocks = CeilDiv(p.dim * 16 + 2 * p.dim, 256);
  TiledReduceBCKernel<T><<<bc_blocks + grad_blocks, 256, 0, stream>>>(p, cpg, bc_blocks);
}

#define MAMBA_TILED_INSTANTIATE(T)                                                             \
  template void LaunchTiledPre<T>(const Params&, bool, int64_t, const FwdShape&, cudaStream_t, \
                                  int*);                                                       \
  template void LaunchTiledForward<T>(const Params&, const FwdShape&, cudaStream_t, int*);     \
  template bool TiledForwardHandsStepSizes<T>(const Params&, const FwdShape&);                 \
  template cudaError_t LaunchTiledBackward<T>(const Params&, cudaStream_t);                    \
  template void LaunchTiledBackwardReduce<T>(const Params&, cudaStream_t);
MAMBA_TILED_INSTANTIATE(float)
MAMBA_TILED_INSTANTIATE(__nv_bfloat16)
#undef MAMBA_TILED_INSTANTIATE

}  // namespace mamba::kernels::cuda
