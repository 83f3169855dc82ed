// Backward kernel of the selective scan and the fixed-order reductions of its partial sums.
//
// Per thread: a segment of kBwdR tiles of kBwdK steps. A forward sweep from the segment's
// entering state stores a checkpoint at each tile start (shared memory); then, tile by tile from
// the last, the tile's states are recomputed into shared memory and walked backwards with the
// state gradient g, which enters at the segment's end (from the composition kernel).
#include "worker/kernels/selective_scan_cuda_kernels.h"

namespace mamba::kernels::cuda {

template <typename T, bool kVec>
__global__ void __launch_bounds__(kBwdThreads) ScanBackwardKernel(const Params p) {
  extern __shared__ float smem[];
  Chan c;
  if (!Locate(p, &c)) return;  // whole warps: the shuffles below need every lane
  const int tid = threadIdx.x, nthr = blockDim.x;
  // Slot-major, thread-minor: a warp's accesses hit 32 consecutive words.
  float* hist = smem + tid;                       // hist[(k * kNT + j) * nthr]
  float* ckpt = smem + kBwdK * kNT * nthr + tid;  // ckpt[(r * kNT + j) * nthr]
  const int64_t t0 = c.seg * kBwdSeg, t1 = min(p.len, t0 + kBwdSeg);
  const int N = p.dstate;
  const int64_t D = p.dim, L = p.len;
  const Offsets o(p, c);
  const int64_t du_o = c.b * p.du.sb + c.d * p.du.sd;
  const int64_t ddl_o = c.b * p.ddelta.sb + c.d * p.ddelta.sd;
  const int64_t dz_o = c.b * p.dz.sb + c.d * p.dz.sd;
  const float bias = p.dt_bias ? p.dt_bias[c.d] : 0.f;
  const float dsk = p.D_skip ? p.D_skip[c.d] : 0.f;
  const int64_t row = (c.b * D + c.d) * p.num_seg + c.seg;
  const int64_t acc = c.b * L * D + c.d;
  const int lane = threadIdx.x & 31;
  // dbc partial of this warp at step t: [cw][b][t][g][kind][n], lane -> (kind, n).
  const int64_t dbc_o = (((c.cw * p.batch + c.b) * L) * p.groups + c.g) * 2 * N;
  const int64_t dbc_t = p.groups * 2 * N;
  float dD_acc = 0.f, dbias_acc = 0.f;

  for (int ns = 0; ns < p.n_slices; ++ns) {
    const int n0 = ns * kNT;
    const bool first = ns == 0, last = ns + 1 == p.n_slices;
    float A[kNT], a2[kNT], h[kNT], g[kNT], dA[kNT];
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const int n = n0 + j;
      const bool ok = n < N;
      A[j] = ok ? p.A[c.d * N + n] : 0.f;
      a2[j] = A[j] * kLog2e;
      h[j] = !ok         ? 0.f
             : c.seg > 0 ? p.ws_hin[row * N + n]
             : p.h0      ? p.h0[(c.b * D + c.d) * N + n]
                         : 0.f;
      g[j] = !ok                     ? 0.f
             : c.seg + 1 < p.num_seg ? p.ws_gin[row * N + n]
             : p.dh_last             ? p.dh_last[(c.b * D + c.d) * N + n]
                                     : 0.f;
      dA[j] = 0.f;
    }
    // Forward sweep: checkpoints at tile starts.
    for (int r = 0; r < kBwdR; ++r) {
      const int64_t tb = t0 + r * kBwdK;
      if (tb >= t1) break;
#pragma unroll
      for (int j = 0; j < kNT; ++j) ckpt[(r * kNT + j) * nthr] = h[j];
      const int64_t te = min(t1, tb + kBwdK);
      StepIn cur, nxt;
      LoadStep<T, kVec, false, false, false>(p, o, n0, tb, cur);
      for (int64_t t = tb; t < te; ++t) {
        if (t + 1 < te) LoadStep<T, kVec, false, false, false>(p, o, n0, t + 1, nxt);
        float dsp;
        const float dt = StepSize(cur.draw + bias, p.softplus, &dsp);
        const float dtu = dt * cur.u;
#pragma unroll
        for (int j = 0; j < kNT; ++j) h[j] = fmaf(Ex2(dt * a2[j]), h[j], dtu * cur.bv[j]);
        cur = nxt;
      }
    }
    // Tiles from the last: recompute the tile's states, then walk it backwards.
    for (int r = kBwdR - 1; r >= 0; --r) {
      const int64_t tb = t0 + r * kBwdK;
      if (tb >= t1) continue;
      const int tn = static_cast<int>(min(static_cast<int64_t>(kBwdK), t1 - tb));
#pragma unroll
      for (int j = 0; j < kNT; ++j) h[j] = ckpt[(r * kNT + j) * nthr];
      {
        StepIn cur, nxt;
        LoadStep<T, kVec, false, false, false>(p, o, n0, tb, cur);
        for (int k = 0; k < tn; ++k) {
          if (k + 1 < tn) LoadStep<T, kVec, false, false, false>(p, o, n0, tb + k + 1, nxt);
          float dsp;
          const float dt = StepSize(cur.draw + bias, p.softplus, &dsp);
          const float dtu = dt * cur.u;
#pragma unroll
          for (int j = 0; j < kNT; ++j) {
            hist[(k * kNT + j) * nthr] = h[j];
            h[j] = fmaf(Ex2(dt * a2[j]), h[j], dtu * cur.bv[j]);
          }
          cur = nxt;
        }
      }
      StepIn cur, nxt;
      LoadStep<T, kVec, true, true, true>(p, o, n0, tb + tn - 1, cur);
      for (int k = tn - 1; k >= 0; --k) {
        const int64_t t = tb + k;
        if (k > 0) LoadStep<T, kVec, true, true, true>(p, o, n0, t - 1, nxt);
        float dsp;
        const float dt = StepSize(cur.draw + bias, p.softplus, &dsp);
        const float u = cur.u;
        const float dout = cur.dout;
        float zz = 0.f, sg = 0.f, dy = dout;
        if (p.z.p) {
          zz = cur.z;
          sg = 1.f / (1.f + expf(-zz));
          dy = dout * zz * sg;
        }
        float bv[kNT], cv[kNT];
#pragma unroll
        for (int j = 0; j < kNT; ++j) bv[j] = cur.bv[j], cv[j] = cur.cv[j];
        cur = nxt;
        const float dtu = dt * u;
        float y = 0.f, ddt = 0.f, dub = 0.f;
        float v[2 * kNT];  // dBm (j) and dCm (kNT + j) contributions of this channel
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          const float hp = hist[(k * kNT + j) * nthr];
          const float e = Ex2(dt * a2[j]);
          const float hc = fmaf(e, hp, dtu * bv[j]);
          y = fmaf(cv[j], hc, y);
          g[j] = fmaf(cv[j], dy, g[j]);
          v[kNT + j] = c.active ? hc * dy : 0.f;
          v[j] = c.active ? g[j] * dtu : 0.f;
          const float geh = g[j] * e * hp;
          ddt = fmaf(geh, A[j], fmaf(g[j], bv[j] * u, ddt));
          dA[j] = fmaf(geh, dt, dA[j]);
          dub = fmaf(g[j], bv[j], dub);
          g[j] *= e;
        }
        const float part = ReduceScatter32(v);
        const int n = n0 + (lane & (kNT - 1));
        if (n < N) p.ws_dbc[dbc_o + t * dbc_t + (lane >> 4) * N + n] = part;
        if (!c.active) continue;
        float du = dub * dt;
        if (!first) {
          y += p.ws_yacc[acc + t * D];
          du += p.ws_duacc[acc + t * D];
          ddt += p.ws_ddtacc[acc + t * D];
        }
        if (!last) {
          p.ws_yacc[acc + t * D] = y;
          p.ws_duacc[acc + t * D] = du;
          p.ws_ddtacc[acc + t * D] = ddt;
          continue;
        }
        du = fmaf(dsk, dy, du);
        const float ddelta = ddt * dsp;
        St<T>(p.du.p, du_o + t * p.du.sl, du);
        St<T>(p.ddelta.p, ddl_o + t * p.ddelta.sl, ddelta);
        if (p.z.p && p.dz.p) {
          y = fmaf(dsk, u, y);
          St<T>(p.dz.p, dz_o + t * p.dz.sl, dout * y * sg * (1.f + zz * (1.f - sg)));
        }
        dD_acc = fmaf(dy, u, dD_acc);
        dbias_acc += ddelta;
      }
    }
    if (c.active) {
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const int n = n0 + j;
        if (n >= N) continue;
        p.ws_dA[((c.b * p.num_seg + c.seg) * D + c.d) * N + n] = dA[j];
        if (c.seg == 0 && p.dh0) p.dh0[(c.b * D + c.d) * N + n] = g[j];
      }
    }
  }
  if (c.active) {
    const int64_t i = (c.b * p.num_seg + c.seg) * D + c.d;
    p.ws_dD[i] = dD_acc;
    p.ws_dbias[i] = dbias_acc;
  }
}

__global__ void SumGradPartsKernel(const Params p, int64_t parts, int64_t na) {
  SumGradPart(p, parts, na, blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x);
}

template <typename T>
__global__ void ReduceBCKernel(const Params p) {
  const int64_t N = p.dstate, G = p.groups, L = p.len;
  const int64_t count = p.batch * L * G * 2 * N;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= count) return;
  const float s = SumInOrder(p.ws_dbc + i, p.chan_warps, count);
  const int64_t n = i % N, kind = (i / N) % 2, g = (i / (2 * N)) % G, t = (i / (2 * N * G)) % L;
  const int64_t b = i / (2 * N * G * L);
  const Strided4& o = kind == 0 ? p.dBm : p.dCm;
  St<T>(o.p, b * o.sb + t * o.sl + g * o.sg + n * o.sn, s);
}

template <typename T, bool kVec>
cudaError_t LaunchBackwardMain(const Params& p, cudaStream_t stream) {
  const size_t smem = (kBwdK + kBwdR) * kNT * kBwdThreads * sizeof(float);
  static const cudaError_t attr =
      cudaFuncSetAttribute(ScanBackwardKernel<T, kVec>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem));
  if (attr != cudaSuccess) return attr;
  ScanBackwardKernel<T, kVec><<<p.chan_blocks * p.num_seg, kBwdThreads, smem, stream>>>(p);
  return cudaSuccess;
}

void LaunchSumGradParts(const Params& p, int64_t parts, cudaStream_t stream) {
  const int64_t na = p.dim * p.dstate, total = na + 2 * p.dim;
  SumGradPartsKernel<<<CeilDiv(total, 256), 256, 0, stream>>>(p, parts, na);
}

template <typename T>
void LaunchReduceBC(const Params& p, cudaStream_t stream) {
  const int64_t count = p.batch * p.len * p.groups * 2 * p.dstate;
  ReduceBCKernel<T><<<CeilDiv(count, 256), 256, 0, stream>>>(p);
}

template cudaError_t LaunchBackwardMain<float, false>(const Params&, cudaStream_t);
template cudaError_t LaunchBackwardMain<float, true>(const Params&, cudaStream_t);
template cudaError_t LaunchBackwardMain<__nv_bfloat16, false>(const Params&, cudaStream_t);
template cudaError_t LaunchBackwardMain<__nv_bfloat16, true>(const Params&, cudaStream_t);
template void LaunchReduceBC<float>(const Params&, cudaStream_t);
template void LaunchReduceBC<__nv_bfloat16>(const Params&, cudaStream_t);

}  // namespace mamba::kernels::cuda
