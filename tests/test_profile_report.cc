// The profiling report from kernel rows: the JSON fields and the roofline arithmetic, the tables,
// the picture; counters absent and said so.
#include <gtest/gtest.h>

#include "profiling/report.h"

namespace mamba::profiling {
namespace {

Report Sample() {
  Report r;
  r.peaks = {3000, 800e12, "test device"};
  // A bandwidth-bound kernel: 3 GB in 2 ms = 1,500 GB/s (50 % of the peak); intensity 0.5.
  KernelRow scan;
  scan.name = "selective_scan_fwd";
  scan.calls = 4;
  scan.time_ms = 2;
  scan.model.read_bytes = 2e9;
  scan.model.write_bytes = 1e9;
  scan.model.flops = 1.5e9;
  // A compute-bound one: 400 TFLOP/s achieved against 800.
  KernelRow gemm;
  gemm.name = "linear_fwd";
  gemm.calls = 8;
  gemm.time_ms = 1;
  gemm.model.read_bytes = 1e8;
  gemm.model.write_bytes = 1e8;
  gemm.model.flops = 4e11;
  gemm.measured = Measured{1.1e8, 0.9e8, 0};
  r.kernels = {scan, gemm};
  r.step.tokens_per_s = 1e6;
  r.step.model_flops_per_token = 8e8;
  r.step.split_ms = {{"gemm", 1.0}, {"scan", 2.0}};
  r.counters_note = "not collected: no GPU";
  return r;
}

TEST(ProfileReport, JsonHasTheFieldsAndTheRooflineArithmetic) {
  const nlohmann::json j = ReportJson(Sample());
  ASSERT_EQ(j["kernels"].size(), 2u);
  const auto& scan = j["kernels"][0];
  for (const char* field :
       {"name", "calls", "time_ms", "hbm_read_bytes", "hbm_write_bytes", "sram_bytes", "flops",
        "achieved_gbps", "pct_peak_bw", "pct_roofline"}) {
    EXPECT_TRUE(scan.contains(field)) << field;
  }
  EXPECT_DOUBLE_EQ(scan["achieved_gbps"].get<double>(), 1500);
  EXPECT_DOUBLE_EQ(scan["pct_peak_bw"].get<double>(), 50);
  // Bound at intensity 0.5: 0.5 x 3 TB/s = 1.5 TFLOP/s; achieved 0.75 TFLOP/s: 50 %.
  EXPECT_DOUBLE_EQ(scan["pct_roofline"].get<double>(), 50);
  EXPECT_FALSE(scan.contains("measured"));
  const auto& gemm = j["kernels"][1];
  EXPECT_DOUBLE_EQ(gemm["pct_roofline"].get<double>(), 50);  // 400 of 800 TFLOP/s
  EXPECT_DOUBLE_EQ(gemm["measured"]["dram_read_bytes"].get<double>(), 1.1e8);
  EXPECT_DOUBLE_EQ(j["step"]["mfu"].get<double>(), 1e6 * 8e8 / 800e12);
  EXPECT_EQ(j["counters"], "not collected: no GPU");
}

TEST(ProfileReport, TablesAndPicture) {
  const std::string md = ReportMarkdown(Sample());
  EXPECT_NE(md.find("| selective_scan_fwd | 4 | 2.000 | 3.000 | 1500.0 | 50.0 | 0.50 | 50.0 | - |"),
            std::string::npos)
      << md;
  EXPECT_NE(md.find("Counters: not collected: no GPU"), std::string::npos);
  EXPECT_LT(md.find("selective_scan_fwd"), md.find("linear_fwd"));  // slowest first
  const std::string svg = ReportSvg(Sample());
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
  size_t rects = 0, circles = 0;
  for (size_t p = svg.find("<rect"); p != std::string::npos; p = svg.find("<rect", p + 1)) ++rects;
  for (size_t p = svg.find("<circle"); p != std::string::npos; p = svg.find("<circle", p + 1)) {
    ++circles;
  }
  EXPECT_EQ(rects, 3u);  // a bar a kernel and the plot's frame
  EXPECT_EQ(circles, 2u);
}

}  // namespace
}  // namespace mamba::profiling
