#include "profiling/ncu_csv.h"

#include <algorithm>
#include <cstdlib>
#include <iterator>

#include "absl/strings/str_cat.h"

namespace mamba::profiling {

namespace {

// One CSV line's fields ("a","b,c","" -> a | b,c | ""), quotes doubled inside fields.
std::vector<std::string> SplitCsv(std::string_view line) {
  std::vector<std::string> fields;
  std::string cur;
  bool quoted = false;
  for (size_t i = 0; i < line.size(); ++i) {
    const char ch = line[i];
    if (quoted) {
      if (ch == '"' && i + 1 < line.size() && line[i + 1] == '"') {
        cur += '"';
        ++i;
      } else if (ch == '"') {
        quoted = false;
      } else {
        cur += ch;
      }
    } else if (ch == '"') {
      quoted = true;
    } else if (ch == ',') {
      fields.push_back(std::move(cur));
      cur.clear();
    } else if (ch != '\r') {
      cur += ch;
    }
  }
  fields.push_back(std::move(cur));
  return fields;
}

// The factor to base units (bytes, nanoseconds) of an ncu unit; counts have none.
double UnitScale(std::string_view unit) {
  static const std::pair<const char*, double> kUnits[] = {
      {"byte", 1},     {"Kbyte", 1e3},   {"Mbyte", 1e6},   {"Gbyte", 1e9},
      {"Tbyte", 1e12}, {"KB", 1e3},      {"MB", 1e6},      {"GB", 1e9},
      {"nsecond", 1},  {"usecond", 1e3}, {"msecond", 1e6}, {"second", 1e9},
      {"ns", 1},       {"us", 1e3},      {"ms", 1e6},      {"s", 1e9}};
  for (const auto& [name, scale] : kUnits) {
    if (unit == name) return scale;
  }
  return 1;
}

bool IsCounterMetric(std::string_view column) {
  return std::find(std::begin(kCounterMetrics), std::end(kCounterMetrics), column) !=
         std::end(kCounterMetrics);
}

}  // namespace

absl::StatusOr<std::vector<NcuKernel>> ParseNcuCsv(std::string_view text) {
  std::vector<std::string_view> lines;
  for (size_t start = 0; start <= text.size();) {
    const size_t end = std::min(text.find('\n', start), text.size());
    lines.push_back(text.substr(start, end - start));
    start = end + 1;
  }
  size_t header = lines.size();
  for (size_t i = 0; i < lines.size(); ++i) {
    if (lines[i].rfind("\"ID\",", 0) == 0 && lines[i].find("\"Kernel Name\"") != lines[i].npos) {
      header = i;
      break;
    }
  }
  if (header == lines.size()) {
    return absl::InvalidArgumentError(
        "ncu csv: no table header (a line starting \"ID\", with \"Kernel Name\"): run ncu with "
        "--csv --page raw");
  }
  const std::vector<std::string> columns = SplitCsv(lines[header]);
  int name_col = -1;
  for (size_t c = 0; c < columns.size(); ++c) {
    if (columns[c] == "Kernel Name") name_col = static_cast<int>(c);
  }
  // The units row (its ID empty) follows the header in ncu's raw page.
  std::vector<double> scale(columns.size(), 1.0);
  size_t first = header + 1;
  if (first < lines.size()) {
    const std::vector<std::string> units = SplitCsv(lines[first]);
    if (!units.empty() && units[0].empty()) {
      for (size_t c = 0; c < units.size() && c < columns.size(); ++c)
        scale[c] = UnitScale(units[c]);
      ++first;
    }
  }
  std::vector<NcuKernel> kernels;
  for (size_t i = first; i < lines.size(); ++i) {
    if (lines[i].empty() || lines[i][0] != '"') break;  // the table ends; program output follows
    const std::vector<std::string> fields = SplitCsv(lines[i]);
    if (fields.size() != columns.size()) {
      return absl::InvalidArgumentError(absl::StrCat("ncu csv line ", i + 1, ": ", fields.size(),
                                                     " fields, the header has ", columns.size()));
    }
    NcuKernel k;
    k.name = fields[name_col];
    for (size_t c = 0; c < columns.size(); ++c) {
      // Metrics are the dotted counter names; their values may carry thousands separators. The
      // raw page also lists device attributes, some of them words ("No-CC"): only the counters
      // the report reads must be numbers.
      if (columns[c].find("__") == std::string::npos) continue;
      std::string digits;
      for (char ch : fields[c]) {
        if (ch != ',') digits += ch;
      }
      char* end = nullptr;
      const double v = std::strtod(digits.c_str(), &end);
      if (!digits.empty() && end == digits.c_str() + digits.size()) {
        k.metrics[columns[c]] = v * scale[c];
      } else if (IsCounterMetric(columns[c])) {
        return absl::InvalidArgumentError(absl::StrCat("ncu csv line ", i + 1, ": ", columns[c],
                                                       " is \"", fields[c], "\", not a number"));
      }
    }
    kernels.push_back(std::move(k));
  }
  return kernels;
}

absl::StatusOr<Measured> SumNcuKernels(const std::vector<NcuKernel>& kernels) {
  KernelCounters total;
  for (const NcuKernel& k : kernels) {
    double v[kNumCounterMetrics];
    for (int m = 0; m < kNumCounterMetrics; ++m) {
      const auto it = k.metrics.find(kCounterMetrics[m]);
      if (it == k.metrics.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("ncu csv: kernel ", k.name, " lacks ", kCounterMetrics[m]));
      }
      v[m] = it->second;
    }
    total += KernelCounters{1, v[0], v[1], v[2], v[3], v[4]};
  }
  return MeasuredOf(total);
}

}  // namespace mamba::profiling
