// libFuzzer harness: job specs, as JSON (mamba-worker --job) and as the coordinator's
// SubmitJobRequest message in protobuf's wire format (any gRPC client can send one), through
// what the coordinator does with them before storing: resolving, the rank grid, the path rules
// (--data_root, --checkpoint_root). The worker-facing requests are parsed too.
#include <cstddef>
#include <cstdint>
#include <string>

#include "coordinator/job_service.h"
#include "proto/service.pb.h"
#include "worker/job_spec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const mamba::coordinator::JobServiceImpl service(nullptr, "", "/tmp/fuzz-checkpoints",
                                                          "/tmp/fuzz-data");
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  auto spec = mamba::ParseJobSpecJson(bytes);
  if (spec.ok()) {
    (void)mamba::ResolveLayout(*spec, 8, 256);
    (void)service.PlacePaths(*spec);
  }
  mamba::v1::SubmitJobRequest request;
  if (request.ParseFromString(bytes)) {
    auto resolved = mamba::ResolveJobSpec(request.spec());
    if (resolved.ok()) {
      (void)mamba::ResolveLayout(*resolved, 4, 128);
      (void)service.PlacePaths(*resolved);
    }
  }
  mamba::v1::RegisterPoolRequest reg;
  mamba::v1::HeartbeatRequest beat;
  mamba::v1::ReportEventsRequest events;
  mamba::v1::CompleteJobRequest done;
  (void)reg.ParseFromString(bytes);
  (void)beat.ParseFromString(bytes);
  (void)events.ParseFromString(bytes);
  (void)done.ParseFromString(bytes);
  return 0;
}
