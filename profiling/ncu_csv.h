// Nsight Compute's raw CSV (ncu --csv --page raw --metrics ...), read into the report's measured
// counters: the cross-check of the in-process CUPTI counters (scripts/profile.sh). The file may
// hold ncu's own lines (==PROF== ...) and the program's output around the table; values are
// converted to bytes and milliseconds by the units row.
#pragma once

#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "profiling/report.h"

namespace mamba::profiling {

struct NcuKernel {
  std::string name;
  std::map<std::string, double> metrics;  // in base units: bytes, nanoseconds, counts
};

// The table's rows; INVALID_ARGUMENT naming the line and rule where it is not ncu's raw CSV.
absl::StatusOr<std::vector<NcuKernel>> ParseNcuCsv(std::string_view text);

// The kernels' counters summed (every one of kCounterMetrics must be present).
absl::StatusOr<Measured> SumNcuKernels(const std::vector<NcuKernel>& kernels);

}  // namespace mamba::profiling
