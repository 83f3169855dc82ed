// The training loop learns: on a small learnable task the loss falls well below its start, and a
// run repeated gives bit-identical losses.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "nlohmann/json.hpp"
#include "profiling/step_model.h"
#include "worker/backend.h"
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

// A byte-level text job on a small English text: a model that learns anything drops well below
// the uniform loss log(256) = 5.55 within a few dozen steps.
std::string TextJob() {
  const std::string path =
      (std::filesystem::temp_directory_path() /
       ("mamba_trainer_test_" + std::to_string(::getpid()) + ".txt"))  // per process: ctest -j
          .string();
  std::ofstream f(path);
  for (int i = 0; i < 200; ++i) {
    f << "the quick brown fox jumps over the lazy dog " << i % 10 << ". ";
    f << "a selective state space model reads the sequence once.\n";
  }
  return R"({"data": {"textFile": {"path": ")" + path + R"(", "seqLen": 32}},
             "model": {"dModel": 32, "nLayer": 2}, "steps": 40, "batchSize": 8, "logEvery": 10,
             "optimizer": {"lr": 0.005}, "eval": {"batches": 2, "seqLens": [32, 64]}})";
}

TEST(Trainer, LossFallsOnText) {
  auto s = Train(TextJob());
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_EQ(s->losses.size(), 40u);
  EXPECT_GT(s->first_loss, 4.5);
  EXPECT_LT(s->final_loss, 3.5);
  ASSERT_EQ(s->evals.size(), 2u);
  EXPECT_EQ(s->evals[1].seq_len, 64);
  EXPECT_LT(s->evals[0].loss, 3.5);  // held-out text is the same language
}

TEST(Trainer, RepeatedRunIsBitIdentical) {
  auto a = Train(TextJob());
  auto b = Train(TextJob());
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->losses, b->losses);
}

// The memory policy is a memory/compute trade only: the same losses, bit for bit.
TEST(Trainer, RecomputeLayerGivesTheSameLosses) {
  std::string job = TextJob();
  auto a = Train(job);
  job.insert(job.rfind('}'), R"(, "memory": {"recompute": "LAYER"})");
  auto b = Train(job);
  ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
  EXPECT_EQ(a->losses, b->losses);
}

TEST(Trainer, FormatsDurations) {
  EXPECT_EQ(FormatDuration(5), "5s");
  EXPECT_EQ(FormatDuration(185), "3m05s");
  EXPECT_EQ(FormatDuration(3720), "1h02m");
}

// Without a usable GPU (no CUDA in the build, or no device), backend "cuda" is refused up front
// with a reason, never a crash.
TEST(Trainer, CudaBackendWithoutGpuIsAClearError) {
#ifdef MAMBA_HAS_CUDA
  if (CudaDeviceCount() > 0) GTEST_SKIP() << "a CUDA device is present";
#endif
  auto spec = ParseJobSpecJson(R"({"data": {"inductionHeads": {}}, "backend": "cuda"})");
  ASSERT_TRUE(spec.ok()) << spec.status();
  auto trainer = Trainer::Create(*spec);
  ASSERT_FALSE(trainer.ok());
  EXPECT_EQ(trainer.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(trainer.status().message().find("backend: \"cuda\""), std::string::npos)
      << trainer.status();
}

// A job with "profile": {} writes its report (CPU: op times and the traffic model, no counters,
// said so) into its checkpoint directory.
TEST(Trainer, ProfiledJobWritesItsReport) {
  const std::string dir =
      std::filesystem::temp_directory_path() / ("mamba_profile_test_" + std::to_string(getpid()));
  std::filesystem::remove_all(dir);
  auto spec = ParseJobSpecJson(R"({"data":{"inductionHeads":{"seqLen":32}},"model":{"dModel":16,)"
                               R"("nLayer":2},"steps":6,"batchSize":4,"eval":{"batches":0},)"
                               R"("profile":{"steps":2},"checkpoint":{"dir":")" +
                               dir + R"("}})");
  ASSERT_TRUE(spec.ok()) << spec.status();
  auto trainer = Trainer::Create(*spec);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  std::ostringstream log;
  ASSERT_TRUE((*trainer)->Run(log).ok());
  // Steps 4 and 5 timed; step 6 would count the hardware counters, which the CPU has not.
  EXPECT_NE(log.str().find("profile: " + dir + "/profile/profile.md (2 steps timed, 0 counted)"),
            std::string::npos)
      << log.str();
  std::ifstream in(dir + "/profile/profile.json");
  ASSERT_TRUE(in.good());
  const nlohmann::json j = nlohmann::json::parse(in);
  EXPECT_EQ(j["counters"].get<std::string>(),
            "not collected: the cpu backend has no hardware counters");
  EXPECT_GT(j["peaks"]["bandwidth_gbps"].get<double>(), 0);
  EXPECT_GT(j["step"]["tokens_per_s"].get<double>(), 0);
  bool scan = false;
  const auto& names = profiling::OpNames();  // what job specs may name in profile.kernels
  for (const auto& k : j["kernels"]) {
    EXPECT_NE(std::find(names.begin(), names.end(), k["name"].get<std::string>()), names.end())
        << k["name"] << " is missing from profiling::OpNames()";
    EXPECT_FALSE(k.contains("measured")) << k["name"];
    EXPECT_GT(k["time_ms"].get<double>(), 0) << k["name"];
    if (k["name"] == "selective_scan_fwd") {
      scan = true;
      EXPECT_EQ(k["calls"].get<int64_t>(), 2 * 2);  // 2 layers x 2 profiled steps
      EXPECT_GT(k["hbm_read_bytes"].get<double>(), 0);
      EXPECT_GT(k["flops"].get<double>(), 0);
    }
  }
  EXPECT_TRUE(scan);
  std::ifstream svg(dir + "/profile/profile.svg");
  std::string first;
  std::getline(svg, first);
  EXPECT_EQ(first.rfind("<svg", 0), 0u);
  EXPECT_TRUE(std::filesystem::exists(dir + "/profile/profile.md"));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace mamba
