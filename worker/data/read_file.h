// Reads a whole data file into memory, with errors that name the spec field.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace mamba::data {

// Data files are loaded whole (they are meant for small and medium corpora); larger ones are
// refused rather than risking an out-of-memory abort on every rank.
inline constexpr int64_t kMaxFileBytes = int64_t{8} << 30;

// The file's bytes. `field` (e.g. "data.text_file.path") prefixes every error: NOT_FOUND for a
// missing path, INVALID_ARGUMENT for an empty path, a non-regular file, an empty or too-large
// file, FAILED_PRECONDITION when it exists but cannot be read.
absl::StatusOr<std::string> ReadDataFile(const std::string& field, const std::string& path);

}  // namespace mamba::data
