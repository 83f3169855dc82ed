// Nsight Compute's raw CSV into the report's measured counters: units converted, ncu's and the
// program's own lines skipped, malformed tables refused with the line and rule.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "profiling/ncu_csv.h"

namespace mamba::profiling {
namespace {

// The shape of `ncu --csv --page raw --print-units base --metrics ...` output, with two kernels
// and units that need converting.
constexpr char kTwoKernels[] =
    "train_bench: cuda backend ...\n"
    "==PROF== Connected to process 4242 (/tmp/bundle/build/train_bench)\n"
    "==PROF== Disconnected from process 4242\n"
    "\"ID\",\"Process ID\",\"Process Name\",\"Host Name\",\"Kernel Name\",\"Context\","
    "\"Stream\",\"dram__bytes_read.sum\",\"dram__bytes_write.sum\","
    "\"gpu__time_duration.sum\","
    "\"l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum\","
    "\"l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum\"\n"
    "\"\",\"\",\"\",\"\",\"\",\"\",\"\",\"byte\",\"Kbyte\",\"usecond\",\"\",\"\"\n"
    "\"0\",\"4242\",\"train_bench\",\"127.0.0.1\",\"void Fwd<float, 2>(Params, int)\",\"1\","
    "\"7\",\"1,048,576\",\"512\",\"20.5\",\"1000\",\"10\"\n"
    "\"1\",\"4242\",\"train_bench\",\"127.0.0.1\",\"Reduce\",\"1\",\"7\",\"4096\",\"1\","
    "\"1.5\",\"0\",\"0\"\n";

TEST(NcuCsv, ReadsTheTableInBaseUnits) {
  auto kernels = ParseNcuCsv(kTwoKernels);
  ASSERT_TRUE(kernels.ok()) << kernels.status();
  ASSERT_EQ(kernels->size(), 2u);
  EXPECT_EQ((*kernels)[0].name, "void Fwd<float, 2>(Params, int)");      // a comma inside quotes
  EXPECT_EQ((*kernels)[0].metrics.at("dram__bytes_read.sum"), 1048576);  // separators dropped
  EXPECT_EQ((*kernels)[0].metrics.at("dram__bytes_write.sum"), 512e3);   // Kbyte
  EXPECT_EQ((*kernels)[0].metrics.at("gpu__time_duration.sum"), 20500);  // usecond -> ns
  EXPECT_EQ((*kernels)[0].metrics.count("Stream"), 0u);                  // not a metric
  auto m = SumNcuKernels(*kernels);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->dram_read_bytes, 1048576 + 4096);
  EXPECT_EQ(m->dram_write_bytes, 512e3 + 1e3);
  EXPECT_EQ(m->shared_bytes, 128 * 1010);
  EXPECT_DOUBLE_EQ(m->gpu_time_ms, 0.022);
}

TEST(NcuCsv, RefusesWhatIsNotItsTable) {
  auto none = ParseNcuCsv("==PROF== No kernels were profiled.\n");
  ASSERT_FALSE(none.ok());
  EXPECT_NE(std::string(none.status().message()).find("no table header"), std::string::npos);

  std::string short_row = kTwoKernels;
  short_row += "\"2\",\"4242\"\n";
  auto bad = ParseNcuCsv(short_row);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("line 8: 2 fields, the header has 12"),
            std::string::npos)
      << bad.status();

  std::string text = kTwoKernels;
  text.replace(text.find("\"4096\""), 6, "\"n/a\"");
  auto nan = ParseNcuCsv(text);
  ASSERT_FALSE(nan.ok());
  EXPECT_NE(std::string(nan.status().message()).find("dram__bytes_read.sum is \"n/a\""),
            std::string::npos)
      << nan.status();

  NcuKernel partial{"k", {{"dram__bytes_read.sum", 1}}};
  auto missing = SumNcuKernels({partial});
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(std::string(missing.status().message()).find("k lacks dram__bytes_write.sum"),
            std::string::npos);
}

std::string ReadFixture(const std::string& name) {
  std::ifstream in(std::string(MAMBA_NCU_FIXTURES) + "/" + name);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// Nsight Compute 2025's output on an H100 (scripts/profile.sh, Mamba-130M's shapes at 2 layers,
// batch 8 x 2048, bf16): its warnings and the program's lines before the table, every device
// attribute of the raw page beside the counters (some of them words: "No-CC"), NVTX range
// columns full of quotes and commas. The expected sums were added up from the file by hand.
TEST(NcuCsv, ReadsARecordedForwardProfile) {
  const std::string text = ReadFixture("selective_scan_fwd_h100.csv");
  ASSERT_FALSE(text.empty()) << "fixture missing";
  auto kernels = ParseNcuCsv(text);
  ASSERT_TRUE(kernels.ok()) << kernels.status();
  ASSERT_EQ(kernels->size(), 2u);  // one forward scan a layer
  for (const NcuKernel& k : *kernels) {
    EXPECT_NE(k.name.find("TiledScanKernel"), std::string::npos) << k.name;
    EXPECT_EQ(k.metrics.count("device__attribute_confidential_computing_mode"), 0u);
  }
  EXPECT_EQ((*kernels)[0].metrics.at("dram__bytes_read.sum"), 153094656);
  auto m = SumNcuKernels(*kernels);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->dram_read_bytes, 306193920);
  EXPECT_EQ(m->dram_write_bytes, 86257152);
  EXPECT_EQ(m->shared_bytes, 128.0 * (66187693 + 14157312));
  EXPECT_NEAR(m->gpu_time_ms, 0.400864, 1e-9);
}

TEST(NcuCsv, ReadsARecordedBackwardProfile) {
  auto kernels = ParseNcuCsv(ReadFixture("selective_scan_bwd_h100.csv"));
  ASSERT_TRUE(kernels.ok()) << kernels.status();
  // A layer's backward: the pre-pass, the segment composition, the main pass, the reductions.
  ASSERT_EQ(kernels->size(), 8u);
  EXPECT_NE((*kernels)[1].name.find("ScanComposeKernel"), std::string::npos);
  EXPECT_NE((*kernels)[3].name.find("TiledReduceBCKernel"), std::string::npos);
  auto m = SumNcuKernels(*kernels);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->dram_read_bytes, 1258583040);
  EXPECT_EQ(m->dram_write_bytes, 679961856);
  EXPECT_EQ(m->shared_bytes, 128.0 * (187351742 + 63209522));
  EXPECT_NEAR(m->gpu_time_ms, 1.829856, 1e-9);
}

TEST(NcuCsv, AWordWhereACounterShouldBeIsRefused) {
  std::string text = ReadFixture("selective_scan_fwd_h100.csv");
  const size_t at = text.find("\"153,094,656\"");
  ASSERT_NE(at, std::string::npos);
  text.replace(at, 13, "\"No-CC\"");
  auto bad = ParseNcuCsv(text);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("dram__bytes_read.sum is \"No-CC\""),
            std::string::npos)
      << bad.status();
}

}  // namespace
}  // namespace mamba::profiling
