// A byte-level text dataset: the file's bytes are the tokens (vocabulary 256).
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "worker/data/read_file.h"
#include "worker/data/sources.h"
#include "worker/data/windowed.h"

namespace mamba::data {

absl::StatusOr<std::unique_ptr<Dataset>> MakeTextFile(const mamba::v1::TextFileSpec& spec,
                                                      uint64_t seed) {
  WindowedOptions options;
  options.name = "data.text_file";
  options.vocab_size = 256;
  options.seq_len = spec.has_seq_len() ? spec.seq_len() : 256;
  options.val_fraction = spec.has_val_fraction() ? spec.val_fraction() : 0.1;
  options.seed = seed;
  // Cheap checks first: a bad fraction should not cost reading the file.
  if (absl::Status s = CheckValFraction("data.text_file.val_fraction", options.val_fraction);
      !s.ok()) {
    return s;
  }
  absl::StatusOr<std::string> bytes = ReadDataFile("data.text_file.path", spec.path());
  if (!bytes.ok()) return bytes.status();
  std::vector<uint16_t> tokens(bytes->size());
  for (size_t i = 0; i < bytes->size(); ++i) tokens[i] = static_cast<unsigned char>((*bytes)[i]);
  bytes->clear();
  bytes->shrink_to_fit();
  return MakeWindowed(options, std::move(tokens));
}

}  // namespace mamba::data
