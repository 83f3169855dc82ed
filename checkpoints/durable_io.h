// Writes that survive a crash: data reaches the disk (fsync) before the write is reported done.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace mamba::ckpt {

// Creates or truncates `path`, writes `bytes`, fsyncs and closes it.
absl::Status WriteFileDurably(const std::string& path, std::string_view bytes);
// fsyncs a directory, so that entries created or renamed in it are on disk.
absl::Status SyncDirectory(const std::string& path);
// The whole file; NOT_FOUND naming it when it is missing.
absl::StatusOr<std::string> ReadWholeFile(const std::string& path);

}  // namespace mamba::ckpt
