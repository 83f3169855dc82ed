#include "worker/data/dataset.h"

#include <limits>

#include "absl/strings/str_cat.h"
#include "worker/data/sources.h"

namespace mamba::data {

absl::StatusOr<std::unique_ptr<Dataset>> MakeDataset(const mamba::v1::DataSpec& spec,
                                                     uint64_t seed) {
  using mamba::v1::DataSpec;
  switch (spec.source_case()) {
    case DataSpec::kSelectiveCopying:
      return MakeSelectiveCopying(spec.selective_copying(), seed);
    case DataSpec::kInductionHeads:
      return MakeInductionHeads(spec.induction_heads(), seed);
    case DataSpec::kTextFile:
      return MakeTextFile(spec.text_file(), seed);
    case DataSpec::kTokenFile:
      return MakeTokenFile(spec.token_file(), seed);
    case DataSpec::SOURCE_NOT_SET:
      break;
  }
  return absl::InvalidArgumentError(
      "data: exactly one of selective_copying, induction_heads, text_file, token_file is "
      "required");
}

absl::StatusOr<Batch> NewBatch(const std::string& dataset, int64_t step, int64_t first,
                               int64_t count, int64_t seq_len) {
  auto bad = [&](const char* what, int64_t value) {
    return absl::InvalidArgumentError(absl::StrCat(dataset, " GetBatch: ", what, ", got ", value));
  };
  if (step < 0) return bad("step must be >= 0", step);
  if (first < 0) return bad("first must be >= 0", first);
  if (count < 0) return bad("count must be >= 0", count);
  if (seq_len < 1) return bad("seq_len must be >= 1", seq_len);
  if (first > std::numeric_limits<int64_t>::max() - count) {
    return bad("first + count overflows; first", first);
  }
  if (count > 0 && seq_len > kMaxBatchElements / count) {
    return absl::InvalidArgumentError(
        absl::StrCat(dataset, " GetBatch: count * seq_len must be at most ", kMaxBatchElements,
                     ", got ", count, " * ", seq_len));
  }
  Batch batch;
  batch.count = count;
  batch.seq_len = seq_len;
  batch.inputs.assign(count * seq_len, 0);
  batch.targets.assign(count * seq_len, kIgnoreIndex);
  return batch;
}

}  // namespace mamba::data
