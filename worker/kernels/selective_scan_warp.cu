// Warp-scan forward for N == 16: one pass of exponentials when too few channels run to fill the
// GPU without splitting the sequence.
//
// The tiled forward splits L into segments when B*D is small (B = 1 rows) and then pays a
// second exponential pass (the segment pre-pass). Here a warp owns one channel and splits both
// its 16 states and each tile's 64 steps over its lanes: lane = 8 * sub + slice holds states
// 2*slice, 2*slice + 1 over steps [16*sub, 16*sub + 16) of the tile. Per tile:
//   1. each lane walks its 16 steps from a zero state, keeping the per-step decay e and input w
//      in registers (the only exponentials of the pass), and its sub-chunk's map
//      h -> P*h + H (P = exp(A * sum of its step sizes));
//   2. the four sub-chunk maps are composed with shuffles (fixed order) into each sub-chunk's
//      entering state and the state carried to the next tile;
//   3. each lane replays its 16 steps from its entering state with the kept e and w (no
//      exponentials) and forms its partial outputs; the 8 slices' partials are summed through
//      shared memory in a fixed order, so that lane l ends with two steps of the tile.
// More instructions per (step, state) than the tiled kernel's sequential walk, half the
// exponentials of its split. Measured slower than the split on H100 (1.88 vs 1.39 ms at
// (1,1536,65536) bf16: latency-bound at 3 warps per scheduler, bench/RESULTS.md): an experiment.
#include "worker/kernels/selective_scan_cuda_kernels.h"

namespace mamba::kernels::cuda {
namespace {

constexpr int kWCh = 4;          // channels (one a warp) per block
constexpr int kWTh = kWCh * 32;  // threads per block
constexpr int kSub = 16;         // steps of a lane's sub-chunk
constexpr int kWT = 4 * kSub;    // steps per tile (4 sub-chunks)
constexpr int kRep = kWT / 32;   // (step, channel) items a thread stages per tile
constexpr int kRowPad = kWT + 4; // dt/dtu row stride: float4-aligned, fewer prep bank conflicts
// Partials [sub][slice][kSub]: the slice stride (20) makes a quarter warp's float4 writes hit 8
// bank groups, the sub stride (8 mod 32) spreads the column reads of the 4 sub-chunks.
constexpr int kYsSlice = kSub + 4;
constexpr int kYsSub = 8 * kYsSlice + 8;

struct WarpScanSmem {
  float dt[kWCh][kRowPad], dtu[kWCh][kRowPad];  // per channel, steps contiguous
  float4 bc[kWT][8];                            // (B[2s], B[2s+1], C[2s], C[2s+1]) per slice s
  float ys[kWCh][4 * kYsSub];                   // per warp: [sub][slice][kSub] partials
  float y[kWT][kWCh + 1];                       // summed output of (step, channel)
};

template <typename T>
using Bits = std::conditional_t<std::is_same_v<T, float>, float, unsigned short>;

template <typename T>
__device__ __forceinline__ uint32_t LdRaw(const Bits<T>* p, bool ok) {
  if constexpr (std::is_same_v<T, float>) {
    return ok ? __float_as_uint(__ldg(p)) : 0u;
  } else {
    return ok ? __ldg(p) : 0u;
  }
}

template <typename T>
__device__ __forceinline__ float FromRaw(uint32_t w) {
  return std::is_same_v<T, float> ? __uint_as_float(w) : __uint_as_float(w << 16);
}

// What a thread loads for one tile, held as loaded (converted at first use, so that the load's
// latency overlaps the previous tile's scan): one (step, channel) of delta, u and z, and four
// consecutive states of one step of Bm and Cm (kVec: one 8- or 16-byte load each, bf16 pairs
// packed in a word).
template <typename T, bool kVec>
struct WarpRaw {
  static constexpr int kW = kVec && !std::is_same_v<T, float> ? 2 : 4;
  uint32_t dl, u, z, b[kW], c[kW];
  __device__ float B(int j) const { return Elem(b, j); }
  __device__ float C(int j) const { return Elem(c, j); }
  __device__ static float Elem(const uint32_t* w, int j) {
    if constexpr (kW == 2) return __uint_as_float(j & 1 ? w[j >> 1] & 0xffff0000u : w[j >> 1] << 16);
    return FromRaw<T>(w[j]);
  }
};

template <typename T, bool kVec>
__device__ __forceinline__ void LdStates(const Bits<T>* p, int64_t sn, bool ok, uint32_t* w) {
  if constexpr (kVec && std::is_same_v<T, float>) {
    const uint4 q = ok ? __ldg(reinterpret_cast<const uint4*>(p)) : make_uint4(0, 0, 0, 0);
    w[0] = q.x, w[1] = q.y, w[2] = q.z, w[3] = q.w;
  } else if constexpr (kVec) {
    const uint2 q = ok ? __ldg(reinterpret_cast<const uint2*>(p)) : make_uint2(0, 0);
    w[0] = q.x, w[1] = q.y;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) w[j] = LdRaw<T>(p + j * sn, ok);
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kWTh, 3) WarpScanForwardKernel(const Params p) {
  __shared__ WarpScanSmem s;
  const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, sub = lane >> 3, sl = lane & 7;
  // Block -> (b, g, first channel of the block within the group).
  const int64_t per_g = p.chan_warps;
  const int64_t bg = blockIdx.x / per_g, c0 = (blockIdx.x % per_g) * kWCh;
  const int64_t b = bg / p.groups, g = bg % p.groups;
  const int nvalid = static_cast<int>(min(static_cast<int64_t>(kWCh), p.dims_per_group - c0));
  const int64_t d0 = g * p.dims_per_group + c0, D = p.dim, L = p.len;

  // Staging role: (step ps + 32 r, channel pc) of each tile, and states 4*pc.. of those steps
  // of Bm/Cm.
  const int ps = tid >> 2, pc = tid & 3;
  const bool pcok = pc < nvalid;
  const int64_t pd = d0 + (pcok ? pc : 0);
  const float bias = p.dt_bias ? p.dt_bias[pd] : 0.f;
  const float dsk = p.D_skip ? p.D_skip[pd] : 0.f;
  // Pointers at step ps of the first tile, advanced a tile at a time.
  const auto at3 = [&](const Strided3& a) {
    return static_cast<const Bits<T>*>(a.p) + (b * a.sb + ps * a.sl + pd * a.sd);
  };
  const auto at4 = [&](const Strided4& a) {
    return static_cast<const Bits<T>*>(a.p) + (b * a.sb + ps * a.sl + g * a.sg + 4 * pc * a.sn);
  };
  const Bits<T>*pdl = at3(p.delta), *pu = at3(p.u), *pz = at3(p.z), *pb = at4(p.Bm),
           *pcm = at4(p.Cm);
  const bool gate = p.z.p != nullptr;
  const int tiles = static_cast<int>((L + kWT - 1) / kWT);
  const int last = static_cast<int>(L - int64_t(tiles - 1) * kWT);  // steps of the last tile
  // Whether item r of tile `tile` is a step of the sequence.
  const auto in_seq = [&](int tile, int r) { return tile + 1 < tiles || ps + 32 * r < last; };
  const auto load = [&](int tile, WarpRaw<T, kVec> (&r)[kRep]) {
#pragma unroll
    for (int i = 0; i < kRep; ++i) {
      const bool ok = in_seq(tile, i);
      r[i].dl = LdRaw<T>(pdl + 32 * i * p.delta.sl, ok && pcok);
      r[i].u = LdRaw<T>(pu + 32 * i * p.u.sl, ok && pcok);
      r[i].z = LdRaw<T>(pz + 32 * i * p.z.sl, ok && pcok && gate);
      LdStates<T, kVec>(pb + 32 * i * p.Bm.sl, p.Bm.sn, ok, r[i].b);
      LdStates<T, kVec>(pcm + 32 * i * p.Cm.sl, p.Cm.sn, ok, r[i].c);
    }
    pdl += kWT * p.delta.sl, pu += kWT * p.u.sl, pz += kWT * p.z.sl;
    pb += kWT * p.Bm.sl, pcm += kWT * p.Cm.sl;
  };

  // Scan role: warp w is channel dw (warps past the group's channels compute on a valid channel
  // and store nothing: keeping the shuffles out of a branch keeps them plain); this lane's
  // states 2*sl, 2*sl + 1.
  const bool active = w < nvalid;  // warp-uniform
  const int64_t dw = d0 + (active ? w : 0);
  float a2[2], carry[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int n = 2 * sl + j;
    a2[j] = p.A[dw * 16 + n] * kLog2e;
    carry[j] = p.h0 ? p.h0[(b * D + dw) * 16 + n] : 0.f;
  }

  WarpRaw<T, kVec> nx[kRep];
  load(0, nx);
  for (int tile = 0; tile < tiles; ++tile) {
    // Stage the tile: step sizes, dt*u and the Bm/Cm pairs each slice reads; u and z stay in
    // registers for the epilogue.
    float u[kRep], z[kRep];
#pragma unroll
    for (int i = 0; i < kRep; ++i) {
      const int st = ps + 32 * i;
      float dsp;
      float dt = FastStepSize<T>(FromRaw<T>(nx[i].dl) + bias, p.softplus, &dsp);
      dt = pcok && in_seq(tile, i) ? dt : 0.f;  // steps past the end leave the state unchanged
      u[i] = FromRaw<T>(nx[i].u), z[i] = FromRaw<T>(nx[i].z);
      s.dt[pc][st] = dt;
      s.dtu[pc][st] = dt * u[i];
      s.bc[st][2 * pc] = make_float4(nx[i].B(0), nx[i].B(1), nx[i].C(0), nx[i].C(1));
      s.bc[st][2 * pc + 1] = make_float4(nx[i].B(2), nx[i].B(3), nx[i].C(2), nx[i].C(3));
    }
    __syncthreads();
    if (tile + 1 < tiles) load(tile + 1, nx);  // in flight during the scan

    // 1. This lane's sub-chunk from a zero state; e and w kept for the replay.
    float dtv[kSub], duv[kSub];
#pragma unroll
    for (int i = 0; i < kSub; i += 4) {
      const float4 a = *reinterpret_cast<const float4*>(&s.dt[w][kSub * sub + i]);
      const float4 c = *reinterpret_cast<const float4*>(&s.dtu[w][kSub * sub + i]);
      dtv[i] = a.x, dtv[i + 1] = a.y, dtv[i + 2] = a.z, dtv[i + 3] = a.w;
      duv[i] = c.x, duv[i + 1] = c.y, duv[i + 2] = c.z, duv[i + 3] = c.w;
    }
    float e[kSub][2], wv[kSub][2], cv[kSub][2], H[2] = {0.f, 0.f}, sum = 0.f;
#pragma unroll
    for (int i = 0; i < kSub; ++i) {
      const float4 q = s.bc[kSub * sub + i][sl];
      const float bq[2] = {q.x, q.y};
      cv[i][0] = q.z, cv[i][1] = q.w;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        e[i][j] = Ex2(dtv[i] * a2[j]);
        wv[i][j] = duv[i] * bq[j];
        H[j] = fmaf(e[i][j], H[j], wv[i][j]);
      }
      sum += dtv[i];
    }
    // 2. Compose the sub-chunks' maps h -> P*h + H across the 4 lanes of this slice (lanes
    // sl, sl + 8, sl + 16, sl + 24), earlier map first.
    float hin[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float P = Ex2(a2[j] * sum), Hj = H[j];
#pragma unroll
      for (int o = 8; o <= 16; o *= 2) {
        const float Pp = __shfl_up_sync(0xffffffffu, P, o);
        const float Hp = __shfl_up_sync(0xffffffffu, Hj, o);
        if (lane >= o) {
          Hj = fmaf(P, Hp, Hj);
          P *= Pp;
        }
      }
      float Pe = __shfl_up_sync(0xffffffffu, P, 8), He = __shfl_up_sync(0xffffffffu, Hj, 8);
      if (sub == 0) Pe = 1.f, He = 0.f;
      hin[j] = fmaf(Pe, carry[j], He);
      const float Pt = __shfl_sync(0xffffffffu, P, 24 + sl);
      const float Ht = __shfl_sync(0xffffffffu, Hj, 24 + sl);
      carry[j] = fmaf(Pt, carry[j], Ht);
    }
    // 3. Replay from the entering state; partial outputs of this slice's two states.
    float* yw = &s.ys[w][kYsSub * sub + kYsSlice * sl];
#pragma unroll
    for (int i = 0; i < kSub; i += 4) {
      float y[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
#pragma unroll
        for (int j = 0; j < 2; ++j) hin[j] = fmaf(e[i + k][j], hin[j], wv[i + k][j]);
        y[k] = fmaf(cv[i + k][1], hin[1], cv[i + k][0] * hin[0]);
      }
      *reinterpret_cast<float4*>(yw + i) = make_float4(y[0], y[1], y[2], y[3]);
    }
    __syncwarp();
    // Steps 16 * sub + sl + 8 r of the tile: the 8 slices' partials, pairs first.
#pragma unroll
    for (int r = 0; r < kSub / 8; ++r) {
      const float* yr = &s.ys[w][kYsSub * sub + sl + 8 * r];
      const float y01 = yr[0] + yr[kYsSlice], y23 = yr[2 * kYsSlice] + yr[3 * kYsSlice];
      const float y45 = yr[4 * kYsSlice] + yr[5 * kYsSlice];
      const float y67 = yr[6 * kYsSlice] + yr[7 * kYsSlice];
      s.y[kSub * sub + sl + 8 * r][w] = (y01 + y23) + (y45 + y67);
    }
    __syncthreads();
    // Epilogue by the staging thread of each (step, pc), which still holds u and z.
#pragma unroll
    for (int i = 0; i < kRep; ++i) {
      const int st = ps + 32 * i;
      if (!pcok || !in_seq(tile, i)) continue;
      float y = fmaf(dsk, u[i], s.y[st][pc]);
      if (gate) y *= z[i] * Sigmoid(z[i]);
      St<T>(p.out.p, b * p.out.sb + (int64_t(tile) * kWT + st) * p.out.sl + pd * p.out.sd, y);
    }
  }
  if (active && sub == 0 && p.h_last) {
#pragma unroll
    for (int j = 0; j < 2; ++j) p.h_last[(b * D + dw) * 16 + 2 * sl + j] = carry[j];
  }
}

}  // namespace

template <typename T>
void LaunchWarpScanForward(const Params& p, cudaStream_t stream) {
  Params q = p;
  q.chan_warps = CeilDiv(p.dims_per_group, kWCh);  // blocks per (batch, group)
  const int64_t blocks = p.batch * p.groups * q.chan_warps;
  // Bm/Cm load 4 states at once when n-contiguous and aligned for it.
  const auto vec = [](const Strided4& t) {
    return t.sn == 1 && t.sb % 4 == 0 && t.sl % 4 == 0 && t.sg % 4 == 0 &&
           reinterpret_cast<uintptr_t>(t.p) % (4 * sizeof(Bits<T>)) == 0;
  };
  if (vec(p.Bm) && vec(p.Cm)) {
    WarpScanForwardKernel<T, true><<<blocks, kWTh, 0, stream>>>(q);
  } else {
    WarpScanForwardKernel<T, false><<<blocks, kWTh, 0, stream>>>(q);
  }
}

template void LaunchWarpScanForward<float>(const Params&, cudaStream_t);
template void LaunchWarpScanForward<__nv_bfloat16>(const Params&, cudaStream_t);

}  // namespace mamba::kernels::cuda
