// The training loop learns: on a small learnable task the loss falls well below its start, and a
// run repeated gives bit-identical losses.
#include <gtest/gtest.h>

#include <sstream>

#include "worker/job_spec.h"
#include "worker/trainer.h"

namespace mamba {
namespace {

absl::StatusOr<TrainSummary> Train(const std::string& json) {
  auto spec = ParseJobSpecJson(json);
  if (!spec.ok()) return spec.status();
  auto trainer = Trainer::Create(*spec);
  if (!trainer.ok()) return trainer.status();
  std::ostringstream log;
  return (*trainer)->Run(log);
}

constexpr char kInduction[] = R"({
  "data": {"inductionHeads": {"seqLen": 32}},
  "model": {"dModel": 32, "nLayer": 2},
  "steps": 60, "batchSize": 16, "logEvery": 10,
  "optimizer": {"lr": 0.003}, "eval": {"batches": 2, "seqLens": [32, 64]}
})";

TEST(Trainer, LossFallsOnInductionHeads) {
  auto s = Train(kInduction);
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_EQ(s->losses.size(), 60u);
  // Chance level is log(15) = 2.71 for the answer token; the model must do better than that.
  EXPECT_GT(s->first_loss, 2.0);
  EXPECT_LT(s->final_loss, s->first_loss - 0.3);
  ASSERT_EQ(s->evals.size(), 2u);
  EXPECT_EQ(s->evals[1].seq_len, 64);
}

TEST(Trainer, RepeatedRunIsBitIdentical) {
  auto a = Train(kInduction);
  auto b = Train(kInduction);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->losses, b->losses);
}

TEST(Trainer, FormatsDurations) {
  EXPECT_EQ(FormatDuration(5), "5s");
  EXPECT_EQ(FormatDuration(185), "3m05s");
  EXPECT_EQ(FormatDuration(3720), "1h02m");
}

}  // namespace
}  // namespace mamba
