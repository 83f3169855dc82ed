// Reading and validating a JobSpec (proto/job.proto). The JSON form is protobuf's JSON mapping, so
// the file a user hands to mamba-worker is the message the coordinator receives over gRPC.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "proto/job.pb.h"
#include "worker/comm/layout.h"
#include "worker/model.h"
#include "worker/model_config.h"
#include "worker/optimizer.h"

namespace mamba {

// Parses JSON (unknown fields are errors) and resolves it (ResolveJobSpec).
absl::StatusOr<v1::JobSpec> ParseJobSpecJson(const std::string& json);
absl::StatusOr<v1::JobSpec> LoadJobSpecFile(const std::string& path);

// Fills every absent optional field with its default and validates every value; errors are
// INVALID_ARGUMENT naming the field and the rule ("model.d_state: must be in [1, 256], got 300").
// Data-source fields are checked by the dataset factory (worker/data).
absl::StatusOr<v1::JobSpec> ResolveJobSpec(v1::JobSpec spec);

// The dp x sp grid of a resolved spec on `world_size` ranks, training at `train_len` positions
// (the dataset's length): dp defaults to world_size / sp. Refuses, naming the field and the rule,
// a grid that is not the world, a length (training or evaluation) that sp does not divide or
// whose slices are shorter than d_conv - 1, and a batch that dp does not divide.
absl::StatusOr<comm::Layout> ResolveLayout(const v1::JobSpec& spec, int world_size,
                                           int64_t train_len);

// The model shape of a resolved spec, given the dataset's vocabulary.
ModelConfig ModelConfigFromSpec(const v1::JobSpec& spec, int64_t dataset_vocab);
OptimizerConfig OptimizerConfigFromSpec(const v1::JobSpec& spec);
ModelOptions ModelOptionsFromSpec(const v1::JobSpec& spec);

}  // namespace mamba
