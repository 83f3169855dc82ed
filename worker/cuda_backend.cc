// The CUDA backend: tensors in device memory, every op on one stream the backend owns. Parameters,
// the residual stream and the scan state are float32; activations may be float32 or bfloat16
// (computed in float inside the kernels; see backend.h). Each op checks shapes, devices and
// dtypes, opens an NVTX range in the "mamba" domain and launches the kernels of
// worker/kernels/<op>.cu; CUDA and cuBLAS failures abort naming the op (they are programming or
// environment errors, not user input). Ops are asynchronous except those that return host values
// or read host memory (FromHost, ToHost, CopyFromHost, CrossEntropy, TakeCrossEntropyStats,
// SumSquares, Synchronize), which synchronize the stream and then also check the device error
// word that kernels set on invalid ids or targets.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "profiling/nvtx.h"
#include "worker/backend.h"
#include "worker/check.h"
#include "worker/kernels/adamw.h"
#include "worker/kernels/conv1d.h"
#include "worker/kernels/convert.h"
#include "worker/kernels/cross_entropy.h"
#include "worker/kernels/cuda_check.h"
#include "worker/kernels/elementwise.h"
#include "worker/kernels/embedding.h"
#include "worker/kernels/linear.h"
#include "worker/kernels/rmsnorm.h"
#include "worker/kernels/selective_scan_cuda.h"
#include "worker/kernels/silu.h"

namespace mamba {
namespace {

using profiling::ScopedRange;

// Small results that come back to the host at synchronization points.
struct DeviceScalars {
  int error_bits;
  double sum_squares;
  kernels::CrossEntropyDeviceStats cross_entropy;
  kernels::CrossEntropyDeviceStats cross_entropy_total;  // AccumulateCrossEntropy's running sum
};

// A caching allocator: freed blocks go to a free list of their (rounded) size and are handed out
// again, so a training step that repeats the same shapes allocates nothing after the first step
// (cudaMalloc/cudaFree synchronize the device and cost far more than the small kernels). Reuse
// is safe because every kernel runs on the backend's one stream: work on a reused block is
// enqueued after the work of its previous owner. ReserveWorkspace turns the free blocks into one
// allocation (the step's workspace) carved into the same blocks.
class CachingAllocator {
 public:
  std::shared_ptr<void> Allocate(size_t bytes) {
    // Never zero bytes: a null buffer would read as an undefined tensor.
    const size_t granule = bytes < (1 << 20) ? 512 : (2 << 20);
    const size_t size = (std::max<size_t>(bytes, 1) + granule - 1) / granule * granule;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto& list = free_[size];
      if (!list.empty()) {
        p = list.back();
        list.pop_back();
      }
    }
    if (p == nullptr) p = DeviceMalloc(size);
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.in_use += size;
      stats_.peak_in_use = std::max(stats_.peak_in_use, stats_.in_use);
    }
    return std::shared_ptr<void>(p, [this, size](void* q) {
      std::lock_guard<std::mutex> lock(mu_);
      free_[size].push_back(q);
      stats_.in_use -= size;
    });
  }

  // Frees the free blocks that are allocations of their own and allocates them again as one
  // block, carved the same way (sizes are multiples of 512 bytes, so alignment holds).
  size_t ReserveWorkspace() {
    MAMBA_CUDA_CHECK("workspace", cudaDeviceSynchronize());
    std::lock_guard<std::mutex> lock(mu_);
    const std::vector<std::pair<size_t, size_t>> carve = FreeOwnBlocksLocked();
    size_t total = 0;
    for (const auto& [size, count] : carve) total += size * count;
    if (total == 0) return size_t{0};
    void* base = nullptr;
    if (cudaMalloc(&base, total) != cudaSuccess) {
      cudaGetLastError();
      throw DeviceOutOfMemory("out of GPU memory: the " + Gib(total) +
                              " GiB workspace cannot be had in one piece; " + FreeMemory());
    }
    ++stats_.device_allocations;
    stats_.reserved += total;
    stats_.workspace += total;
    Arena arena{base, total, {}};
    char* next = static_cast<char*>(base);
    for (const auto& [size, count] : carve) {
      for (size_t i = 0; i < count; ++i, next += size) {
        free_[size].push_back(next);
        arena.blocks.push_back({next, size});
      }
    }
    arenas_.push_back(std::move(arena));
    return total;
  }

  // Frees the free blocks that are allocations of their own, and the workspaces none of whose
  // blocks is in use.
  void ReleaseCached() {
    cudaDeviceSynchronize();
    std::lock_guard<std::mutex> lock(mu_);
    FreeOwnBlocksLocked();
    std::unordered_set<void*> free_blocks;
    for (const auto& [size, list] : free_) free_blocks.insert(list.begin(), list.end());
    for (auto a = arenas_.begin(); a != arenas_.end();) {
      const bool idle = std::all_of(a->blocks.begin(), a->blocks.end(),
                                    [&](const auto& b) { return free_blocks.count(b.first) > 0; });
      if (!idle) {
        ++a;
        continue;
      }
      for (const auto& [block, size] : a->blocks) {
        auto& list = free_[size];
        list.erase(std::find(list.begin(), list.end(), block));
      }
      cudaFree(a->base);
      stats_.reserved -= a->bytes;
      stats_.workspace -= a->bytes;
      a = arenas_.erase(a);
    }
  }

  DeviceMemoryStats Stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }
  void ResetPeak() {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.peak_in_use = stats_.in_use;
  }

 private:
  static std::string Gib(size_t bytes) {
    char s[32];
    std::snprintf(s, sizeof(s), "%.2f", double(bytes) / (1 << 30));
    return s;
  }
  static std::string FreeMemory() {
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    return Gib(free_bytes) + " GiB of the device's " + Gib(total_bytes) + " GiB free";
  }

  // With mu_ held: frees the free blocks that are allocations of their own (workspace blocks
  // stay); returns the (size, count) pairs freed.
  std::vector<std::pair<size_t, size_t>> FreeOwnBlocksLocked() {
    std::vector<std::pair<size_t, size_t>> freed;
    for (auto& [size, list] : free_) {
      size_t count = 0;
      for (auto it = list.begin(); it != list.end();) {
        if (own_.erase(*it)) {
          cudaFree(*it);
          it = list.erase(it);
          ++count;
        } else {
          ++it;
        }
      }
      if (count > 0) freed.push_back({size, count});
      stats_.reserved -= size * count;
    }
    return freed;
  }

  // A new block of `size` bytes; when the device is full, gives the cached blocks back and tries
  // once more, then throws DeviceOutOfMemory.
  void* DeviceMalloc(size_t size) {
    void* p = nullptr;
    if (cudaMalloc(&p, size) != cudaSuccess) {
      cudaGetLastError();  // out of memory is not a sticky error
      ReleaseCached();
      if (cudaMalloc(&p, size) != cudaSuccess) {
        cudaGetLastError();
        throw DeviceOutOfMemory("out of GPU memory: " + Gib(size) + " GiB more asked for with " +
                                Gib(Stats().in_use) + " GiB held by tensors; " + FreeMemory());
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    own_.insert(p);
    stats_.reserved += size;
    ++stats_.device_allocations;
    return p;
  }

  // A workspace: one device allocation and the blocks carved from it.
  struct Arena {
    void* base;
    size_t bytes;
    std::vector<std::pair<void*, size_t>> blocks;
  };

  std::mutex mu_;
  std::vector<Arena> arenas_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  std::unordered_set<void*> own_;  // blocks that are cudaMalloc allocations of their own
  DeviceMemoryStats stats_;
};

// Never destroyed: tensors may outlive any backend object, up to process exit.
CachingAllocator& Allocator() {
  static CachingAllocator* allocator = new CachingAllocator();
  return *allocator;
}

std::shared_ptr<void> CudaAllocate(size_t bytes) { return Allocator().Allocate(bytes); }

// The scan's scratch from the caching allocator: counted in the memory statistics, and no new
// device allocation once a step's sizes have been seen.
const kernels::cuda::ScanScratch& ScanScratchFromCache() {
  static const kernels::cuda::ScanScratch scratch{CudaAllocate};
  return scratch;
}

// Typed device pointers, checking the device (the dtype is checked by Tensor::data).
const float* In(const Tensor& t, const char* op) {
  MAMBA_CHECK(t.device() == Device::kCUDA) << op << ": CUDA backend given " << t.DebugString();
  MAMBA_CHECK(t.dtype() == DType::kF32)
      << op << ": CUDA backend supports float32, got " << t.DebugString();
  return t.data<float>();
}
float* Out(const Tensor& t, const char* op) { return const_cast<float*>(In(t, op)); }
const float* OptIn(const Tensor& t, const char* op) { return t.defined() ? In(t, op) : nullptr; }
float* OptOut(const Tensor& t, const char* op) { return t.defined() ? Out(t, op) : nullptr; }
const int32_t* Ids(const Tensor& t, const char* op) {
  MAMBA_CHECK(t.device() == Device::kCUDA) << op << ": CUDA backend given " << t.DebugString();
  return t.data<int32_t>();
}

// Tensors named in messages. F32: a float32 tensor (parameters, the residual stream, the scan
// state); Act: an activation tensor, whose dtype (float32 or bfloat16) picks the kernels' T.
struct Named {
  const char* name;
  const Tensor& t;
};

void CheckCuda(const Tensor& t, const char* op, const char* name) {
  MAMBA_CHECK(t.device() == Device::kCUDA)
      << op << ": CUDA backend given " << name << " " << t.DebugString();
}

float* F32(const Tensor& t, const char* op, const char* name) {
  CheckCuda(t, op, name);
  MAMBA_CHECK(t.dtype() == DType::kF32)
      << op << ": " << name << " must be float32, got " << t.DebugString();
  return static_cast<float*>(t.raw());
}
float* OptF32(const Tensor& t, const char* op, const char* name) {
  return t.defined() ? F32(t, op, name) : nullptr;
}

// The one dtype of an op's activation tensors (undefined ones skipped): float32 or bfloat16.
DType ActDType(const char* op, std::initializer_list<Named> tensors) {
  const Named* first = nullptr;
  for (const Named& n : tensors) {
    if (!n.t.defined()) continue;
    CheckCuda(n.t, op, n.name);
    MAMBA_CHECK(n.t.dtype() == DType::kF32 || n.t.dtype() == DType::kBF16)
        << op << ": " << n.name << " must be float32 or bfloat16, got " << n.t.DebugString();
    if (first == nullptr) {
      first = &n;
    } else {
      MAMBA_CHECK(n.t.dtype() == first->t.dtype())
          << op << ": " << first->name << " and " << n.name << " must share one dtype, got "
          << first->t.DebugString() << " and " << n.t.DebugString();
    }
  }
  return first == nullptr ? DType::kF32 : first->t.dtype();
}

template <typename T>
constexpr DType ActDTypeOf() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16>);
  return std::is_same_v<T, float> ? DType::kF32 : DType::kBF16;
}

void* ActRaw(const Tensor& t, DType dtype, const char* op, const char* name) {
  CheckCuda(t, op, name);
  MAMBA_CHECK(t.dtype() == dtype) << op << ": " << name << " must be " << DTypeName(dtype)
                                  << ", got " << t.DebugString();
  return t.raw();
}
template <typename T>
T* Act(const Tensor& t, const char* op, const char* name) {
  return static_cast<T*>(ActRaw(t, ActDTypeOf<T>(), op, name));
}
template <typename T>
T* OptAct(const Tensor& t, const char* op, const char* name) {
  return t.defined() ? Act<T>(t, op, name) : nullptr;
}

// Calls fn(std::type_identity<T>{}) with T the kernels' element type of an activation dtype.
template <typename Fn>
void WithActType(DType dtype, Fn&& fn) {
  if (dtype == DType::kBF16) {
    fn(std::type_identity<__nv_bfloat16>{});
  } else {
    fn(std::type_identity<float>{});
  }
}

// (B, L, D) and (B, L, G, N) contiguous activation tensors as the scan kernels' strided views.
kernels::cuda::Strided3 Strided(const Tensor& t, DType dtype, const char* op, const char* name) {
  MAMBA_CHECK(t.rank() == 3) << op << ": " << name << " must be (B, L, D), got " << t.DebugString();
  const int64_t L = t.dim(1), D = t.dim(2);
  return {ActRaw(t, dtype, op, name), L * D, D, 1};
}
kernels::cuda::Strided4 Strided4Of(const Tensor& t, DType dtype, const char* op, const char* name) {
  MAMBA_CHECK(t.rank() == 4) << op << ": " << name << " must be (B, L, G, N), got "
                             << t.DebugString();
  const int64_t L = t.dim(1), G = t.dim(2), N = t.dim(3);
  return {ActRaw(t, dtype, op, name), L * G * N, G * N, N, 1};
}

// Column block [col, col + N) of a (B, L, K) tensor as a one-group (B, L, 1, N) operand.
kernels::cuda::Strided4 ColumnBlock(const Tensor& t, int64_t col, int64_t N, DType dtype,
                                    const char* op, const char* name) {
  MAMBA_CHECK(t.rank() == 3 && col >= 0 && col + N <= t.dim(2))
      << op << ": " << name << " columns [" << col << ", " << col + N << ") of " << t.DebugString();
  const int64_t L = t.dim(1), K = t.dim(2);
  const char* base = static_cast<const char*>(ActRaw(t, dtype, op, name));
  return {base + col * int64_t(DTypeSize(dtype)), L * K, K, N, 1};
}

// The scan's Bm and Cm, or their gradients: column blocks of the (B, L, K) tensor `bc` at
// in.bm_col and in.cm_col when in.bc is defined, else the (B, L, G, N) tensors bm and cm.
std::pair<kernels::cuda::Strided4, kernels::cuda::Strided4> BcOperands(
    const ScanInputs& in, const Tensor& bc, const Tensor& bm, const Tensor& cm, int64_t N,
    DType dtype, const char* op, bool gradients) {
  if (in.bc.defined()) {
    return {ColumnBlock(bc, in.bm_col, N, dtype, op, gradients ? "dBm (dbc)" : "Bm (bc)"),
            ColumnBlock(bc, in.cm_col, N, dtype, op, gradients ? "dCm (dbc)" : "Cm (bc)")};
  }
  return {Strided4Of(bm, dtype, op, gradients ? "dBm" : "Bm"),
          Strided4Of(cm, dtype, op, gradients ? "dCm" : "Cm")};
}

// The scan's activations (u, delta, z, Bm, Cm and the op's activation outputs or gradients in
// `acts`) share one dtype, float32 or bfloat16; A, D_skip, dt_bias and the states are float32.
kernels::cuda::ScanProblem ScanProblemOf(const ScanInputs& in, const char* op,
                                         std::initializer_list<Named> acts) {
  kernels::cuda::ScanProblem p;
  p.batch = in.u.dim(0);
  p.len = in.u.dim(1);
  p.dim = in.u.dim(2);
  p.dstate = in.A.dim(1);
  const bool bc = in.bc.defined();
  p.groups = bc ? 1 : in.Bm.dim(2);
  MAMBA_CHECK(in.A.dim(0) == p.dim && p.dim % p.groups == 0) << op << ": A " << in.A.DebugString();
  if (bc) {
    MAMBA_CHECK(in.bc.rank() == 3 && in.bc.dim(0) == p.batch && in.bc.dim(1) == p.len)
        << op << ": bc must be (B, L, K), got " << in.bc.DebugString();
  } else {
    MAMBA_CHECK(in.Bm.shape() == (Shape{p.batch, p.len, p.groups, p.dstate}))
        << op << ": Bm " << in.Bm.DebugString();
    CheckSameShape(in.Bm, in.Cm, op);
  }
  CheckSameShape(in.u, in.delta, op);
  const DType dtype = ActDType(
      op,
      {{"u", in.u}, {"delta", in.delta}, {"z", in.z}, {"Bm", in.Bm}, {"Cm", in.Cm}, {"bc", in.bc}});
  for (const Named& n : acts) {
    MAMBA_CHECK(!n.t.defined() || n.t.dtype() == dtype)
        << op << ": " << n.name << " must have the dtype of u, " << DTypeName(dtype) << ", got "
        << n.t.DebugString();
  }
  p.dtype = dtype == DType::kBF16 ? kernels::cuda::DType::kBF16 : kernels::cuda::DType::kF32;
  p.softplus = in.delta_softplus;
  p.u = Strided(in.u, dtype, op, "u");
  p.delta = Strided(in.delta, dtype, op, "delta");
  if (in.z.defined()) {
    CheckSameShape(in.u, in.z, op);
    p.z = Strided(in.z, dtype, op, "z");
  }
  std::tie(p.Bm, p.Cm) = BcOperands(in, in.bc, in.Bm, in.Cm, p.dstate, dtype, op, false);
  p.A = F32(in.A, op, "A");
  p.D_skip = OptF32(in.D_skip, op, "D_skip");
  p.dt_bias = OptF32(in.dt_bias, op, "dt_bias");
  p.h0 = OptF32(in.h0, op, "h0");
  return p;
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(const CudaBackendOptions& options) : options_(options) {
    MAMBA_CUDA_CHECK("init", cudaSetDevice(options.device));
    MAMBA_CUDA_CHECK("init", cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    const cublasStatus_t st = cublasCreate(&cublas_);
    MAMBA_CHECK(st == CUBLAS_STATUS_SUCCESS) << "cuBLAS init failed: " << cublasGetStatusString(st);
    MAMBA_CHECK(cublasSetStream(cublas_, stream_) == CUBLAS_STATUS_SUCCESS);
    // Deterministic GEMMs: one stream, no atomics-based (split-K) reductions. bf16 outputs are
    // rounded once from the fp32 accumulator: no reduced-precision reductions.
    MAMBA_CHECK(cublasSetAtomicsMode(cublas_, CUBLAS_ATOMICS_NOT_ALLOWED) == CUBLAS_STATUS_SUCCESS);
    MAMBA_CHECK(cublasSetMathMode(cublas_,
                                  cublasMath_t(CUBLAS_DEFAULT_MATH |
                                               CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)) ==
                CUBLAS_STATUS_SUCCESS);
    switch (options.gemm_precision) {
      case GemmPrecision::kFp32:
        gemm_ = kernels::GemmPrecision::kFp32;
        break;
      case GemmPrecision::kTf32:
        gemm_ = kernels::GemmPrecision::kTf32;
        break;
      case GemmPrecision::kBf16:
        gemm_ = kernels::GemmPrecision::kBf16;
        break;
    }
    RegisterAllocator(Device::kCUDA, CudaAllocate);
    scalars_dev_ = CudaAllocate(sizeof(DeviceScalars));
    MAMBA_CUDA_CHECK("init", cudaMallocHost(&scalars_host_, sizeof(DeviceScalars)));
    MAMBA_CUDA_CHECK("init", cudaMemsetAsync(scalars(), 0, sizeof(DeviceScalars), stream_));
    MAMBA_CUDA_CHECK("init", cudaStreamSynchronize(stream_));
  }
  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    for (const TimedOp& t : timed_) free_events_.insert(free_events_.end(), {t.start, t.stop});
    for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
    cublasDestroy(cublas_);
    cudaFreeHost(scalars_host_);
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return "cuda"; }
  Device device() const override { return Device::kCUDA; }

  DeviceMemoryStats MemoryStats() const override { return Allocator().Stats(); }
  void ResetPeakMemory() override { Allocator().ResetPeak(); }
  void ReleaseCachedMemory() override {
    workspace_.reset();  // the ops' scratch too: it regrows to what the next ops need
    workspace_bytes_ = 0;
    Allocator().ReleaseCached();
  }
  size_t ReserveWorkspace() override {
    workspace_.reset();  // the ops' scratch joins the workspace; Workspace() takes it back
    return Allocator().ReserveWorkspace();
  }

  void EnableOpTiming(bool on) override { timing_ = on; }
  std::vector<std::pair<std::string, double>> TakeOpTimes() override {
    MAMBA_CUDA_CHECK("op_times", cudaStreamSynchronize(stream_));
    std::vector<std::pair<std::string, double>> totals;
    for (const TimedOp& t : timed_) {
      float ms = 0;
      MAMBA_CUDA_CHECK("op_times", cudaEventElapsedTime(&ms, t.start, t.stop));
      auto it = std::find_if(totals.begin(), totals.end(),
                             [&](const auto& e) { return e.first == t.name; });
      if (it == totals.end()) {
        totals.push_back({t.name, ms});
      } else {
        it->second += ms;
      }
      free_events_.push_back(t.start);
      free_events_.push_back(t.stop);
    }
    timed_.clear();
    return totals;
  }

  std::string EnableOpCounters(const std::vector<std::string>& ops) override {
    if (!cupti_) {
      if (!counters_why_.empty()) return counters_why_;  // tried before: the same reason
      MAMBA_CUDA_CHECK("counters", cudaStreamSynchronize(stream_));
      cupti_ = profiling::CuptiCounters::Create(&counters_why_);
      if (!cupti_) return counters_why_;
    }
    counted_ops_ = ops;
    counters_ = cupti_.get();
    return "";
  }
  void DisableOpCounters() override { counters_ = nullptr; }
  std::vector<std::pair<std::string, profiling::KernelCounters>> TakeOpCounters(
      std::string* why) override {
    *why = counters_why_;
    std::vector<std::pair<std::string, profiling::KernelCounters>> out(counted_.begin(),
                                                                       counted_.end());
    counted_.clear();
    return out;
  }

  Tensor Empty(const Shape& shape, DType dtype) override {
    return Tensor::Empty(shape, dtype, Device::kCUDA);
  }
  void Zero(Tensor& t) override {
    MAMBA_CHECK(t.device() == Device::kCUDA) << "zero: " << t.DebugString();
    MAMBA_CUDA_CHECK("zero", cudaMemsetAsync(t.raw(), 0, t.nbytes(), stream_));
  }
  Tensor FromHost(const Tensor& host) override {
    OpScope range(this, "from_host");
    MAMBA_CHECK(host.device() == Device::kCPU) << "from_host: " << host.DebugString();
    Tensor t = Empty(host.shape(), host.dtype());
    MAMBA_CUDA_CHECK("from_host", cudaMemcpyAsync(t.raw(), host.raw(), host.nbytes(),
                                                  cudaMemcpyHostToDevice, stream_));
    SyncAndCheck("from_host");  // the host buffer may be freed when this returns
    return t;
  }
  Tensor ToHost(const Tensor& t) override {
    Tensor host = Tensor::Empty(t.shape(), t.dtype());
    CopyToHost(t, host);
    return host;
  }
  void CopyToHost(const Tensor& t, Tensor& host) override {
    OpScope range(this, "to_host");
    CheckSameShape(t, host, "to_host");
    MAMBA_CHECK(t.device() == Device::kCUDA && host.device() == Device::kCPU &&
                t.dtype() == host.dtype())
        << "to_host: " << t.DebugString() << " to " << host.DebugString();
    MAMBA_CUDA_CHECK("to_host", cudaMemcpyAsync(host.raw(), t.raw(), t.nbytes(),
                                                cudaMemcpyDeviceToHost, stream_));
    SyncAndCheck("to_host");
  }
  // Page-locked blocks, kept by size class (powers of two) and handed out again once their
  // tensor is gone: cudaMallocHost takes milliseconds, the copies run at full PCIe speed.
  Tensor StagingHostEmpty(const Shape& shape, DType dtype) override {
    const size_t bytes = static_cast<size_t>(NumElements(shape)) * DTypeSize(dtype);
    size_t cls = 4096;
    while (cls < bytes) cls *= 2;
    void* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(pinned_->mutex);
      auto& free = pinned_->free[cls];
      if (!free.empty()) {
        block = free.back();
        free.pop_back();
      }
    }
    if (!block) MAMBA_CUDA_CHECK("staging", cudaMallocHost(&block, cls));
    std::shared_ptr<PinnedCache> cache = pinned_;
    std::shared_ptr<void> buffer(block, [cache, cls](void* p) {
      std::lock_guard<std::mutex> lock(cache->mutex);
      cache->free[cls].push_back(p);
    });
    return Tensor::Over(std::move(buffer), shape, dtype, Device::kCPU);
  }
  void CopyFromHost(const Tensor& host, Tensor& dst) override {
    OpScope range(this, "copy_from_host");
    CheckSameShape(host, dst, "copy_from_host");
    MAMBA_CHECK(host.device() == Device::kCPU && dst.device() == Device::kCUDA &&
                host.dtype() == dst.dtype())
        << "copy_from_host: " << host.DebugString() << " to " << dst.DebugString();
    MAMBA_CUDA_CHECK("copy_from_host", cudaMemcpyAsync(dst.raw(), host.raw(), host.nbytes(),
                                                       cudaMemcpyHostToDevice, stream_));
    SyncAndCheck("copy_from_host");  // the host buffer may be freed when this returns
  }
  void Convert(const Tensor& src, Tensor& dst) override {
    OpScope range(this, "convert");
    constexpr const char* op = "convert";
    CheckSameShape(src, dst, op);
    MAMBA_CHECK(src.device() == Device::kCUDA && dst.device() == Device::kCUDA)
        << op << ": CUDA backend given " << src.DebugString() << " to " << dst.DebugString();
    if (src.dtype() == dst.dtype()) {
      MAMBA_CUDA_CHECK(op, cudaMemcpyAsync(dst.raw(), src.raw(), src.nbytes(),
                                           cudaMemcpyDeviceToDevice, stream_));
    } else if (src.dtype() == DType::kF32 && dst.dtype() == DType::kBF16) {
      kernels::FloatToBf16Cuda(src.numel(), src.data<float>(), dst.raw(), stream_);
    } else if (src.dtype() == DType::kBF16 && dst.dtype() == DType::kF32) {
      kernels::Bf16ToFloatCuda(src.numel(), src.raw(), dst.data<float>(), stream_);
    } else {
      MAMBA_CHECK(false) << op << ": the CUDA backend copies or converts float32 <-> bfloat16, got "
                         << src.DebugString() << " to " << dst.DebugString();
    }
  }
  void* compute_stream() const override { return stream_; }
  void Synchronize() override { SyncAndCheck("synchronize"); }

  DType GemmOperandDType(DType weight_dtype) const override {
    return gemm_ == kernels::GemmPrecision::kBf16 ? DType::kBF16 : weight_dtype;
  }

  void EmbeddingForward(const Tensor& ids, const Tensor& weight, Tensor& out) override {
    constexpr const char* op = "embedding_fwd";
    OpScope range(this, op);
    MAMBA_CHECK(weight.rank() == 2 && out.numel() == ids.numel() * weight.dim(1))
        << "embedding: ids " << ids.DebugString() << " weight " << weight.DebugString() << " out "
        << out.DebugString();
    WithActType(ActDType(op, {{"out", out}}), [&](auto tag) {
      using T = typename decltype(tag)::type;
      kernels::EmbeddingForwardCuda(Ids(ids, op), ids.numel(), F32(weight, op, "weight"),
                                    weight.dim(0), weight.dim(1), Act<T>(out, op, "out"),
                                    error_bits(), stream_);
    });
  }
  void EmbeddingBackward(const Tensor& ids, const Tensor& dout, Tensor& dweight) override {
    constexpr const char* op = "embedding_bwd";
    OpScope range(this, op);
    MAMBA_CHECK(dweight.rank() == 2 && dout.numel() == ids.numel() * dweight.dim(1))
        << "embedding backward: ids " << ids.DebugString() << " dout " << dout.DebugString();
    const size_t bytes =
        kernels::EmbeddingBackwardWorkspaceBytes(ids.numel(), dweight.dim(0), dweight.dim(1));
    WithActType(ActDType(op, {{"dout", dout}}), [&](auto tag) {
      using T = typename decltype(tag)::type;
      kernels::EmbeddingBackwardCuda(Ids(ids, op), ids.numel(), Act<T>(dout, op, "dout"),
                                     dweight.dim(0), dweight.dim(1), F32(dweight, op, "dweight"),
                                     Workspace(bytes), bytes, error_bits(), stream_);
    });
  }

  void AddRmsNormForward(const Tensor& residual_in, const Tensor& x, const Tensor& weight,
                         double eps, Tensor& residual_out, Tensor& y, Tensor& rstd) override {
    OpScope range(this, "rmsnorm_fwd");
    constexpr const char* op = "rmsnorm_fwd";
    CheckSameShape(x, y, op);
    CheckSameShape(x, residual_out, op);
    if (residual_in.defined()) CheckSameShape(x, residual_in, op);
    MAMBA_CHECK(x.dim(-1) == weight.numel() && rstd.numel() == x.rows()) << op;
    // x and y may differ in dtype: x is the residual stream itself when a layer is recomputed.
    WithActType(ActDType(op, {{"x", x}}), [&](auto x_tag) {
      using TX = typename decltype(x_tag)::type;
      WithActType(ActDType(op, {{"y", y}}), [&](auto y_tag) {
        using TY = typename decltype(y_tag)::type;
        kernels::AddRmsNormForwardCuda(x.rows(), x.dim(-1), OptF32(residual_in, op, "residual_in"),
                                       Act<TX>(x, op, "x"), F32(weight, op, "weight"), float(eps),
                                       F32(residual_out, op, "residual_out"), Act<TY>(y, op, "y"),
                                       F32(rstd, op, "rstd"), stream_);
      });
    });
  }
  using Backend::AddRmsNormBackward;
  void AddRmsNormBackward(const Tensor& dy, const Tensor& dresidual_out, const Tensor& residual_out,
                          const Tensor& weight, const Tensor& rstd, Tensor& dx, Tensor& dweight,
                          Tensor& dx_copy) override {
    OpScope range(this, "rmsnorm_bwd");
    constexpr const char* op = "rmsnorm_bwd";
    CheckSameShape(dy, dx, op);
    if (dx_copy.defined()) {
      CheckSameShape(dx, dx_copy, op);
      MAMBA_CHECK(dx_copy.dtype() == DType::kBF16 || dx_copy.dtype() == DType::kF32)
          << op << ": dx_copy must be bfloat16 or float32, got " << dx_copy.DebugString();
    }
    CheckSameShape(dy, residual_out, op);
    if (dresidual_out.defined()) CheckSameShape(dy, dresidual_out, op);
    MAMBA_CHECK(dy.dim(-1) == weight.numel() && weight.numel() == dweight.numel() &&
                rstd.numel() == dy.rows())
        << op;
    const int64_t rows = dy.rows(), dim = dy.dim(-1);
    WithActType(ActDType(op, {{"dy", dy}}), [&](auto tag) {
      using T = typename decltype(tag)::type;
      kernels::AddRmsNormBackwardCuda(
          rows, dim, Act<T>(dy, op, "dy"), OptF32(dresidual_out, op, "dresidual_out"),
          F32(residual_out, op, "residual_out"), F32(weight, op, "weight"), F32(rstd, op, "rstd"),
          F32(dx, op, "dx"),
          dx_copy.defined() && dx_copy.dtype() == DType::kBF16
              ? static_cast<__nv_bfloat16*>(dx_copy.raw())
              : nullptr,
          F32(dweight, op, "dweight"),
          Workspace(kernels::AddRmsNormBackwardWorkspaceBytes(rows, dim)), stream_);
    });
    if (dx_copy.defined() && dx_copy.dtype() == DType::kF32) {
      MAMBA_CUDA_CHECK(op, cudaMemcpyAsync(dx_copy.raw(), dx.raw(), dx.nbytes(),
                                           cudaMemcpyDeviceToDevice, stream_));
    }
  }

  void LinearForward(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& y) override {
    OpScope range(this, "linear_fwd");
    constexpr const char* op = "linear_fwd";
    const int64_t M = x.rows(), N = w.dim(0), K = w.dim(1);
    MAMBA_CHECK(x.dim(-1) == K && y.numel() == M * N && (!bias.defined() || bias.numel() == N))
        << "linear: x " << x.DebugString() << " w " << w.DebugString() << " y " << y.DebugString();
    const kernels::GemmMatrix xm = GemmOperand(x, op), wm = GemmOperand(w, op),
                              ym = GemmOperand(y, op);
    kernels::LinearForwardCuda(
        cublas_, gemm_, M, N, K, xm, wm, OptIn(bias, op), ym,
        Workspace(kernels::LinearForwardWorkspaceBytes(gemm_, M, N, K, xm, wm)), stream_);
  }
  using Backend::LinearBackward;
  void LinearBackward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor& dx, Tensor& dw,
                      Tensor& dbias, bool accumulate_dx) override {
    OpScope range(this, "linear_bwd");
    constexpr const char* op = "linear_bwd";
    const int64_t M = x.rows(), N = w.dim(0), K = w.dim(1);
    MAMBA_CHECK(dy.numel() == M * N && dw.shape() == w.shape() &&
                (!dx.defined() || dx.numel() == M * K) && (!dbias.defined() || dbias.numel() == N))
        << "linear backward: dy " << dy.DebugString() << " x " << x.DebugString() << " w "
        << w.DebugString();
    const kernels::GemmMatrix dym = GemmOperand(dy, op), xm = GemmOperand(x, op),
                              wm = GemmOperand(w, op),
                              dxm = dx.defined() ? GemmOperand(dx, op) : kernels::GemmMatrix();
    kernels::LinearBackwardCuda(
        cublas_, gemm_, M, N, K, dym, xm, wm, dxm, accumulate_dx, Out(dw, op), OptOut(dbias, op),
        Workspace(kernels::LinearBackwardWorkspaceBytes(gemm_, M, N, K, dym, xm, wm, dxm)),
        stream_);
  }

  void CausalConv1dForward(const Tensor& x, const Tensor& weight, const Tensor& bias,
                           const Tensor& prefix, bool silu, Tensor& y) override {
    OpScope range(this, "conv1d_fwd");
    constexpr const char* op = "conv1d_fwd";
    CheckSameShape(x, y, op);
    const int64_t B = x.dim(0), L = x.dim(1), C = x.dim(2), K = weight.dim(-1);
    CheckConv(x, weight, bias, prefix, op);
    WithActType(ActDType(op, {{"x", x}, {"prefix", prefix}, {"y", y}}), [&](auto tag) {
      using T = typename decltype(tag)::type;
      kernels::CausalConv1dForwardCuda(B, L, C, K, Act<T>(x, op, "x"), F32(weight, op, "weight"),
                                       OptF32(bias, op, "bias"), OptAct<T>(prefix, op, "prefix"),
                                       silu, Act<T>(y, op, "y"), stream_);
    });
  }
  void CausalConv1dBackward(const Tensor& x, const Tensor& weight, const Tensor& bias,
                            const Tensor& prefix, bool silu, const Tensor& dy, Tensor& dx,
                            Tensor& dweight, Tensor& dbias, Tensor& dprefix) override {
    OpScope range(this, "conv1d_bwd");
    constexpr const char* op = "conv1d_bwd";
    CheckSameShape(x, dx, op);
    CheckSameShape(x, dy, op);
    CheckConv(x, weight, bias, prefix, op);
    const int64_t B = x.dim(0), L = x.dim(1), C = x.dim(2), K = weight.dim(-1);
    MAMBA_CHECK(dweight.numel() == C * K && (!dbias.defined() || dbias.numel() == C) &&
                (!dprefix.defined() || dprefix.numel() == B * (K - 1) * C))
        << op << ": dweight " << dweight.DebugString();
    const DType dtype =
        ActDType(op, {{"x", x}, {"prefix", prefix}, {"dy", dy}, {"dx", dx}, {"dprefix", dprefix}});
    WithActType(dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      kernels::CausalConv1dBackwardCuda(
          B, L, C, K, Act<T>(x, op, "x"), F32(weight, op, "weight"), OptF32(bias, op, "bias"),
          OptAct<T>(prefix, op, "prefix"), silu, Act<T>(dy, op, "dy"), Act<T>(dx, op, "dx"),
          F32(dweight, op, "dweight"), OptF32(dbias, op, "dbias"),
          OptAct<T>(dprefix, op, "dprefix"),
          Workspace(kernels::CausalConv1dBackwardWorkspaceBytes(B, L, C, K)), stream_);
    });
  }

  void SiluForward(const Tensor& x, Tensor& y) override {
    constexpr const char* op = "silu_fwd";
    OpScope range(this, op);
    CheckSameShape(x, y, op);
    WithActType(ActDType(op, {{"x", x}, {"y", y}}), [&](auto tag) {
      using T = typename decltype(tag)::type;
      kernels::SiluForwardCuda(x.numel(), Act<T>(x, op, "x"), Act<T>(y, op, "y"), stream_);
    });
  }
  void SiluBackward(const Tensor& x, const Tensor& dy, Tensor& dx) override {
    constexpr const char* op = "silu_bwd";
    OpScope range(this, op);
    CheckSameShape(x, dx, op);
    CheckSameShape(x, dy, op);
    WithActType(ActDType(op, {{"x", x}, {"dy", dy}, {"dx", dx}}), [&](auto tag) {
      using T = typename decltype(tag)::type;
      kernels::SiluBackwardCuda(x.numel(), Act<T>(x, op, "x"), Act<T>(dy, op, "dy"),
                                Act<T>(dx, op, "dx"), stream_);
    });
  }

  // The scan kernels take the backend's channel-contiguous layout directly (as strides).
  void SelectiveScanForward(const ScanInputs& in, Tensor& out, Tensor& h_last) override {
    constexpr const char* op = "selective_scan_fwd";
    OpScope range(this, op);
    kernels::cuda::ScanProblem p = ScanProblemOf(in, op, {{"out", out}});
    CheckSameShape(in.u, out, op);
    p.out = Strided(out, in.u.dtype(), op, "out");
    p.h_last = OptF32(h_last, op, "h_last");
    MAMBA_CUDA_CHECK(op, kernels::cuda::LaunchScanForward(p, stream_, {}, ScanScratchFromCache()));
  }
  void SelectiveScanBackward(const ScanInputs& in, const Tensor& dout, const Tensor& dh_last,
                             ScanGrads& g) override {
    constexpr const char* op = "selective_scan_bwd";
    OpScope range(this, op);
    kernels::cuda::ScanProblem p = ScanProblemOf(in, op,
                                                 {{"dout", dout},
                                                  {"du", g.du},
                                                  {"ddelta", g.ddelta},
                                                  {"dz", g.dz},
                                                  {"dBm", g.dBm},
                                                  {"dCm", g.dCm},
                                                  {"dbc", g.dbc}});
    CheckSameShape(in.u, dout, op);
    const DType dtype = in.u.dtype();  // the activations' dtype, checked above
    p.dout = Strided(dout, dtype, op, "dout");
    p.dh_last = OptF32(dh_last, op, "dh_last");
    p.du = Strided(g.du, dtype, op, "du");
    p.ddelta = Strided(g.ddelta, dtype, op, "ddelta");
    if (in.z.defined()) p.dz = Strided(g.dz, dtype, op, "dz");
    if (in.bc.defined()) CheckSameShape(in.bc, g.dbc, op);
    std::tie(p.dBm, p.dCm) = BcOperands(in, g.dbc, g.dBm, g.dCm, p.dstate, dtype, op, true);
    p.dA = F32(g.dA, op, "dA");
    p.dD_skip = OptF32(g.dD_skip, op, "dD_skip");
    p.ddt_bias = OptF32(g.ddt_bias, op, "ddt_bias");
    p.dh0 = OptF32(g.dh0, op, "dh0");
    MAMBA_CUDA_CHECK(op, kernels::cuda::LaunchScanBackward(p, stream_, {}, ScanScratchFromCache()));
  }

  void SelectiveScanStateMap(const ScanInputs& in, Tensor& decay, Tensor& state) override {
    constexpr const char* op = "scan_state_map";
    OpScope range(this, op);
    kernels::cuda::ScanProblem p = ScanProblemOf(in, op, {});
    p.h0 = nullptr;
    const Shape maps{p.batch, p.dim, p.dstate};
    MAMBA_CHECK(decay.shape() == maps && (!state.defined() || state.shape() == maps))
        << op << ": decay and state must be (B, D, N), got " << decay.DebugString() << ", "
        << state.DebugString();
    float* state_out = state.defined() ? F32(state, op, "state") : nullptr;
    MAMBA_CUDA_CHECK(op, kernels::cuda::LaunchScanStateMap(p, F32(decay, op, "decay"), state_out,
                                                           stream_, ScanScratchFromCache()));
  }
  void SelectiveScanStateGrad(const ScanInputs& in, const Tensor& dout, Tensor& dstate) override {
    constexpr const char* op = "scan_state_grad";
    OpScope range(this, op);
    kernels::cuda::ScanProblem p = ScanProblemOf(in, op, {{"dout", dout}});
    CheckSameShape(in.u, dout, op);
    p.dout = Strided(dout, in.u.dtype(), op, "dout");
    MAMBA_CHECK(dstate.shape() == (Shape{p.batch, p.dim, p.dstate}))
        << op << ": dstate must be (B, D, N), got " << dstate.DebugString();
    MAMBA_CUDA_CHECK(op, kernels::cuda::LaunchScanStateGrad(p, F32(dstate, op, "dstate"), stream_,
                                                            ScanScratchFromCache()));
  }

  kernels::CrossEntropyStats CrossEntropy(const Tensor& logits, const Tensor& targets,
                                          int32_t ignore_index, double grad_scale,
                                          Tensor& dlogits) override {
    constexpr const char* op = "cross_entropy";
    OpScope range(this, op);
    LaunchCrossEntropy(logits, targets, ignore_index, grad_scale, dlogits, false, op);
    SyncAndCheck(op);
    return HostStats(scalars_host_->cross_entropy);
  }
  void AccumulateCrossEntropy(const Tensor& logits, const Tensor& targets, int32_t ignore_index,
                              double grad_scale, Tensor& dlogits) override {
    constexpr const char* op = "cross_entropy";
    OpScope range(this, op);
    LaunchCrossEntropy(logits, targets, ignore_index, grad_scale, dlogits, true, op);
  }
  kernels::CrossEntropyStats TakeCrossEntropyStats() override {
    constexpr const char* op = "cross_entropy_stats";
    OpScope range(this, op);
    SyncAndCheck(op);
    // Zeroed in stream order: later accumulations start a new total.
    MAMBA_CUDA_CHECK(op, cudaMemsetAsync(&scalars()->cross_entropy_total, 0,
                                         sizeof(kernels::CrossEntropyDeviceStats), stream_));
    return HostStats(scalars_host_->cross_entropy_total);
  }

  void CopyColumns(const Tensor& src, int64_t col0, Tensor& dst) override {
    OpScope range(this, "copy_columns");
    const int64_t rows = src.rows(), n = dst.dim(-1), ld = src.dim(-1);
    MAMBA_CHECK(dst.rows() == rows && col0 >= 0 && col0 + n <= ld && src.dtype() == dst.dtype())
        << "copy_columns: " << src.DebugString() << " [" << col0 << ", +" << n << ") to "
        << dst.DebugString();
    Copy2D(static_cast<const char*>(src.raw()) + col0 * ElemSize(src), ld, dst.raw(), n, n, rows,
           src, "copy_columns");
  }
  void WriteColumns(const Tensor& src, Tensor& dst, int64_t col0) override {
    OpScope range(this, "write_columns");
    const int64_t rows = src.rows(), n = src.dim(-1), ld = dst.dim(-1);
    MAMBA_CHECK(dst.rows() == rows && col0 >= 0 && col0 + n <= ld && src.dtype() == dst.dtype())
        << "write_columns: " << src.DebugString() << " to " << dst.DebugString() << " at " << col0;
    Copy2D(src.raw(), n, static_cast<char*>(dst.raw()) + col0 * ElemSize(src), ld, n, rows, src,
           "write_columns");
  }

  void NegExp(const Tensor& x, Tensor& y) override {
    OpScope range(this, "negexp");
    CheckSameShape(x, y, "negexp");
    kernels::NegExpCuda(x.numel(), In(x, "negexp"), Out(y, "negexp"), stream_);
  }
  void AddProduct(const Tensor& a, const Tensor& b, Tensor& dst) override {
    OpScope range(this, "addproduct");
    CheckSameShape(a, dst, "addproduct");
    CheckSameShape(b, dst, "addproduct");
    kernels::AddProductCuda(dst.numel(), In(a, "addproduct"), In(b, "addproduct"),
                            Out(dst, "addproduct"), stream_);
  }
  void Add(const Tensor& src, Tensor& dst) override {
    constexpr const char* op = "add";
    OpScope range(this, op);
    MAMBA_CHECK(src.numel() == dst.numel()) << src.DebugString() << " += " << dst.DebugString();
    // Any mix of float32 and bfloat16: summed in float, rounded to dst's dtype.
    WithActType(ActDType(op, {{"src", src}}), [&](auto src_tag) {
      using TS = typename decltype(src_tag)::type;
      WithActType(ActDType(op, {{"dst", dst}}), [&](auto dst_tag) {
        using TD = typename decltype(dst_tag)::type;
        kernels::AddCuda(dst.numel(), Act<TS>(src, op, "src"), Act<TD>(dst, op, "dst"), stream_);
      });
    });
  }
  void Scale(Tensor& x, double s) override {
    OpScope range(this, "scale");
    kernels::ScaleCuda(x.numel(), Out(x, "scale"), float(s), stream_);
  }
  double SumSquares(const std::vector<Tensor>& xs) override {
    OpScope range(this, "sum_squares");
    std::vector<kernels::FloatSpan> spans;
    for (const Tensor& x : xs) spans.push_back({In(x, "sum_squares"), x.numel()});
    kernels::SumSquaresCuda(spans.data(), spans.size(), &scalars()->sum_squares,
                            Workspace(kernels::SumSquaresWorkspaceBytes(spans.size())), stream_);
    SyncAndCheck("sum_squares");
    return scalars_host_->sum_squares;
  }

  void AdamW(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, Tensor& param_bf16,
             const AdamWHyper& h) override {
    OpScope range(this, "adamw");
    constexpr const char* op = "adamw";
    CheckSameShape(param, grad, op);
    CheckSameShape(param, m, op);
    CheckSameShape(param, v, op);
    void* shadow = nullptr;
    if (param_bf16.defined()) {
      CheckSameShape(param, param_bf16, op);
      MAMBA_CHECK(param_bf16.device() == Device::kCUDA && param_bf16.dtype() == DType::kBF16)
          << op << ": param_bf16 must be a CUDA bfloat16 tensor, got " << param_bf16.DebugString();
      shadow = param_bf16.raw();
    }
    // The same float coefficients as the CPU backend, from double on the host.
    const double bc1 = 1 - std::pow(h.beta1, double(h.step));
    const double bc2 = 1 - std::pow(h.beta2, double(h.step));
    kernels::AdamWCoefficients c;
    c.beta1 = float(h.beta1);
    c.beta2 = float(h.beta2);
    c.eps = float(h.eps);
    c.decay = float(1 - h.lr * h.weight_decay);
    c.step_size = float(h.lr / bc1);
    c.sqrt_bc2 = float(std::sqrt(bc2));
    c.grad_scale = float(h.grad_scale);
    kernels::AdamWCuda(param.numel(), Out(param, op), In(grad, op), Out(m, op), Out(v, op), shadow,
                       c, stream_);
  }

 private:
  DeviceScalars* scalars() { return static_cast<DeviceScalars*>(scalars_dev_.get()); }
  int* error_bits() { return &scalars()->error_bits; }

  static size_t ElemSize(const Tensor& t) { return DTypeSize(t.dtype()); }

  void LaunchCrossEntropy(const Tensor& logits, const Tensor& targets, int32_t ignore_index,
                          double grad_scale, Tensor& dlogits, bool accumulate, const char* op) {
    const int64_t rows = logits.rows();
    MAMBA_CHECK(targets.numel() == rows) << op << ": targets " << targets.DebugString();
    if (dlogits.defined()) CheckSameShape(logits, dlogits, op);
    WithActType(ActDType(op, {{"logits", logits}, {"dlogits", dlogits}}), [&](auto tag) {
      using T = typename decltype(tag)::type;
      kernels::CrossEntropyCuda(
          rows, logits.dim(-1), Act<T>(logits, op, "logits"), Ids(targets, op), ignore_index,
          grad_scale, OptAct<T>(dlogits, op, "dlogits"), accumulate,
          accumulate ? &scalars()->cross_entropy_total : &scalars()->cross_entropy,
          Workspace(kernels::CrossEntropyWorkspaceBytes(rows)), error_bits(), stream_);
    });
  }
  static kernels::CrossEntropyStats HostStats(const kernels::CrossEntropyDeviceStats& d) {
    kernels::CrossEntropyStats stats;
    stats.loss_sum = d.loss_sum;
    stats.count = d.count;
    stats.correct = d.correct;
    return stats;
  }

  // Row-major 2-D copy of `rows` rows of n elements, source and destination row strides in
  // elements.
  void Copy2D(const void* src, int64_t src_ld, void* dst, int64_t dst_ld, int64_t n, int64_t rows,
              const Tensor& like, const char* op) {
    MAMBA_CHECK(like.device() == Device::kCUDA) << op << ": " << like.DebugString();
    if (rows == 0 || n == 0) return;
    const int64_t es = static_cast<int64_t>(ElemSize(like));
    kernels::Copy2DCuda(src, src_ld * es, dst, dst_ld * es, n * es, rows, stream_);
  }

  void CheckConv(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& prefix,
                 const char* op) {
    MAMBA_CHECK(x.rank() == 3) << op << ": x " << x.DebugString();
    const int64_t B = x.dim(0), C = x.dim(2), K = weight.dim(-1);
    MAMBA_CHECK(weight.numel() == C * K && (!bias.defined() || bias.numel() == C) &&
                (!prefix.defined() || prefix.shape() == Shape{B, K - 1, C}))
        << op << ": x " << x.DebugString() << " weight " << weight.DebugString();
  }

  // A scratch buffer of at least `bytes`, reused by every op (ops on the one stream never
  // overlap). Grows on demand; the model's first step settles its size.
  // An NVTX range around one op and, when op timing is on, CUDA events around its kernels.
  // When counters are on for this op (and no enclosing op is counted), its kernels are counted.
  class OpScope {
   public:
    OpScope(CudaBackend* be, const char* name) : nvtx_(name), be_(be), name_(name) {
      if (be_->timing_) start_ = be_->RecordEvent();
      if (be_->counters_ && !be_->counting_now_ && be_->Counted(name)) {
        counting_ = be_->counting_now_ = be_->counters_->Begin(&be_->counters_why_);
      }
    }
    ~OpScope() {
      if (be_->timing_) be_->timed_.push_back({name_, start_, be_->RecordEvent()});
      if (counting_) {
        be_->counting_now_ = false;
        const profiling::KernelCounters k = be_->counters_->End(&be_->counters_why_);
        if (k.kernels > 0) be_->counted_[name_] += k;
      }
    }

   private:
    ScopedRange nvtx_;
    CudaBackend* be_;
    const char* name_;
    cudaEvent_t start_ = nullptr;
    bool counting_ = false;
  };

  bool Counted(const char* op) const {
    return std::find_if(counted_ops_.begin(), counted_ops_.end(), [&](const std::string& o) {
             return o == "*" || o == op;
           }) != counted_ops_.end();
  }

  cudaEvent_t RecordEvent() {
    cudaEvent_t e;
    if (free_events_.empty()) {
      MAMBA_CUDA_CHECK("event", cudaEventCreate(&e));
    } else {
      e = free_events_.back();
      free_events_.pop_back();
    }
    MAMBA_CUDA_CHECK("event", cudaEventRecord(e, stream_));
    return e;
  }

  struct TimedOp {
    const char* name;
    cudaEvent_t start, stop;
  };
  // Free page-locked staging blocks by size; shared with the tensors that return them, and freed
  // when the last of both goes.
  struct PinnedCache {
    std::mutex mutex;
    std::map<size_t, std::vector<void*>> free;
    ~PinnedCache() {
      for (auto& [cls, blocks] : free) {
        for (void* p : blocks) cudaFreeHost(p);
      }
    }
  };
  std::shared_ptr<PinnedCache> pinned_ = std::make_shared<PinnedCache>();
  bool timing_ = false;
  std::vector<TimedOp> timed_;
  std::vector<cudaEvent_t> free_events_;
  // Hardware counters: made on first use (CUPTI), kept for the backend's life.
  std::unique_ptr<profiling::CuptiCounters> cupti_;
  profiling::CuptiCounters* counters_ = nullptr;  // cupti_ while counting is enabled
  std::vector<std::string> counted_ops_;
  bool counting_now_ = false;
  std::string counters_why_;
  std::map<std::string, profiling::KernelCounters> counted_;

  void* Workspace(size_t bytes) {
    if (bytes > workspace_bytes_) {
      workspace_.reset();  // back to the cache; a later reuse is ordered after its last reader
      workspace_bytes_ = std::max(bytes, workspace_bytes_ * 2);
    }
    if (!workspace_) workspace_ = CudaAllocate(workspace_bytes_);
    return workspace_.get();
  }

  // Waits for the stream, fetches the device scalars and aborts on any error a kernel reported.
  void SyncAndCheck(const char* op) {
    MAMBA_CUDA_CHECK(op, cudaMemcpyAsync(scalars_host_, scalars(), sizeof(DeviceScalars),
                                         cudaMemcpyDeviceToHost, stream_));
    MAMBA_CUDA_CHECK(op, cudaStreamSynchronize(stream_));
    const int bits = scalars_host_->error_bits;
    if (bits == 0) return;
    std::string causes;
    if (bits & kernels::kBadEmbeddingId) causes += "an embedding id outside [0, vocab); ";
    if (bits & kernels::kBadTarget) {
      causes += "a cross-entropy target outside [0, vocab) that is not ignore_index; ";
    }
    MAMBA_CHECK(false) << "cuda backend (noticed at " << op << "): " << causes;
  }

  // A GEMM operand or output: fp32, or bf16 where the GEMMs multiply in bf16 (cuBLAS multiplies
  // fp32 operands into fp32 outputs only).
  kernels::GemmMatrix GemmOperand(const Tensor& t, const char* op) const {
    MAMBA_CHECK(t.device() == Device::kCUDA) << op << ": CUDA backend given " << t.DebugString();
    MAMBA_CHECK(t.dtype() == DType::kF32 || t.dtype() == DType::kBF16)
        << op << ": GEMM tensors are float32 or bfloat16, got " << t.DebugString();
    MAMBA_CHECK(t.dtype() == DType::kF32 || gemm_ == kernels::GemmPrecision::kBf16)
        << op << ": a bfloat16 GEMM tensor needs GemmPrecision::kBf16 (this backend multiplies "
        << "in fp32 or tf32), got " << t.DebugString();
    return {t.raw(), t.dtype() == DType::kBF16};
  }

  CudaBackendOptions options_;
  kernels::GemmPrecision gemm_ = kernels::GemmPrecision::kFp32;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  std::shared_ptr<void> scalars_dev_;
  DeviceScalars* scalars_host_ = nullptr;
  std::shared_ptr<void> workspace_;
  size_t workspace_bytes_ = 0;
};

}  // namespace

int CudaDeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver / no device" error
    return 0;
  }
  return count;
}

std::unique_ptr<Backend> MakeCudaBackend(const CudaBackendOptions& options) {
  MAMBA_CHECK(CudaDeviceCount() > options.device)
      << "cuda backend: no CUDA device " << options.device << " (found " << CudaDeviceCount()
      << ")";
  return std::make_unique<CudaBackend>(options);
}

}  // namespace mamba
