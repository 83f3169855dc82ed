// Hardware counters of the kernels an op launches, collected in process with CUDA 13's CUPTI range
// profiler: one range a kernel (auto range), each kernel replayed as often as the counters need
// (kernel replay, device memory saved and restored between passes), so the op's results are
// unchanged and only its time grows. The metrics are DESIGN.md's "Profiling" ones: DRAM bytes
// read and written, shared-memory load and store wavefronts and the kernels' duration.
//
// CUPTI is loaded when first asked for (dlopen), so binaries run where it is absent; Create says
// why it cannot count (no library, no rights to the counters, a device it does not support) and
// the report prints that reason instead of the counters.
//
//   std::string why;
//   auto counters = CuptiCounters::Create(&why);   // on the current device and context
//   counters->Begin();  launch kernels ...  KernelCounters k = counters->End(&why);
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace mamba::profiling {

// DESIGN.md's counters, as CUPTI and Nsight Compute name them, in KernelCounters' field order.
inline constexpr const char* kCounterMetrics[] = {
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum",
    "gpu__time_duration.sum",
};
inline constexpr int kNumCounterMetrics = 5;

// Summed over the kernels counted.
struct KernelCounters {
  int64_t kernels = 0;
  double dram_read_bytes = 0, dram_write_bytes = 0;
  double shared_load_wavefronts = 0, shared_store_wavefronts = 0;
  double gpu_time_ns = 0;  // under the profiler (replay and serialisation included)
  // A wavefront is one pass of shared memory's 32 four-byte banks: 128 bytes at most.
  double shared_bytes() const { return 128 * (shared_load_wavefronts + shared_store_wavefronts); }
  KernelCounters& operator+=(const KernelCounters& o) {
    kernels += o.kernels;
    dram_read_bytes += o.dram_read_bytes;
    dram_write_bytes += o.dram_write_bytes;
    shared_load_wavefronts += o.shared_load_wavefronts;
    shared_store_wavefronts += o.shared_store_wavefronts;
    gpu_time_ns += o.gpu_time_ns;
    return *this;
  }
};

class CuptiCounters {
 public:
  // Null with *why set where counters cannot be collected.
  static std::unique_ptr<CuptiCounters> Create(std::string* why);
  ~CuptiCounters();
  CuptiCounters(const CuptiCounters&) = delete;
  CuptiCounters& operator=(const CuptiCounters&) = delete;

  // Counts the kernels launched from Begin to End on this context. End waits for them; on an
  // error it returns what was counted so far (nothing) with *why set, and later calls fail too.
  bool Begin(std::string* why);
  KernelCounters End(std::string* why);

  // Replay passes the metrics need on this device.
  int passes() const;

 private:
  struct State;
  explicit CuptiCounters(std::unique_ptr<State> s);
  std::unique_ptr<State> s_;
};

}  // namespace mamba::profiling
