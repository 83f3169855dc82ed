// Resuming from step k and training to n gives bit-identical parameters and losses to an
// uninterrupted run to n (CPU backend); a resumed job must match the checkpoint's spec.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <sstream>

#include "worker/job_spec.h"
#include "worker/trainer.h"

namespace mamba {
namespace {

namespace fs = std::filesystem;

std::string Job(const std::string& checkpoint, uint64_t seed = 3) {
  return R"({"data": {"inductionHeads": {"seqLen": 32}}, "model": {"dModel": 16, "nLayer": 2},
             "steps": 6, "batchSize": 4, "logEvery": 2, "seed": )" +
         std::to_string(seed) +
         R"(, "schedule": {"warmupSteps": 2}, "optimizer": {"lr": 0.01},
             "eval": {"batches": 0}, "checkpoint": {)" +
         checkpoint + "}}";
}

struct Run {
  std::vector<std::vector<float>> params;
  std::vector<double> losses;
  int64_t start_step = 0;
};

absl::StatusOr<Run> Train(const std::string& json) {
  auto spec = ParseJobSpecJson(json);
  if (!spec.ok()) return spec.status();
  auto trainer = Trainer::Create(*spec);
  if (!trainer.ok()) return trainer.status();
  std::ostringstream log;
  auto summary = (*trainer)->Run(log);
  if (!summary.ok()) return summary.status();
  Run r;
  r.start_step = (*trainer)->start_step();
  r.losses = summary->losses;
  for (const Parameter& p : (*trainer)->model().parameters()) {
    r.params.emplace_back(p.value.data<float>(), p.value.data<float>() + p.value.numel());
  }
  return r;
}

TEST(Resume, BitIdenticalToAnUninterruptedRun) {
  const std::string root =
      (fs::temp_directory_path() / ("mamba_resume_test_" + std::to_string(::getpid()))).string();
  fs::remove_all(root);
  auto full = Train(Job(""));
  ASSERT_TRUE(full.ok()) << full.status();
  // The same run, checkpointing every 3 steps: saving must not perturb training.
  auto saving = Train(Job(R"("dir": ")" + root + R"(", "everySteps": 3)"));
  ASSERT_TRUE(saving.ok()) << saving.status();
  EXPECT_EQ(saving->params, full->params);
  ASSERT_TRUE(fs::exists(root + "/step_00000003/optimizer.safetensors"));

  auto resumed = Train(Job(R"("resumeFrom": ")" + root + R"(/step_00000003")"));
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ(resumed->start_step, 3);
  EXPECT_EQ(resumed->params, full->params) << "resumed parameters differ";
  EXPECT_EQ(resumed->losses, full->losses);  // history from the checkpoint + the new steps

  // A root means its latest checkpoint: step 6, nothing left to train.
  auto latest = Train(Job(R"("resumeFrom": ")" + root + R"(")"));
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_EQ(latest->start_step, 6);
  EXPECT_EQ(latest->params, full->params);
}

TEST(Resume, RefusesAJobThatDiffersFromTheCheckpoint) {
  const std::string root =
      (fs::temp_directory_path() / ("mamba_resume_mismatch_" + std::to_string(::getpid())))
          .string();
  fs::remove_all(root);
  ASSERT_TRUE(Train(Job(R"("dir": ")" + root + R"(", "everySteps": 3)")).ok());
  auto other_seed = Train(Job(R"("resumeFrom": ")" + root + R"(")", 4));
  ASSERT_FALSE(other_seed.ok());
  EXPECT_EQ(other_seed.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(other_seed.status().message().find("the job's seed differs"), std::string::npos)
      << other_seed.status();
  auto missing = Train(Job(R"("resumeFrom": "/nonexistent/ckpt")"));
  EXPECT_NE(
      missing.status().message().find("resume: /nonexistent/ckpt: checkpoint directory not found"),
      std::string::npos)
      << missing.status();
}

TEST(Resume, InitFromImportsWeights) {
  const std::string root =
      (fs::temp_directory_path() / ("mamba_init_from_" + std::to_string(::getpid()))).string();
  fs::remove_all(root);
  auto trained = Train(Job(R"("dir": ")" + root + R"(")"));
  ASSERT_TRUE(trained.ok());
  auto spec = ParseJobSpecJson(Job(R"("initFrom": ")" + root + R"(/step_00000006")", 99));
  ASSERT_TRUE(spec.ok()) << spec.status();
  auto t = Trainer::Create(*spec);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->start_step(), 0);
  const Parameter& p = (*t)->model().parameters()[0];
  EXPECT_EQ(std::vector<float>(p.value.data<float>(), p.value.data<float>() + p.value.numel()),
            trained->params[0]);
  auto bad = ParseJobSpecJson(R"({"data": {"inductionHeads": {}}, "model": {"dModel": 32},
                                  "checkpoint": {"initFrom": ")" +
                              root + R"(/step_00000006"}})");
  ASSERT_TRUE(bad.ok());
  const absl::Status s = Trainer::Create(*bad).status();
  EXPECT_NE(s.message().find("checkpoint.init_from: " + root +
                             "/step_00000006/config.json: hidden_size is 16 but the model has 32"),
            std::string::npos)
      << s;
}

}  // namespace
}  // namespace mamba
