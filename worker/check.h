// Invariant checks for programming errors (not for user input, which gets absl::Status).
// Abseil 20220623 (Debian 12) predates absl/log, so the project keeps this one small macro.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <sstream>

namespace mamba::internal {

class CheckFailure {
 public:
  CheckFailure(const char* file, int line, const char* expr) {
    stream_ << file << ":" << line << ": check failed: " << expr << " ";
  }
  ~CheckFailure() {
    std::fprintf(stderr, "%s\n", stream_.str().c_str());
    std::abort();
  }
  std::ostream& stream() { return stream_; }

 private:
  std::ostringstream stream_;
};

}  // namespace mamba::internal

#define MAMBA_CHECK(cond) \
  if (cond) {             \
  } else                  \
    ::mamba::internal::CheckFailure(__FILE__, __LINE__, #cond).stream()
