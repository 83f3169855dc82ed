// libFuzzer harness: job specs, as JSON (mamba-worker --job) and as the coordinator's
// SubmitJobRequest message in protobuf's wire format (any gRPC client can send one).
#include <cstddef>
#include <cstdint>
#include <string>

#include "proto/service.pb.h"
#include "worker/job_spec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  auto spec = mamba::ParseJobSpecJson(bytes);
  if (spec.ok()) (void)mamba::ResolveLayout(*spec, 8, 256);
  mamba::v1::SubmitJobRequest request;
  if (request.ParseFromString(bytes)) {
    auto resolved = mamba::ResolveJobSpec(request.spec());
    if (resolved.ok()) (void)mamba::ResolveLayout(*resolved, 4, 128);
  }
  return 0;
}
