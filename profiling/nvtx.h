// The project's one NVTX domain ("mamba") and an RAII range in it. Header-only (NVTX 3), so
// nothing links against it; ranges cost next to nothing when no tool is attached. Nsight Compute
// filters on them: --nvtx --nvtx-include "mamba@scan_fwd/".
#pragma once

// Builds without CUDA (no NVTX headers) get the same names as no-ops, so the model and trainer
// mark their ranges unconditionally.
#if __has_include(<nvtx3/nvToolsExt.h>)
#include <nvtx3/nvToolsExt.h>
#define MAMBA_HAVE_NVTX 1
#endif

namespace mamba::profiling {

#ifdef MAMBA_HAVE_NVTX

struct MambaDomain {
  static constexpr const char* name{"mamba"};
};

// Pushes a range named `name` (a string literal or otherwise long-lived) for the scope's life.
class ScopedRange {
 public:
  explicit ScopedRange(const char* name) {
    nvtxEventAttributes_t attr = {};
    attr.version = NVTX_VERSION;
    attr.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
    attr.messageType = NVTX_MESSAGE_TYPE_ASCII;
    attr.message.ascii = name;
    nvtxDomainRangePushEx(Domain(), &attr);
  }
  ~ScopedRange() { nvtxDomainRangePop(Domain()); }
  ScopedRange(const ScopedRange&) = delete;
  ScopedRange& operator=(const ScopedRange&) = delete;

  static nvtxDomainHandle_t Domain() {
    static nvtxDomainHandle_t domain = nvtxDomainCreateA(MambaDomain::name);
    return domain;
  }
};

#else
class ScopedRange {
 public:
  explicit ScopedRange(const char*) {}
};
#endif

}  // namespace mamba::profiling
