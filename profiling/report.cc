#include "profiling/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"

namespace mamba::profiling {
namespace {

struct Derived {
  double gbps = 0, pct_bw = 0, bound_flops = 0, pct_roofline = 0;
};

Derived Derive(const KernelRow& k, const Peaks& p) {
  Derived d;
  const double s = k.time_ms / 1e3;
  if (s <= 0) return d;
  d.gbps = k.model.bytes() / s / 1e9;
  d.pct_bw = p.bandwidth_gbps > 0 ? 100 * d.gbps / p.bandwidth_gbps : 0;
  // The roofline: what a kernel of this intensity can reach at most.
  d.bound_flops = std::min(p.flops, k.model.intensity() * p.bandwidth_gbps * 1e9);
  // Share of that bound reached: by FLOPs where the kernel computes, by bytes where it only moves.
  const double achieved = k.model.flops > 0 ? k.model.flops / s : 0;
  d.pct_roofline =
      d.bound_flops > 0 && k.model.flops > 0 ? 100 * achieved / d.bound_flops : d.pct_bw;
  return d;
}

std::string Fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.*f", digits, v);
  return buf;
}

}  // namespace

Report AssembleReport(const ProfiledRun& run, const Peaks& peaks) {
  Report report;
  report.peaks = peaks;
  report.counters_note = run.counters_note;
  const int64_t steps = std::max<int64_t>(run.steps, 1);
  double op_total = 0, step_flops = 0;
  for (const auto& [op, ms] : run.op_ms) {
    KernelRow row;
    row.name = op;
    row.time_ms = ms;
    if (const auto it = run.model.find(op); it != run.model.end()) {
      row.calls = it->second.calls * steps;
      for (int64_t i = 0; i < steps; ++i) row.model += it->second.traffic;
      row.sram_bytes = it->second.sram_bytes * steps;
    }
    if (const auto it = run.measured_per_step.find(op); it != run.measured_per_step.end()) {
      const Measured& m = it->second;
      row.measured = Measured{m.dram_read_bytes * steps, m.dram_write_bytes * steps,
                              m.shared_bytes * steps, m.gpu_time_ms * steps};
    }
    report.kernels.push_back(row);
    op_total += ms;
    report.step.split_ms[PhaseOf(op)] += ms / steps;
  }
  for (const auto& [op, m] : run.model) step_flops += m.traffic.flops;
  report.step.split_ms["host/idle"] = std::max(0.0, run.seconds * 1e3 - op_total) / steps;
  report.step.tokens_per_s = run.tokens_per_step * steps / std::max(run.seconds, 1e-9);
  report.step.model_flops_per_token = step_flops / std::max(run.tokens_per_step, 1.0);
  return report;
}

absl::Status WriteReport(const Report& r, const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  const std::pair<const char*, std::string> files[] = {
      {"profile.json", ReportJson(r).dump(2) + "\n"},
      {"profile.md", ReportMarkdown(r)},
      {"profile.svg", ReportSvg(r)}};
  for (const auto& [name, text] : files) {
    std::ofstream out(dir + "/" + name);
    out << text;
    if (!out) return absl::InternalError(absl::StrCat("profile: cannot write ", dir, "/", name));
  }
  return absl::OkStatus();
}

nlohmann::json ReportJson(const Report& r) {
  nlohmann::json j;
  j["peaks"] = {{"bandwidth_gbps", r.peaks.bandwidth_gbps},
                {"flops", r.peaks.flops},
                {"device", r.peaks.device}};
  if (!r.counters_note.empty()) j["counters"] = r.counters_note;
  j["kernels"] = nlohmann::json::array();
  for (const KernelRow& k : r.kernels) {
    const Derived d = Derive(k, r.peaks);
    nlohmann::json e = {{"name", k.name},
                        {"calls", k.calls},
                        {"time_ms", k.time_ms},
                        {"hbm_read_bytes", k.model.read_bytes},
                        {"hbm_write_bytes", k.model.write_bytes},
                        {"sram_bytes", k.sram_bytes},
                        {"flops", k.model.flops},
                        {"achieved_gbps", d.gbps},
                        {"pct_peak_bw", d.pct_bw},
                        {"intensity", k.model.intensity()},
                        {"pct_roofline", d.pct_roofline}};
    if (k.measured) {
      e["measured"] = {{"dram_read_bytes", k.measured->dram_read_bytes},
                       {"dram_write_bytes", k.measured->dram_write_bytes},
                       {"shared_bytes", k.measured->shared_bytes},
                       {"gpu_time_ms", k.measured->gpu_time_ms}};
    }
    j["kernels"].push_back(e);
  }
  const double model_flops = r.step.tokens_per_s * r.step.model_flops_per_token;
  j["step"] = {{"tokens_per_s", r.step.tokens_per_s},
               {"model_flops_per_s", model_flops},
               {"mfu", r.peaks.flops > 0 ? model_flops / r.peaks.flops : 0},
               {"split", r.step.split_ms}};
  return j;
}

std::string ReportMarkdown(const Report& r) {
  std::string md = "# Profile\n\n";
  md += "Peaks (measured on " + (r.peaks.device.empty() ? "this device" : r.peaks.device) +
        "): " + Fixed(r.peaks.bandwidth_gbps, 0) + " GB/s, " + Fixed(r.peaks.flops / 1e12, 1) +
        " TFLOP/s.\n\n";
  if (!r.counters_note.empty()) md += "Counters: " + r.counters_note + "\n\n";
  md += "| kernel | calls | ms | GB (model) | GB/s | % peak BW | FLOP/B | % roofline |";
  md += " DRAM GB (measured) | shared GB (model) | shared GB (measured) |\n";
  md += "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
  std::vector<KernelRow> rows = r.kernels;
  std::sort(rows.begin(), rows.end(),
            [](const KernelRow& a, const KernelRow& b) { return a.time_ms > b.time_ms; });
  for (const KernelRow& k : rows) {
    const Derived d = Derive(k, r.peaks);
    md += "| " + k.name + " | " + std::to_string(k.calls) + " | " + Fixed(k.time_ms, 3) + " | " +
          Fixed(k.model.bytes() / 1e9, 3) + " | " + Fixed(d.gbps, 1) + " | " + Fixed(d.pct_bw, 1) +
          " | " + Fixed(k.model.intensity(), 2) + " | " + Fixed(d.pct_roofline, 1) + " | " +
          (k.measured ? Fixed((k.measured->dram_read_bytes + k.measured->dram_write_bytes) / 1e9, 3)
                      : std::string("-")) +
          " | " + (k.sram_bytes > 0 ? Fixed(k.sram_bytes / 1e9, 3) : std::string("-")) + " | " +
          (k.measured ? Fixed(k.measured->shared_bytes / 1e9, 3) : std::string("-")) + " |\n";
  }
  const nlohmann::json step = ReportJson(r)["step"];
  md += "\nStep: " + Fixed(r.step.tokens_per_s, 0) + " tokens/s, " +
        Fixed(step["model_flops_per_s"].get<double>() / 1e12, 2) + " TFLOP/s of model FLOPs, MFU " +
        Fixed(100 * step["mfu"].get<double>(), 1) + " %.\n\n| phase | ms |\n| --- | --- |\n";
  for (const auto& [phase, ms] : r.step.split_ms)
    md += "| " + phase + " | " + Fixed(ms, 3) + " |\n";
  return md;
}

std::string ReportSvg(const Report& r) {
  // Left: a bar a kernel (time); right: log-log roofline, a point a kernel.
  const int bar_h = 18, left = 180, bars_w = 320, plot_x = left + bars_w + 80, plot_w = 360;
  const int n = static_cast<int>(r.kernels.size());
  const int height = std::max(300, 40 + n * bar_h + 40);
  std::string svg = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" +
                    std::to_string(plot_x + plot_w + 40) + "\" height=\"" + std::to_string(height) +
                    "\" font-family=\"sans-serif\" font-size=\"11\">\n";
  svg += "<text x=\"10\" y=\"20\" font-size=\"14\">time per kernel (ms)</text>\n";
  double max_ms = 0;
  for (const KernelRow& k : r.kernels) max_ms = std::max(max_ms, k.time_ms);
  for (int i = 0; i < n; ++i) {
    const KernelRow& k = r.kernels[i];
    const int y = 34 + i * bar_h;
    const double w = max_ms > 0 ? bars_w * k.time_ms / max_ms : 0;
    svg += "<text x=\"" + std::to_string(left - 6) + "\" y=\"" + std::to_string(y + 12) +
           "\" text-anchor=\"end\">" + k.name + "</text>\n";
    svg += "<rect x=\"" + std::to_string(left) + "\" y=\"" + std::to_string(y) + "\" width=\"" +
           Fixed(w, 1) + "\" height=\"" + std::to_string(bar_h - 4) +
           "\" fill=\"#4878a8\"><title>" + k.name + ": " + Fixed(k.time_ms, 3) +
           " ms</title></rect>\n";
  }
  // Roofline axes: intensity 1e-2 .. 1e4 FLOP/B, performance over 6 decades below the peak.
  const double peak = std::max(r.peaks.flops, 1.0), top = std::log10(peak) + 0.5;
  const int plot_y = 34, plot_h = height - 80;
  const auto px = [&](double intensity) {
    return plot_x + plot_w * (std::log10(std::max(intensity, 1e-2)) + 2) / 6;
  };
  const auto py = [&](double flops) {
    return plot_y + plot_h * (top - std::log10(std::max(flops, peak * 1e-6))) / 6.5;
  };
  svg += "<text x=\"" + std::to_string(plot_x) +
         "\" y=\"20\" font-size=\"14\">roofline (FLOP/s vs FLOP/byte)</text>\n";
  svg += "<rect x=\"" + std::to_string(plot_x) + "\" y=\"" + std::to_string(plot_y) +
         "\" width=\"" + std::to_string(plot_w) + "\" height=\"" + std::to_string(plot_h) +
         "\" fill=\"none\" stroke=\"#999\"/>\n";
  // The bound: bandwidth x intensity up to the ridge, then flat.
  std::string roof;
  for (int s = 0; s <= 60; ++s) {
    const double i = std::pow(10.0, -2 + s * 0.1);
    const double b = std::min(peak, i * r.peaks.bandwidth_gbps * 1e9);
    roof += (s ? " L" : "M") + Fixed(px(i), 1) + " " + Fixed(py(b), 1);
  }
  svg += "<path d=\"" + roof + "\" fill=\"none\" stroke=\"#c44\"/>\n";
  for (const KernelRow& k : r.kernels) {
    if (k.time_ms <= 0 || k.model.flops <= 0) continue;
    const double achieved = k.model.flops / (k.time_ms / 1e3);
    svg += "<circle cx=\"" + Fixed(px(k.model.intensity()), 1) + "\" cy=\"" +
           Fixed(py(achieved), 1) + "\" r=\"4\" fill=\"#4878a8\"><title>" + k.name +
           "</title></circle>\n";
  }
  svg += "</svg>\n";
  return svg;
}

}  // namespace mamba::profiling
