// Internal to mamba_data: one factory per DataSpec source (each in its own .cc) and the checks
// every GetBatch shares. The public interface is dataset.h.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "proto/job.pb.h"
#include "worker/data/dataset.h"

namespace mamba::data {

absl::StatusOr<std::unique_ptr<Dataset>> MakeSelectiveCopying(
    const mamba::v1::SelectiveCopyingSpec& spec, uint64_t seed);
absl::StatusOr<std::unique_ptr<Dataset>> MakeInductionHeads(
    const mamba::v1::InductionHeadsSpec& spec, uint64_t seed);
absl::StatusOr<std::unique_ptr<Dataset>> MakeTextFile(const mamba::v1::TextFileSpec& spec,
                                                      uint64_t seed);
absl::StatusOr<std::unique_ptr<Dataset>> MakeTokenFile(const mamba::v1::TokenFileSpec& spec,
                                                       uint64_t seed);

// Caps what one GetBatch may allocate (per vector), so that a bad request is an error rather than
// an out-of-memory abort.
inline constexpr int64_t kMaxBatchElements = int64_t{1} << 30;

// Checks the arguments common to every GetBatch (step, first, count >= 0, seq_len >= 1, size cap)
// and returns a batch with inputs and targets allocated; targets filled with kIgnoreIndex.
absl::StatusOr<Batch> NewBatch(const std::string& dataset, int64_t step, int64_t first,
                               int64_t count, int64_t seq_len);

}  // namespace mamba::data
