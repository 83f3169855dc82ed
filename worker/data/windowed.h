// A dataset of random windows over one in-memory token stream: the shared core of the text and
// token file datasets.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/data/dataset.h"

namespace mamba::data {

struct WindowedOptions {
  std::string name;  // the dataset's name, and the spec prefix for errors ("data.text_file")
  int32_t vocab_size = 0;
  int64_t seq_len = 0;  // the training length
  double val_fraction = 0;
  uint64_t seed = 0;
};

// Splits `tokens` into a train region (the first 1 - val_fraction) and a validation region (the
// rest) and checks that each holds seq_len + 1 tokens; errors name <name>.seq_len or
// <name>.val_fraction. Tokens are stored as uint16 (bytes widened for text: 2x the file size,
// acceptable for the small and medium files this is for).
absl::StatusOr<std::unique_ptr<Dataset>> MakeWindowed(const WindowedOptions& options,
                                                      std::vector<uint16_t> tokens);

// Checks val_fraction (finite, in [0, 1)); the error names `field`.
absl::Status CheckValFraction(const std::string& field, double val_fraction);

}  // namespace mamba::data
