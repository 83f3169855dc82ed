// Hardware counters through CUPTI (profiling/cupti_counters.h) on the CUDA backend's ops. On a
// GPU whose counters this process may read: an fp32 -> bf16 conversion of 64 Mi elements must
// read about 4 bytes and write about 2 bytes an element from DRAM (within 10 %), and count as
// one kernel; repeated counting keeps working. Where counters cannot be read (no GPU, no rights,
// no CUPTI) the backend says why instead of failing, and the ops still run.
#include <gtest/gtest.h>

#include <string>

#include "profiling/cupti_counters.h"
#include "worker/backend.h"

namespace mamba {
namespace {

TEST(CudaCounters, WithoutADeviceCountingSaysWhy) {
  if (CudaDeviceCount() > 0) GTEST_SKIP() << "a CUDA device is present";
  std::string why;
  EXPECT_EQ(profiling::CuptiCounters::Create(&why), nullptr);
  EXPECT_FALSE(why.empty());
}

TEST(CudaCounters, AConversionReadsAndWritesWhatItMust) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  auto gpu = MakeCudaBackend();
  const int64_t n = int64_t{64} << 20;
  Tensor src = gpu->Empty({n}, DType::kF32), dst = gpu->Empty({n}, DType::kBF16);
  gpu->Zero(src);
  if (const std::string why = gpu->EnableOpCounters({"convert"}); !why.empty()) {
    GTEST_SKIP() << "counters not readable here: " << why;
  }
  for (int round = 0; round < 3; ++round) {
    SCOPED_TRACE(round);
    gpu->Convert(src, dst);
    gpu->Zero(dst);  // not counted: not a named op
    std::string why;
    const auto counted = gpu->TakeOpCounters(&why);
    ASSERT_TRUE(why.empty()) << why;
    ASSERT_EQ(counted.size(), 1u);
    EXPECT_EQ(counted[0].first, "convert");
    const profiling::KernelCounters& k = counted[0].second;
    EXPECT_EQ(k.kernels, 1);
    EXPECT_NEAR(k.dram_read_bytes / (4.0 * n), 1.0, 0.1) << k.dram_read_bytes;
    EXPECT_NEAR(k.dram_write_bytes / (2.0 * n), 1.0, 0.1) << k.dram_write_bytes;
    EXPECT_GT(k.gpu_time_ns, 0);
  }
  gpu->DisableOpCounters();
  gpu->Convert(src, dst);
  std::string why;
  EXPECT_TRUE(gpu->TakeOpCounters(&why).empty());
}

}  // namespace
}  // namespace mamba
