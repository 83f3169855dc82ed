// RETURN_IF_ERROR / ASSIGN_OR_RETURN for absl::Status and absl::StatusOr, used across the project
// (Debian 12's Abseil predates absl/status/status_macros.h).
//
//   RETURN_IF_ERROR(store.Write(job));
//   ASSIGN_OR_RETURN(int64_t n, ParseCount(text));   // declares n, or assigns an existing lvalue
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MAMBA_STATUS_CONCAT_INNER(a, b) a##b
#define MAMBA_STATUS_CONCAT(a, b) MAMBA_STATUS_CONCAT_INNER(a, b)

#define RETURN_IF_ERROR(expr)                                                           \
  do {                                                                                  \
    if (absl::Status _mamba_status = (expr); !_mamba_status.ok()) return _mamba_status; \
  } while (0)

#define MAMBA_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                \
  if (!tmp.ok()) return tmp.status();               \
  lhs = std::move(*tmp)

#define ASSIGN_OR_RETURN(lhs, expr) \
  MAMBA_ASSIGN_OR_RETURN_IMPL(MAMBA_STATUS_CONCAT(_mamba_statusor_, __LINE__), lhs, expr)
