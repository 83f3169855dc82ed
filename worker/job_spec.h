// Reading and validating a JobSpec (proto/job.proto). The JSON form is protobuf's JSON mapping, so
// the file a user hands to mamba-worker is the message the coordinator receives over gRPC.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "proto/job.pb.h"
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

// The model shape of a resolved spec, given the dataset's vocabulary.
ModelConfig ModelConfigFromSpec(const v1::JobSpec& spec, int64_t dataset_vocab);
OptimizerConfig OptimizerConfigFromSpec(const v1::JobSpec& spec);
ModelOptions ModelOptionsFromSpec(const v1::JobSpec& spec);

}  // namespace mamba
