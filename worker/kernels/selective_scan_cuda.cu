// Host side of the CUDA selective scan: work split, workspace, launches (each in an NVTX range).
#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "profiling/nvtx.h"
#include "worker/kernels/selective_scan_cuda.h"
#include "worker/kernels/selective_scan_cuda_kernels.h"

namespace mamba::kernels::cuda {
namespace {

using profiling::ScopedRange;

// Bm/Cm rows load in 16-byte pieces when n-contiguous, aligned and N is a multiple of 16.
bool Vectorizable(const Strided4& t, int64_t N, DType dtype) {
  const int64_t per16 = dtype == DType::kF32 ? 4 : 8;
  return t.sn == 1 && N % kNT == 0 && t.sb % per16 == 0 && t.sl % per16 == 0 && t.sg % per16 == 0 &&
         reinterpret_cast<uintptr_t>(t.p) % 16 == 0;
}

Params MakeParams(const ScanProblem& s, int threads_per_block) {
  Params p;
  static_cast<ScanProblem&>(p) = s;
  p.dims_per_group = s.dim / s.groups;
  p.chan_warps = CeilDiv(p.dims_per_group, 32);
  p.chan_blocks = CeilDiv(s.batch * s.groups * p.chan_warps * 32, threads_per_block);
  p.n_slices = static_cast<int>(CeilDiv(s.dstate, kNT));
  return p;
}

// Scratch carved into pieces: from the caller's allocator (ScanScratch) or stream-ordered
// cudaMallocAsync, released when it goes out of scope (after the launches are enqueued).
class Workspace {
 public:
  Workspace(cudaStream_t stream, const ScanScratch* scratch)
      : stream_(stream), scratch_(scratch && scratch->allocate ? scratch : nullptr) {}
  ~Workspace() {
    if (base_ && !scratch_) cudaFreeAsync(base_, stream_);
  }
  // Reserve `n` floats; pointers are valid after Allocate().
  void Reserve(float** slot, int64_t n) {
    slots_[count_] = slot;
    offsets_[count_++] = total_;
    total_ += CeilDiv(std::max<int64_t>(n, 1), 64) * 64;  // 256-byte aligned pieces
  }
  cudaError_t Allocate() {
    if (total_ == 0) return cudaSuccess;
    const size_t bytes = total_ * sizeof(float);
    if (scratch_) {
      held_ = scratch_->allocate(bytes);
      if (!held_) return cudaErrorMemoryAllocation;
      base_ = static_cast<float*>(held_.get());
    } else {
      static const bool pool_kept = [] {
        // Keep freed blocks in the pool: the scan allocates the same sizes call after call.
        int dev = 0;
        cudaMemPool_t pool;
        if (cudaGetDevice(&dev) == cudaSuccess &&
            cudaDeviceGetDefaultMemPool(&pool, dev) == cudaSuccess) {
          uint64_t keep = UINT64_MAX;
          cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
        }
        return true;
      }();
      (void)pool_kept;
      if (cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&base_), bytes, stream_);
          err != cudaSuccess) {
        return err;
      }
    }
    for (int i = 0; i < count_; ++i) *slots_[i] = base_ + offsets_[i];
    return cudaSuccess;
  }

 private:
  cudaStream_t stream_;
  const ScanScratch* scratch_;
  std::shared_ptr<void> held_;
  float* base_ = nullptr;
  float** slots_[16] = {};
  int64_t offsets_[16] = {};
  int count_ = 0;
  int64_t total_ = 0;
};

int SmCount() {
  static const int sms = [] {
    int dev = 0, n = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    return n > 0 ? n : 132;
  }();
  return sms;
}

template <typename T, bool kVec>
cudaError_t ForwardTyped(Params& p, cudaStream_t stream, const ScanTuning& tuning) {
  // Split L until enough threads run: a split costs one extra pass over u, delta and Bm.
  const int64_t chains = p.batch * p.groups * p.chan_warps * 32 * p.n_slices;
  const int64_t want = tuning.fwd_min_threads > 0 ? tuning.fwd_min_threads : SmCount() * 1024LL;
  int64_t segs = chains >= want ? 1 : CeilDiv(want, chains);
  segs = std::clamp<int64_t>(segs, 1, CeilDiv(p.len, 64));
  p.seg_len = CeilDiv(p.len, segs);
  p.num_seg = CeilDiv(p.len, p.seg_len);

  Workspace ws(stream, p.scratch);
  const int64_t rows = p.batch * p.dim * p.num_seg;
  if (p.num_seg > 1) {
    ws.Reserve(&p.ws_s, rows * p.dstate);
    ws.Reserve(&p.ws_hin, rows * p.dstate);
    ws.Reserve(&p.ws_sum, rows);
  }
  if (p.n_slices > 1) ws.Reserve(&p.ws_yacc, p.batch * p.len * p.dim);
  if (cudaError_t err = ws.Allocate(); err != cudaSuccess) return err;

  if (p.num_seg > 1) {
    {
      ScopedRange range("scan_fwd_segments");
      LaunchSegments<T, kVec>(p, false, p.num_seg - 1, stream);
    }
    ScopedRange range("scan_fwd_compose");
    LaunchCompose(p, false, stream);
  }
  {
    ScopedRange range("scan_fwd");
    LaunchForwardMain<T, kVec>(p, stream);
  }
  return cudaGetLastError();
}

template <typename T, bool kVec>
cudaError_t BackwardTyped(Params& p, cudaStream_t stream) {
  p.seg_len = kBwdSeg;
  p.num_seg = CeilDiv(p.len, kBwdSeg);
  const int64_t rows = p.batch * p.dim * p.num_seg;
  Workspace ws(stream, p.scratch);
  if (p.num_seg > 1) {
    ws.Reserve(&p.ws_s, rows * p.dstate);
    ws.Reserve(&p.ws_r, rows * p.dstate);
    ws.Reserve(&p.ws_hin, rows * p.dstate);
    ws.Reserve(&p.ws_gin, rows * p.dstate);
    ws.Reserve(&p.ws_sum, rows);
  }
  if (p.n_slices > 1) {
    const int64_t acts = p.batch * p.len * p.dim;
    ws.Reserve(&p.ws_yacc, acts);
    ws.Reserve(&p.ws_duacc, acts);
    ws.Reserve(&p.ws_ddtacc, acts);
  }
  ws.Reserve(&p.ws_dA, rows * p.dstate);
  ws.Reserve(&p.ws_dD, rows);
  ws.Reserve(&p.ws_dbias, rows);
  const int64_t bc_count = p.batch * p.len * p.groups * 2 * p.dstate;
  ws.Reserve(&p.ws_dbc, p.chan_warps * bc_count);
  if (cudaError_t err = ws.Allocate(); err != cudaSuccess) return err;

  if (p.num_seg > 1) {
    {
      ScopedRange range("scan_bwd_segments");
      LaunchSegments<T, kVec>(p, true, p.num_seg, stream);
    }
    ScopedRange range("scan_bwd_compose");
    LaunchCompose(p, true, stream);
  }
  // The channel-block count above was for kFwdThreads; the backward uses smaller blocks.
  Params pb = p;
  pb.chan_blocks = CeilDiv(p.batch * p.groups * p.chan_warps * 32, kBwdThreads);
  {
    ScopedRange range("scan_bwd");
    if (cudaError_t err = LaunchBackwardMain<T, kVec>(pb, stream); err != cudaSuccess) return err;
  }
  ScopedRange range("scan_bwd_reduce");
  LaunchSumGradParts(p, p.batch * p.num_seg, stream);
  LaunchReduceBC<T>(p, stream);
  return cudaGetLastError();
}

// The tiled kernels' blocks: 32 channels of one (batch, group) each, chan_blocks a segment.
void SetTiledBlocks(Params& p) {
  p.chan_warps = CeilDiv(p.dims_per_group, 32);  // channel blocks per group
  p.chan_blocks = p.batch * p.groups * p.chan_warps;
  p.div_chan_blocks = FastDiv(static_cast<uint32_t>(p.chan_blocks));
  p.div_group_blocks = FastDiv(static_cast<uint32_t>(p.groups * p.chan_warps));
  p.div_chan_warps = FastDiv(static_cast<uint32_t>(p.chan_warps));
}

// The forward's segment length, given the count the thread target asked for (s0). The pre-pass
// runs chan_blocks blocks for each segment but the last, the main pass for every segment, all of
// one length but the last. A length whose full-length blocks fill whole waves of both kernels
// (the last segment short) leaves no SM idle at their ends: H100, (1,1536,65536) at 67 segments
// (66 x 48 blocks: 4 waves of the pre-pass at 6 an SM, 3 of the main pass at 8) instead of 44
// (2.6 and 2 waves): bf16 -1 %, fp32 -1.7 %. But more, shorter segments cost too ((2,512,32768)
// at 94 instead of 64 segments +2.5 %, (1,512,16384) at 256 instead of 128 +20 %), so a length is
// taken only where it leaves almost no slot idle and the s0 length leaves many, with segments of
// at least 16 tiles and at most 1.6 s0 of them (bench/RESULTS.md, session 6).
template <typename T>
int64_t WholeWaveSegLen(const Params& p, const FwdShape& shape, int64_t tile, int64_t s0) {
  const int64_t seg0 = CeilDiv(CeilDiv(p.len, s0), tile) * tile;
  int pre = 0, main = 0;
  LaunchTiledPre<T>(p, false, 0, shape, nullptr, &pre);
  LaunchTiledForward<T>(p, shape, nullptr, &main);
  if (pre <= 0 || main <= 0) return seg0;
  // Share of the two kernels' block slots left idle over their waves.
  const auto waste = [&](int64_t len) {
    const auto idle = [](int64_t blocks, int64_t per_wave) {
      const int64_t slots = CeilDiv(blocks, per_wave) * per_wave;
      return blocks > 0 ? static_cast<double>(slots - blocks) / slots : 0.0;
    };
    const int64_t segs = CeilDiv(p.len, len), last = p.len - (segs - 1) * len;
    const int64_t full = (segs - 1) * p.chan_blocks;
    return idle(full, pre * int64_t{SmCount()}) +
           idle(full + (2 * last > len ? p.chan_blocks : 0), main * int64_t{SmCount()});
  };
  int64_t best = seg0;
  double best_waste = waste(seg0);
  const double waste0 = best_waste;
  const int64_t lo = std::max(CeilDiv(CeilDiv(p.len * 5, s0 * 8), tile) * tile, 16 * tile);
  for (int64_t len = seg0 - tile; len >= lo; len -= tile) {  // the longest of equals
    if (const double w = waste(len); w < best_waste - 1e-9) best = len, best_waste = w;
  }
  return best_waste <= 0.05 && waste0 - best_waste >= 0.1 ? best : seg0;
}

// Tiled path (N == 16). Forward: split L only until enough threads run.
template <typename T>
cudaError_t TiledForwardTyped(Params& p, cudaStream_t stream, const ScanTuning& tuning) {
  const int64_t tile = TiledForwardTile();
  SetTiledBlocks(p);
  // Lanes per channel (2, 4 or 8) and channels per thread of the main pass (1 or 2, at 4 lanes);
  // MAMBA_SCAN_FWD_LANES and MAMBA_SCAN_FWD_CHANS set the defaults, so that the tests can cover
  // each variant.
  static const FwdShape env = [] {
    FwdShape f{0, 0};
    if (const char* e = std::getenv("MAMBA_SCAN_FWD_LANES")) f.lanes = std::atoi(e);
    if (const char* e = std::getenv("MAMBA_SCAN_FWD_CHANS")) f.chans = std::atoi(e);
    return f;
  }();
  FwdShape shape;
  shape.lanes = tuning.fwd_lanes > 0 ? tuning.fwd_lanes : env.lanes > 0 ? env.lanes : 4;
  if (shape.lanes != 2 && shape.lanes != 8) shape.lanes = 4;
  const int64_t threads = p.chan_blocks * 32 * shape.lanes;
  // Measured on H100: a split costs a second exponential pass, which only pays off when fewer
  // than ~128 threads per SM run (B = 1 rows); then split to ~2048 per SM.
  const int64_t want = tuning.fwd_min_threads > 0 ? tuning.fwd_min_threads : SmCount() * 2048LL;
  const int64_t enough = tuning.fwd_min_threads > 0 ? want : SmCount() * 128LL;
  int64_t segs = threads >= enough ? 1 : CeilDiv(want, threads);
  segs = std::clamp<int64_t>(segs, 1, CeilDiv(p.len, tile));
  p.seg_len = CeilDiv(CeilDiv(p.len, segs), tile) * tile;
  p.num_seg = CeilDiv(p.len, p.seg_len);
  // Two channels a thread halve the main pass's blocks (64 threads, 8 an SM): on H100 they made
  // the bf16 forward of (16,2048,4096) and (1,1536,65536) 8-11 % faster and, with fewer than
  // ~3 blocks an SM, (8,1536,2048) and (2,5120,8192) 25 % slower (bench/RESULTS.md, session 5).
  const int tuned_chans = tuning.fwd_chans > 0 ? tuning.fwd_chans : env.chans;
  const bool fills = p.chan_blocks * p.num_seg >= 6LL * SmCount();
  shape.chans = shape.lanes == 4 && (tuned_chans > 0 ? tuned_chans == 2 : fills) ? 2 : 1;
  if (p.num_seg > 1 && tuning.fwd_min_threads == 0) {
    p.seg_len = WholeWaveSegLen<T>(p, shape, tile, segs);
    p.num_seg = CeilDiv(p.len, p.seg_len);
  }
  Workspace ws(stream, p.scratch);
  const int64_t rows = p.batch * p.dim * p.num_seg;
  float* dt16 = nullptr;
  if (p.num_seg > 1) {
    ws.Reserve(&p.ws_s, rows * 16);
    ws.Reserve(&p.ws_hin, rows * 16);
    ws.Reserve(&p.ws_sum, rows);
    if (TiledForwardHandsStepSizes<T>(p, shape)) {
      ws.Reserve(&dt16, CeilDiv(p.batch * p.len * p.dim, 2));
    }
  }
  if (cudaError_t err = ws.Allocate(); err != cudaSuccess) return err;
  p.ws_dt16 = reinterpret_cast<unsigned short*>(dt16);
  if (p.num_seg > 1) {
    {
      ScopedRange range("scan_fwd_segments");
      LaunchTiledPre<T>(p, false, p.num_seg - 1, shape, stream);
    }
    ScopedRange range("scan_fwd_compose");
    LaunchCompose(p, false, stream);
  }
  {
    ScopedRange range("scan_fwd");
    LaunchTiledForward<T>(p, shape, stream);
  }
  return cudaGetLastError();
}

// Backward: segments of whole tiles; as few segments as keep the per-segment scratch (four
// B*D*16*segments arrays) under a cap, since each segment boundary costs scratch traffic.
template <typename T>
cudaError_t TiledBackwardTyped(Params& p, cudaStream_t stream, const ScanTuning& tuning) {
  const int64_t tile = TiledBackwardTile();
  SetTiledBlocks(p);
  // Segments of k tiles; checkpoints come from the pre-pass, so k costs no shared memory. H100,
  // v5 (ms at (8,1536,2048) / (1,1536,65536) fp32): k 4/8/16/32 -> 1.21/1.13/1.13/1.13 and
  // 5.42/4.68/4.41/4.29. Scratch: 4 arrays of B*D*16*segments floats plus the checkpoints,
  // B*D*L*(k-1)/k floats.
  int64_t k = 32;
  if (tuning.bwd_tiles > 0) k = tuning.bwd_tiles;
  k = std::clamp<int64_t>(k, 1, 64);
  p.seg_len = k * tile;
  p.num_seg = CeilDiv(p.len, p.seg_len);
  const int64_t rows = p.batch * p.dim * p.num_seg;
  // The pre-pass also leaves the checkpoints at tile starts, so it runs whenever a segment has
  // more than one tile, even with one segment.
  const bool pre = p.num_seg > 1 || p.len > tile;
  Workspace ws(stream, p.scratch);
  if (pre) {
    ws.Reserve(&p.ws_s, rows * 16);
    ws.Reserve(&p.ws_r, rows * 16);
    ws.Reserve(&p.ws_sum, rows);
    ws.Reserve(&p.ws_ck, rows * (k - 1) * 16);
    ws.Reserve(&p.ws_cks, rows * (k - 1));
  }
  if (p.num_seg > 1) {
    ws.Reserve(&p.ws_hin, rows * 16);
    ws.Reserve(&p.ws_gin, rows * 16);
  }
  ws.Reserve(&p.ws_dA, rows * 16);
  ws.Reserve(&p.ws_dD, rows);
  ws.Reserve(&p.ws_dbias, rows);
  if (p.chan_warps > 1) ws.Reserve(&p.ws_dbc, p.chan_warps * p.batch * p.len * p.groups * 32);
  if (cudaError_t err = ws.Allocate(); err != cudaSuccess) return err;
  if (pre) {
    ScopedRange range("scan_bwd_segments");
    LaunchTiledPre<T>(p, true, p.num_seg, FwdShape{}, stream);
  }
  if (p.num_seg > 1) {
    ScopedRange range("scan_bwd_compose");
    LaunchCompose(p, true, stream);
  }
  {
    ScopedRange range("scan_bwd");
    if (cudaError_t err = LaunchTiledBackward<T>(p, stream); err != cudaSuccess) return err;
  }
  ScopedRange range("scan_bwd_reduce");
  LaunchTiledBackwardReduce<T>(p, stream);
  return cudaGetLastError();
}

template <bool kBwd>
cudaError_t Dispatch(const ScanProblem& s, cudaStream_t stream, const ScanTuning& tuning,
                     const ScanScratch& scratch) {
  Params p = MakeParams(s, kFwdThreads);
  p.scratch = &scratch;
  if (s.dstate == 16 && !tuning.force_v2) {
    if (s.dtype == DType::kF32) {
      return kBwd ? TiledBackwardTyped<float>(p, stream, tuning)
                  : TiledForwardTyped<float>(p, stream, tuning);
    }
    return kBwd ? TiledBackwardTyped<__nv_bfloat16>(p, stream, tuning)
                : TiledForwardTyped<__nv_bfloat16>(p, stream, tuning);
  }
  const bool vec = Vectorizable(s.Bm, s.dstate, s.dtype) && Vectorizable(s.Cm, s.dstate, s.dtype);
#define MAMBA_CALL(T, V) \
  return kBwd ? BackwardTyped<T, V>(p, stream) : ForwardTyped<T, V>(p, stream, tuning)
  if (s.dtype == DType::kF32) {
    if (vec) MAMBA_CALL(float, true);
    MAMBA_CALL(float, false);
  }
  if (vec) MAMBA_CALL(__nv_bfloat16, true);
  MAMBA_CALL(__nv_bfloat16, false);
#undef MAMBA_CALL
}

}  // namespace

cudaError_t LaunchScanForward(const ScanProblem& p, cudaStream_t stream, const ScanTuning& tuning,
                              const ScanScratch& scratch) {
  ScopedRange range("selective_scan_fwd");
  return Dispatch<false>(p, stream, tuning, scratch);
}

cudaError_t LaunchScanBackward(const ScanProblem& p, cudaStream_t stream, const ScanTuning& tuning,
                               const ScanScratch& scratch) {
  ScopedRange range("selective_scan_bwd");
  return Dispatch<true>(p, stream, tuning, scratch);
}

}  // namespace mamba::kernels::cuda
