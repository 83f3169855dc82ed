// One-pass forward for N == 16 on few, long rows (B*D small, L large: (1,1536,65536)).
//
// The tiled forward fills the GPU on such rows by splitting L into segments, which costs a
// second pass of exponentials over all but the last segment (the segments' zero-start states)
// and leaves the exponential pipe, not HBM, as the limit. Here nothing is split: a block owns 16
// channels of one (batch, group) for the whole sequence, 8 lanes a channel and 2 states a lane,
// so the row's B*D*16 recurrences are spread as thinly as they go (1536 channels: 96 blocks, one
// warp an SM sub-partition) and each exponential is computed once. With one warp a
// sub-partition there is no other warp to hide latency: each tile's scan, the next tile's
// preparation and the loads of the tile after it are one straight run of code (a barrier a
// tile, no branches), so the scheduler interleaves them.
//
// Per tile of kLT steps: the block stages (step size, step size * u), (gate, D * u * gate) per
// (step, channel) and Bm/Cm per (step, state pair) in shared memory (double-buffered), computed
// once per element by the thread that loaded it. A lane reads 16 bytes a step (8 with bf16 Bm/Cm,
// kept as loaded bits): shared memory, not the exponentials, would otherwise be the limit. Every
// 16 steps the 8 lanes of a channel sum their partial outputs with a reduce-scatter of shuffles
// (fixed order), after which each lane owns two steps' outputs and finishes them.
#include "worker/kernels/selective_scan_cuda_kernels.h"

namespace mamba::kernels::cuda {
namespace {

constexpr int kLCh = 16;     // channels a block
constexpr int kLTh = 128;    // threads a block: 8 lanes a channel, 2 states a lane
constexpr int kLT = 64;      // steps a tile
constexpr int kLG = 16;      // steps a quarter: between the output reductions
constexpr int kLStages = 3;  // raw tiles in flight or staged

// Bm/Cm of states 2s, 2s + 1 at one step: (Bm word, Cm word) of bf16 pairs, or float4 (B, B, C, C).
template <typename T>
using BcPair = std::conditional_t<std::is_same_v<T, float>, float4, uint2>;

enum RawArray { kRawDelta, kRawU, kRawZ, kRawB, kRawC, kRawArrays };

template <typename T>
struct LongSmem {
  Bits<T> raw[kLStages][kRawArrays][kLT][16];  // tiles as loaded (cp.async), 16 channels/states
  float2 dt[2][kLT][kLCh];                     // (step size, step size * u)
  float2 gu[2][kLT][kLCh];                     // (gate, D * u * gate): out = y * gate + D*u*gate
  BcPair<T> bc[2][kLT][8];
};

struct LongBlock {
  int64_t b, g, d0, nvalid;
};

__device__ __forceinline__ LongBlock LocateLongBlock(const Params& p) {
  const int64_t per_g = CeilDivDev(p.dims_per_group, kLCh);
  LongBlock k;
  k.b = blockIdx.x / (p.groups * per_g);
  const int64_t rem = blockIdx.x % (p.groups * per_g);
  k.g = rem / per_g;
  const int64_t c0 = (rem % per_g) * kLCh;
  k.d0 = k.g * p.dims_per_group + c0;
  k.nvalid = min(static_cast<int64_t>(kLCh), p.dims_per_group - c0);
  return k;
}

// 16 bytes global -> shared without registers; zeros (and no read) where !ok.
__device__ __forceinline__ void CpAsync16(void* dst, const void* src, bool ok) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src),
               "r"(ok ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Starts copying the tile at tb into raw stage `st`: 16-byte pieces of the five arrays' rows
// (16 channels or states of a step), spread over the threads.
template <typename T>
__device__ __forceinline__ void CopyTile(const Params& p, const LongBlock& k, int64_t tb, int st,
                                         LongSmem<T>& s) {
  constexpr int kPer = 16 * int(sizeof(Bits<T>)) / 16;  // pieces a row: 2 bf16, 4 fp32
  constexpr int kElems = 16 / int(sizeof(Bits<T>));     // elements a piece
#pragma unroll
  for (int r = 0; r < kRawArrays * kPer * kLT / kLTh; ++r) {
    const int piece = r * kLTh + threadIdx.x;
    const int a = piece / (kPer * kLT), row = piece / kPer % kLT, e = piece % kPer * kElems;
    const int64_t t = tb + row;
    const bool tok = t < p.len;
    const void* src;
    bool ok;
    if (a == kRawB || a == kRawC) {
      const Strided4& m = a == kRawB ? p.Bm : p.Cm;
      src = static_cast<const Bits<T>*>(m.p) + (k.b * m.sb + t * m.sl + k.g * m.sg + e);
      ok = tok;
    } else {
      const Strided3& m = a == kRawDelta ? p.delta : a == kRawU ? p.u : p.z;
      src = static_cast<const Bits<T>*>(m.p) + (k.b * p.u.sb + t * p.u.sl + k.d0 + e);
      ok = tok && e < k.nvalid && m.p != nullptr;
    }
    CpAsync16(&s.raw[st][a][row][e], ok ? src : p.u.p, ok);
  }
}

// Prepares quarter q of the staged tile (stage st, starting at tb) into buffer nb: thread ->
// step 16 q + tid / 8 and channels 2j, 2j + 1 (j = tid % 8) for the step sizes and gates, state
// pair j for Bm/Cm. Steps past the end get step size 0, so that the state stands still.
template <typename T>
__device__ __forceinline__ void PrepQuarter(const Params& p, int64_t tb, int st, int q, int nb,
                                            const float (&bias)[2], const float (&dsk)[2],
                                            LongSmem<T>& s) {
  const int row = q * kLG + (threadIdx.x >> 3), j = threadIdx.x & 7;
  const bool tok = tb + row < p.len;
  float v[3][2];
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    const Bits<T>* src = &s.raw[st][a][row][2 * j];
    if constexpr (std::is_same_v<T, float>) {
      const float2 w = *reinterpret_cast<const float2*>(src);
      v[a][0] = w.x, v[a][1] = w.y;
    } else {
      const uint32_t w = *reinterpret_cast<const uint32_t*>(src);
      v[a][0] = __uint_as_float(w << 16), v[a][1] = __uint_as_float(w & 0xffff0000u);
    }
  }
  float dt[2], dtu[2], g[2], gu[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float dsp;
    dt[i] = FastStepSize<T>(v[kRawDelta][i] + bias[i], p.softplus, &dsp);
    dt[i] = tok ? dt[i] : 0.f;
    const float u = v[kRawU][i], z = v[kRawZ][i];
    dtu[i] = dt[i] * u;
    g[i] = p.z.p ? z * Sigmoid(z) : 1.f;
    gu[i] = dsk[i] * u * g[i];
  }
  reinterpret_cast<float4*>(s.dt[nb][row])[j] = make_float4(dt[0], dtu[0], dt[1], dtu[1]);
  reinterpret_cast<float4*>(s.gu[nb][row])[j] = make_float4(g[0], gu[0], g[1], gu[1]);
  if constexpr (std::is_same_v<T, float>) {
    const float2 b = *reinterpret_cast<const float2*>(&s.raw[st][kRawB][row][2 * j]);
    const float2 c = *reinterpret_cast<const float2*>(&s.raw[st][kRawC][row][2 * j]);
    s.bc[nb][row][j] = make_float4(b.x, b.y, c.x, c.y);
  } else {
    s.bc[nb][row][j] =
        make_uint2(*reinterpret_cast<const uint32_t*>(&s.raw[st][kRawB][row][2 * j]),
                   *reinterpret_cast<const uint32_t*>(&s.raw[st][kRawC][row][2 * j]));
  }
}

// Bm and Cm of this lane's two states at one step.
template <typename T>
__device__ __forceinline__ void Unpack(const BcPair<T>& w, float* b, float* c) {
  if constexpr (std::is_same_v<T, float>) {
    b[0] = w.x, b[1] = w.y, c[0] = w.z, c[1] = w.w;
  } else {
    b[0] = __uint_as_float(w.x << 16), b[1] = __uint_as_float(w.x & 0xffff0000u);
    c[0] = __uint_as_float(w.y << 16), c[1] = __uint_as_float(w.y & 0xffff0000u);
  }
}

// c ? a : b, as a PTX selp: written in C++, nvcc turned the reduction's selects between array
// elements into loads from a selected address, which put the array in local memory.
__device__ __forceinline__ float Select(int c, float a, float b) {
  float r;
  asm("{\n\t.reg .pred q;\n\tsetp.ne.s32 q, %3, 0;\n\tselp.f32 %0, %1, %2, q;\n\t}"
      : "=f"(r)
      : "f"(a), "f"(b), "r"(c));
  return r;
}

// One round of the reduce-scatter below: lanes s and s ^ kW swap halves of v[0, 4 kW) and add.
template <int kW>
__device__ __forceinline__ void ReduceHalves(float (&v)[kLG]) {
  const int upper = threadIdx.x & kW;
#pragma unroll
  for (int i = 0; i < 2 * kW; ++i) {
    const float send = Select(upper, v[i], v[i + 2 * kW]);
    const float keep = Select(upper, v[i + 2 * kW], v[i]);
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kW);
  }
}

// Sum over the 8 lanes of a channel of v[i], i in [0, 16), in a fixed order: lane s (tid & 7)
// gets the sums of steps 2s and 2s + 1 in v[0] and v[1]. Each round halves the vector: 14
// shuffles for 16 sums instead of 16 * 3.
__device__ __forceinline__ void ReduceScatter8(float (&v)[kLG]) {
  ReduceHalves<4>(v);
  ReduceHalves<2>(v);
  ReduceHalves<1>(v);
}

template <typename T>
__global__ void __launch_bounds__(kLTh, 1) LongRowForwardKernel(const Params p) {
  extern __shared__ float4 dyn[];
  LongSmem<T>& s = *reinterpret_cast<LongSmem<T>*>(dyn);
  const LongBlock k = LocateLongBlock(p);
  const int tid = threadIdx.x, c = tid >> 3, sp = tid & 7;
  const int64_t D = p.dim, L = p.len;
  // The scan: channel c of the block, states 2 sp and 2 sp + 1.
  const bool cok = c < k.nvalid;
  const int64_t d = k.d0 + (cok ? c : 0);
  float a2[2], h[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int64_t i = d * 16 + 2 * sp + j;
    a2[j] = cok ? p.A[i] * kLog2e : 0.f;
    h[j] = cok && p.h0 ? p.h0[k.b * D * 16 + i] : 0.f;
  }
  // The preparation: channels 2 (tid % 8) + [0, 2).
  float bias[2], dsk[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int cj = 2 * (tid & 7) + j;
    const bool ok = cj < k.nvalid;
    bias[j] = ok && p.dt_bias ? p.dt_bias[k.d0 + cj] : 0.f;
    dsk[j] = ok && p.D_skip ? p.D_skip[k.d0 + cj] : 0.f;
  }
  const int64_t obase = k.b * p.out.sb + d * p.out.sd;

  // Tiles 0..2 in flight; tile 0 prepared into buffer 0; tile 1 staged.
  for (int i = 0; i < kLStages; ++i) {
    CopyTile<T>(p, k, i * int64_t{kLT}, i, s);
    CpAsyncCommit();
  }
  CpAsyncWait<kLStages - 1>();
  __syncthreads();
  for (int q = 0; q < kLT / kLG; ++q) PrepQuarter<T>(p, 0, 0, q, 0, bias, dsk, s);
  CpAsyncWait<kLStages - 2>();
  __syncthreads();

  // The outputs of a quarter are summed over lanes and stored one quarter later, so that the
  // shuffles' latency overlaps the next quarter's scan (one warp a sub-partition has nothing else
  // to hide it behind).
  // Its gates are read with its scan: a quarter later the next tile's preparation may be
  // overwriting them.
  float y_prev[kLG] = {};
  float2 gu_prev[2] = {};
  int64_t prev_t = -1;  // first step of the pending quarter (-1: none)
  const auto finish = [&]() {
    ReduceScatter8(y_prev);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t t = prev_t + 2 * sp + i;
      if (cok && prev_t >= 0 && t < L) {
        St<T>(p.out.p, obase + t * p.out.sl, fmaf(y_prev[i], gu_prev[i].x, gu_prev[i].y));
      }
    }
  };
  int64_t tile = 0;
  for (int64_t tb = 0; tb < L; tb += kLT, ++tile) {
    const int cur = static_cast<int>(tile & 1), nst = static_cast<int>((tile + 1) % kLStages);
    // Tile + 3 into the stage tile's raw data left (prepared during the previous tile).
    CopyTile<T>(p, k, tb + kLStages * kLT, static_cast<int>(tile % kLStages), s);
    CpAsyncCommit();
#pragma unroll 1
    for (int q = 0; q < kLT / kLG; ++q) {
      // Quarter q of the next tile is prepared while this tile's quarter q is scanned.
      PrepQuarter<T>(p, tb + kLT, nst, q, cur ^ 1, bias, dsk, s);
      const float2* dt_row = &s.dt[cur][q * kLG][c];
      const BcPair<T>* bc_row = &s.bc[cur][q * kLG][sp];
      // Decays and inputs of the quarter's steps first (independent of the state), then the
      // recurrence.
      float e[kLG][2], x[kLG][2], cm[kLG][2];
#pragma unroll
      for (int i = 0; i < kLG; ++i) {
        const float2 dd = dt_row[i * kLCh];
        float bv[2];
        Unpack<T>(bc_row[i * 8], bv, cm[i]);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          e[i][j] = Ex2(dd.x * a2[j]);
          x[i][j] = dd.y * bv[j];
        }
      }
      finish();
      float y[kLG];
#pragma unroll
      for (int i = 0; i < kLG; ++i) {
        h[0] = fmaf(e[i][0], h[0], x[i][0]);
        h[1] = fmaf(e[i][1], h[1], x[i][1]);
        y[i] = fmaf(cm[i][1], h[1], cm[i][0] * h[0]);
      }
#pragma unroll
      for (int i = 0; i < kLG; ++i) y_prev[i] = y[i];
#pragma unroll
      for (int i = 0; i < 2; ++i) gu_prev[i] = s.gu[cur][q * kLG + 2 * sp + i][c];
      prev_t = tb + q * kLG;
    }
    CpAsyncWait<1>();  // tile + 2 has landed (tile + 3 may still fly)
    __syncthreads();
  }
  finish();
  if (cok && p.h_last) {
#pragma unroll
    for (int j = 0; j < 2; ++j) p.h_last[(k.b * D + d) * 16 + 2 * sp + j] = h[j];
  }
}

}  // namespace

int64_t LongRowBlocks(const Params& p) {
  return p.batch * p.groups * CeilDiv(p.dims_per_group, kLCh);
}

template <typename T>
void LaunchLongRowForward(const Params& p, cudaStream_t stream) {
  constexpr size_t kSmem = sizeof(LongSmem<T>);
  static const cudaError_t attr = cudaFuncSetAttribute(
      LongRowForwardKernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int{kSmem});
  (void)attr;  // a failure shows as the launch's error
  LongRowForwardKernel<T><<<LongRowBlocks(p), kLTh, kSmem, stream>>>(p);
}

template void LaunchLongRowForward<float>(const Params&, cudaStream_t);
template void LaunchLongRowForward<__nv_bfloat16>(const Params&, cudaStream_t);

}  // namespace mamba::kernels::cuda
