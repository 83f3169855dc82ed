// The profiling report of a job: per kernel its time, the traffic model's bytes and FLOPs, the
// counters measured where they were collected, and what they imply against the device's measured
// peaks (achieved GB/s, % of peak bandwidth, arithmetic intensity, % of the roofline bound
// min(peak FLOP/s, intensity x bandwidth)); per step tokens/s, model FLOP/s, MFU and the time
// split. Written as profile.json (the fields issue 16 names), profile.md (tables) and profile.svg
// (time per kernel, and a roofline with each kernel as a point).
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "nlohmann/json.hpp"
#include "profiling/cupti_counters.h"
#include "profiling/step_model.h"
#include "profiling/traffic_model.h"

namespace mamba::profiling {

struct Peaks {
  double bandwidth_gbps = 0;  // measured copy bandwidth, read + write
  double flops = 0;           // measured GEMM FLOP/s
  std::string device;         // what was measured
};

// Counters collected for a kernel (CUPTI or Nsight Compute), when they were.
struct Measured {
  double dram_read_bytes = 0, dram_write_bytes = 0, shared_bytes = 0;
  double gpu_time_ms = 0;  // the counted kernels' duration under the profiler
};

// Counters as the report shows them (shared bytes from wavefronts, milliseconds), times `scale`
// (1 / counted steps: per step).
inline Measured MeasuredOf(const KernelCounters& k, double scale = 1) {
  return Measured{k.dram_read_bytes * scale, k.dram_write_bytes * scale, k.shared_bytes() * scale,
                  k.gpu_time_ns * 1e-6 * scale};
}

struct KernelRow {
  std::string name;
  int64_t calls = 0;
  double time_ms = 0;     // over the profiled steps, summed
  Traffic model;          // over the same calls, summed
  double sram_bytes = 0;  // the model's shared-memory bytes, over the same calls
  std::optional<Measured> measured;
};

struct StepStats {
  double tokens_per_s = 0;
  double model_flops_per_token = 0;        // 6 x parameters + the scan's, as the job computes it
  std::map<std::string, double> split_ms;  // GEMM, scan, conv, norms, loss, optimizer, ...
};

struct Report {
  std::vector<KernelRow> kernels;
  Peaks peaks;
  StepStats step;
  // Why counters are absent, when they are (no GPU, no rights to the profiler, ...).
  std::string counters_note;
};

// What a profiled run gives: the traffic model of one step; each op's time summed over `steps`
// timed steps; each op's counters per step where they were collected (else why not).
struct ProfiledRun {
  std::map<std::string, OpModel> model;
  std::map<std::string, double> op_ms;
  int64_t steps = 0;
  double seconds = 0;  // wall time of the timed steps
  double tokens_per_step = 0;
  std::map<std::string, Measured> measured_per_step;
  std::string counters_note;
};

// The report's rows (ops joined with their model and counters), the step's speed and split.
Report AssembleReport(const ProfiledRun& run, const Peaks& peaks);

// The report as profile.json.
nlohmann::json ReportJson(const Report& r);
// The tables (markdown).
std::string ReportMarkdown(const Report& r);
// Time per kernel (bars) and the roofline (kernels as points on log axes), one SVG.
std::string ReportSvg(const Report& r);

// profile.json, profile.md and profile.svg in `dir` (made if missing).
absl::Status WriteReport(const Report& r, const std::string& dir);

}  // namespace mamba::profiling
