// Job specs: defaults, and every malformed or impossible spec rejected with the field named.
#include <gtest/gtest.h>

#include <string>

#include "worker/job_spec.h"
#include "worker/trainer.h"

namespace mamba {
namespace {

void ExpectError(const std::string& json, const std::string& field_and_rule) {
  auto spec = ParseJobSpecJson(json);
  absl::Status status = spec.status();
  if (spec.ok()) status = Trainer::Create(*spec).status();
  ASSERT_FALSE(status.ok()) << json;
  EXPECT_NE(std::string(status.message()).find(field_and_rule), std::string::npos)
      << "message: " << status.message();
}

TEST(JobSpec, DefaultsAreThePaperSettings) {
  auto spec = ParseJobSpecJson(R"({"data": {"inductionHeads": {}}})");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->model().d_model(), 64);
  EXPECT_EQ(spec->model().n_layer(), 2);
  EXPECT_EQ(spec->model().d_state(), 16);
  EXPECT_EQ(spec->model().dt_rank(), 4);
  EXPECT_EQ(spec->optimizer().beta2(), 0.95);
  EXPECT_EQ(spec->optimizer().weight_decay(), 0.1);
  EXPECT_EQ(spec->backend(), "cpu");
  auto trainer = Trainer::Create(*spec);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  EXPECT_EQ((*trainer)->dataset().seq_len(), 256);
  EXPECT_EQ((*trainer)->model().config().vocab_size, 16);
}

TEST(JobSpec, ExplicitZeroIsKeptNotDefaulted) {
  auto spec =
      ParseJobSpecJson(R"({"data": {"inductionHeads": {}}, "optimizer": {"weightDecay": 0}})");
  ASSERT_TRUE(spec.ok());
  EXPECT_EQ(spec->optimizer().weight_decay(), 0.0);
}

TEST(JobSpec, BadSpecsNameTheFieldAndRule) {
  ExpectError(R"({"data": {"inductionHeads": {}}, "bogus": 1})", "bogus");
  ExpectError(R"({"data": {"inductionHeads": {}}, "model": {"dModel": -4}})",
              "model.d_model: must be in [1, 65536], got -4");
  ExpectError(R"({"data": {"inductionHeads": {}}, "model": {"dState": 300}})",
              "model.d_state: must be in [1, 256], got 300");
  ExpectError(R"({"data": {"inductionHeads": {}}, "batchSize": 0})", "batch_size");
  ExpectError(R"({"data": {"inductionHeads": {}}, "optimizer": {"lr": -1}})", "optimizer.lr");
  ExpectError(R"({"data": {"inductionHeads": {}}, "steps": 0})", "steps: must be in");
  ExpectError(R"({"data": {"inductionHeads": {}}, "precision": "fp8"})", "precision");
  ExpectError(R"({"data": {"inductionHeads": {}}, "backend": "tpu"})", "backend");
  ExpectError(R"({"model": {}})", "data: one source is required");
  ExpectError(R"({"data": {"textFile": {"path": "/nonexistent/file.txt"}}})",
              "data.text_file.path");
  ExpectError(R"({"data": {"inductionHeads": {"seqLen": -5}}})", "data.induction_heads.seq_len");
  ExpectError(R"({"data": {"inductionHeads": {}}, "model": {"vocabSize": 4}})", "model.vocab_size");
  ExpectError(R"({"data": {"inductionHeads": {}}, "parallel": {"dp": 3}})",
              "batch_size: must be a multiple");
  ExpectError(R"(not json)", "job spec is not a valid JobSpec JSON");
  ExpectError(R"({"data": {"inductionHeads": {}}, "steps": 5, "profile": {"steps": 6}})",
              "profile.steps: must be in [1, 5], got 6");
  ExpectError(R"({"data": {"inductionHeads": {}}, "steps": 5,
                  "profile": {"steps": 3, "counterSteps": 3}})",
              "profile.counter_steps: must be in [0, 2], got 3");
  ExpectError(R"({"data": {"inductionHeads": {}}, "profile": {"kernels": ["scan"]}})",
              "profile.kernels[0]: \"scan\" is not an op (one of adamw, ");
}

// parallel.stateExchange picks how the model hands the scan state across sp ranks.
TEST(JobSpec, StateExchangeReachesTheModel) {
  auto spec = ParseJobSpecJson(R"({"data": {"inductionHeads": {}}})");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_FALSE(ModelOptionsFromSpec(*spec).state_chain);
  spec = ParseJobSpecJson(
      R"({"data": {"inductionHeads": {}}, "parallel": {"sp": 2, "stateExchange": "CHAIN"}})");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_TRUE(ModelOptionsFromSpec(*spec).state_chain);
}

// "profile": {} takes 3 timed steps, 1 counted step and the scan kernels; a run too short for a
// counted step after the timed ones counts none.
TEST(JobSpec, ProfileDefaults) {
  auto spec = ParseJobSpecJson(R"({"data": {"inductionHeads": {}}, "steps": 10, "profile": {}})");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->profile().steps(), 3);
  EXPECT_EQ(spec->profile().counter_steps(), 1);
  ASSERT_EQ(spec->profile().kernels_size(), 2);
  EXPECT_EQ(spec->profile().kernels(0), "selective_scan_fwd");
  EXPECT_EQ(spec->profile().kernels(1), "selective_scan_bwd");
  spec = ParseJobSpecJson(R"({"data": {"inductionHeads": {}}, "steps": 3, "profile": {}})");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->profile().counter_steps(), 0);
  spec = ParseJobSpecJson(
      R"({"data": {"inductionHeads": {}}, "profile": {"kernels": ["*", "linear_bwd"]}})");
  EXPECT_TRUE(spec.ok()) << spec.status();
}

// The rank grid's rules, for a world of `ranks` processes.
void ExpectLayoutError(const std::string& json, int ranks, const std::string& field_and_rule) {
  auto spec = ParseJobSpecJson(json);
  ASSERT_TRUE(spec.ok()) << spec.status();
  auto layout = ResolveLayout(*spec, ranks, spec->data().induction_heads().seq_len());
  ASSERT_FALSE(layout.ok()) << json;
  EXPECT_EQ(layout.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(layout.status().message()).find(field_and_rule), std::string::npos)
      << "message: " << layout.status().message();
}

TEST(JobSpec, RankLayoutsAreResolvedOrRefusedWithTheRule) {
  const std::string ih = R"({"data": {"inductionHeads": {"seqLen": 64}}, "batchSize": 8, )";
  auto spec = ParseJobSpecJson(ih + R"("parallel": {"sp": 2}})");
  ASSERT_TRUE(spec.ok());
  auto layout = ResolveLayout(*spec, 8, 64);  // dp defaults to ranks / sp
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->dp, 4);
  EXPECT_EQ(layout->sp, 2);
  ExpectLayoutError(ih + R"("parallel": {"dp": 2, "sp": 2}})", 3,
                    "parallel: dp x sp (2 x 2 = 4) must equal the number of ranks (3)");
  ExpectLayoutError(ih + R"("parallel": {"sp": 2}})", 3,
                    "parallel.sp: must divide the number of ranks (3)");
  ExpectLayoutError(R"({"data": {"inductionHeads": {"seqLen": 66}}, "parallel": {"sp": 4}})", 4,
                    "parallel.sp: the length 66 must be divisible by parallel.sp (4)");
  ExpectLayoutError(R"({"data": {"inductionHeads": {"seqLen": 16}}, "parallel": {"sp": 8}})", 8,
                    "each rank's slice (16 / 8 = 2 positions) must hold at least model.d_conv - 1");
  ExpectLayoutError(R"({"data": {"inductionHeads": {"seqLen": 64}}, "batchSize": 6})", 4,
                    "batch_size: must be a multiple of parallel.dp (4), got 6");
  ExpectLayoutError(ih + R"("eval": {"seqLens": [64, 100]}, "parallel": {"sp": 8}})", 8,
                    "eval.seq_lens[1]: the length 100 must be divisible by parallel.sp (8)");
}

}  // namespace
}  // namespace mamba

namespace mamba {
namespace {

TEST(JobSpec, CheckpointDefaultsAndRules) {
  auto spec = ParseJobSpecJson(R"({"data": {"inductionHeads": {}}})");
  ASSERT_TRUE(spec.ok());
  EXPECT_EQ(spec->checkpoint().every_steps(), 0);
  EXPECT_EQ(spec->checkpoint().keep_last(), 3);
  EXPECT_EQ(spec->checkpoint().dtype(), "fp32");
  const std::string data = R"("data": {"inductionHeads": {}}, )";
  ExpectError("{" + data + R"("checkpoint": {"dir": "c", "dtype": "fp8"}})",
              "checkpoint.dtype: must be \"fp32\" or \"bf16\", got \"fp8\"");
  ExpectError("{" + data + R"("checkpoint": {"everySteps": 5}})",
              "checkpoint.dir: required when checkpoint.every_steps is set");
  ExpectError("{" + data + R"("checkpoint": {"dir": "c", "keepLast": -1}})",
              "checkpoint.keep_last: must be in [0, 1048576], got -1");
  ExpectError("{" + data + R"("checkpoint": {"resumeFrom": "a", "initFrom": "b"}})",
              "checkpoint.init_from: cannot be combined with checkpoint.resume_from");
}

}  // namespace
}  // namespace mamba
