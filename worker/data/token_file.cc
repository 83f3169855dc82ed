// A pre-tokenized dataset: a flat little-endian uint16 token file (llm.c-style, no header).
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "worker/data/read_file.h"
#include "worker/data/sources.h"
#include "worker/data/windowed.h"

namespace mamba::data {

absl::StatusOr<std::unique_ptr<Dataset>> MakeTokenFile(const mamba::v1::TokenFileSpec& spec,
                                                       uint64_t seed) {
  if (spec.vocab_size() < 1 || spec.vocab_size() > 65536) {
    return absl::InvalidArgumentError(absl::StrCat(
        "data.token_file.vocab_size: required, must be in [1, 65536] (uint16 tokens), got ",
        spec.vocab_size()));
  }
  WindowedOptions options;
  options.name = "data.token_file";
  options.vocab_size = spec.vocab_size();
  options.seq_len = spec.has_seq_len() ? spec.seq_len() : 1024;
  options.val_fraction = spec.has_val_fraction() ? spec.val_fraction() : 0.1;
  options.seed = seed;
  if (absl::Status s = CheckValFraction("data.token_file.val_fraction", options.val_fraction);
      !s.ok()) {
    return s;
  }
  absl::StatusOr<std::string> bytes = ReadDataFile("data.token_file.path", spec.path());
  if (!bytes.ok()) return bytes.status();
  if (bytes->size() % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("data.token_file.path: '", spec.path(), "' has an odd size (", bytes->size(),
                     " bytes); a token file is a sequence of 2-byte tokens"));
  }
  std::vector<uint16_t> tokens(bytes->size() / 2);
  const auto* b = reinterpret_cast<const unsigned char*>(bytes->data());
  for (size_t i = 0; i < tokens.size(); ++i) {
    // Decoded byte by byte: little-endian on any host.
    tokens[i] = static_cast<uint16_t>(b[2 * i] | (b[2 * i + 1] << 8));
    // Checked once here, so GetBatch never hands the model an out-of-range token.
    if (tokens[i] >= spec.vocab_size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "data.token_file.path: token ", i, " (byte offset ", 2 * i, ") of '", spec.path(),
          "' is ", tokens[i], ", not below data.token_file.vocab_size = ", spec.vocab_size()));
    }
  }
  return MakeWindowed(options, std::move(tokens));
}

}  // namespace mamba::data
