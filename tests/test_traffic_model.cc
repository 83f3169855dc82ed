// The traffic model's bytes and FLOPs against values worked out by hand.
#include <gtest/gtest.h>

#include "profiling/traffic_model.h"

namespace mamba::profiling {
namespace {

TEST(TrafficModel, ScanMatchesDesignsHbmFloors) {
  // DESIGN.md: forward (4 B D L + 2 B N L) elements, backward (7 B D L + 4 B N L), G = 1; the
  // parameters (A: 1536 x 16, D_skip and dt_bias: 1536, fp32) on top.
  const ScanShape s{8, 2048, 1536, 16, 1};
  const double bdl = 8.0 * 1536 * 2048, bnl = 8.0 * 16 * 2048,
               params = 4.0 * (1536 * 16 + 2 * 1536);
  const Traffic f = ScanForward(s, 2);
  EXPECT_DOUBLE_EQ(f.bytes(), (4 * bdl + 2 * bnl) * 2 + params);
  EXPECT_DOUBLE_EQ(f.read_bytes, (3 * bdl + 2 * bnl) * 2 + params);
  EXPECT_DOUBLE_EQ(f.special, bdl * 16);  // one exponential a state and step
  EXPECT_DOUBLE_EQ(f.flops, bdl * (6 * 16 + 10));
  const Traffic b = ScanBackward(s, 4);
  EXPECT_DOUBLE_EQ(b.bytes(), (7 * bdl + 4 * bnl) * 4 + 2 * params);
  EXPECT_DOUBLE_EQ(b.special, 2 * bdl * 16);
  // 8 x 2048 x 1536 bf16: 202,375,168 bytes of activations (~0.067 ms at 3.0 TB/s).
  EXPECT_DOUBLE_EQ((4 * bdl + 2 * bnl) * 2, 202375168.0);
}

TEST(TrafficModel, ScanSharedMemoryFollowsTheTiling) {
  // N = 16 runs the tiled kernels: 224 B (forward) and 576 B (backward) a (b, l, d).
  const ScanShape s{2, 1024, 64, 16, 1};
  EXPECT_DOUBLE_EQ(ScanForwardSramBytes(s), 224.0 * 2 * 1024 * 64);  // 29,360,128
  EXPECT_DOUBLE_EQ(ScanBackwardSramBytes(s), 576.0 * 2 * 1024 * 64);
  EXPECT_DOUBLE_EQ(ScanForwardSramBytes({2, 1024, 64, 8, 1}), 0);  // untiled: registers
}

TEST(TrafficModel, GemmConvAndNorm) {
  // x (2048, 768) bf16 times w (1536, 768) bf16 into y (2048, 1536) bf16.
  const Traffic g = GemmForward(2048, 1536, 768, 2, 2, 2);
  EXPECT_DOUBLE_EQ(g.read_bytes, 2048.0 * 768 * 2 + 1536.0 * 768 * 2);
  EXPECT_DOUBLE_EQ(g.write_bytes, 2048.0 * 1536 * 2);
  EXPECT_DOUBLE_EQ(g.flops, 2.0 * 2048 * 1536 * 768);
  EXPECT_NEAR(g.intensity(),
              2.0 * 2048 * 1536 * 768 / (2.0 * (2048 * 768 + 1536 * 768 + 2048 * 1536)), 1e-9);
  const Traffic gb = GemmBackward(2048, 1536, 768, 2, 2);
  EXPECT_DOUBLE_EQ(gb.flops, 4.0 * 2048 * 1536 * 768);
  EXPECT_DOUBLE_EQ(gb.write_bytes, 2048.0 * 768 * 2 + 1536.0 * 768 * 4);
  // conv: 4 taps over (2, 100, 64) fp32: x in, y out, weight 64 x 4 and bias 64.
  const Traffic c = Conv1dForward(2, 100, 64, 4, 4);
  EXPECT_DOUBLE_EQ(c.read_bytes, 2 * 100 * 64 * 4 + 4 * 64 * 5);
  EXPECT_DOUBLE_EQ(c.write_bytes, 2 * 100 * 64 * 4);
  EXPECT_DOUBLE_EQ(c.flops, 2 * 100 * 64 * 12.0);
  // norm: 10 rows of 768, bf16 x and y, fp32 residual in and out, weight and rstd.
  const Traffic n = AddRmsNormForward(10, 768, 2);
  EXPECT_DOUBLE_EQ(n.read_bytes, 7680 * 4 + 7680 * 2 + 768 * 4);
  EXPECT_DOUBLE_EQ(n.write_bytes, 7680 * 4 + 7680 * 2 + 10 * 4);
  Traffic sum = g;
  sum += c;
  EXPECT_DOUBLE_EQ(sum.flops, g.flops + c.flops);
}

}  // namespace
}  // namespace mamba::profiling
