#include "worker/data/read_file.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"

namespace mamba::data {

absl::StatusOr<std::string> ReadDataFile(const std::string& field, const std::string& path) {
  if (path.empty()) return absl::InvalidArgumentError(absl::StrCat(field, ": required"));
  std::error_code ec;
  const std::filesystem::file_status st = std::filesystem::status(path, ec);
  if (st.type() == std::filesystem::file_type::not_found) {
    return absl::NotFoundError(absl::StrCat(field, ": file not found: '", path, "'"));
  }
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat(field, ": cannot stat '", path, "': ", ec.message()));
  }
  if (st.type() != std::filesystem::file_type::regular) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": '", path, "' is not a regular file"));
  }
  const uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat(field, ": cannot get the size of '", path, "': ", ec.message()));
  }
  if (size == 0) return absl::InvalidArgumentError(absl::StrCat(field, ": '", path, "' is empty"));
  if (size > static_cast<uintmax_t>(kMaxFileBytes)) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": '", path, "' has ", size,
                                                   " bytes; at most ", kMaxFileBytes,
                                                   " are loaded into memory"));
  }
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat(field, ": cannot open '", path, "': ", std::strerror(errno)));
  }
  std::string bytes(size, '\0');
  const size_t got = std::fread(bytes.data(), 1, bytes.size(), f);
  const bool failed = std::ferror(f) != 0;
  std::fclose(f);
  if (failed || got != bytes.size()) {
    // Also covers a file truncated between the size check and the read.
    return absl::FailedPreconditionError(
        absl::StrCat(field, ": read ", got, " of ", size, " bytes of '", path, "'"));
  }
  return bytes;
}

}  // namespace mamba::data
