// The client-facing gRPC service (proto/service.proto, JobService) over the job store: specs are
// resolved and checked before anything is stored (INVALID_ARGUMENT naming the field and the
// rule), and every RPC needs the bearer token when the coordinator has one.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "coordinator/job_store.h"
#include "proto/service.grpc.pb.h"

namespace mamba::coordinator {

// The gRPC status of an absl::Status (same code, same message).
grpc::Status ToGrpc(const absl::Status& status);

class JobServiceImpl final : public v1::JobService::Service {
 public:
  // `token` empty: no authentication (the coordinator listens on loopback by default).
  // Jobs that name no checkpoint directory keep theirs in <checkpoint_root>/<job id>. A job's
  // paths must lie within the roots: data files within `data_root` (empty: anywhere),
  // checkpoint.dir and resume_from within `checkpoint_root`, init_from within either; relative
  // paths are taken inside them (and stored absolute).
  JobServiceImpl(JobStore* store, std::string token, std::string checkpoint_root = "runs",
                 std::string data_root = "")
      : store_(store),
        token_(std::move(token)),
        checkpoint_root_(std::move(checkpoint_root)),
        data_root_(std::move(data_root)) {}

  // The spec's paths checked against the roots and made absolute (INVALID_ARGUMENT naming the
  // field and the root).
  absl::Status PlacePaths(v1::JobSpec& spec) const;

  grpc::Status SubmitJob(grpc::ServerContext* context, const v1::SubmitJobRequest* request,
                         v1::SubmitJobResponse* response) override;
  grpc::Status GetJob(grpc::ServerContext* context, const v1::GetJobRequest* request,
                      v1::Job* response) override;
  grpc::Status ListJobs(grpc::ServerContext* context, const v1::ListJobsRequest* request,
                        v1::ListJobsResponse* response) override;
  grpc::Status CancelJob(grpc::ServerContext* context, const v1::CancelJobRequest* request,
                         v1::Job* response) override;
  grpc::Status WatchJob(grpc::ServerContext* context, const v1::WatchJobRequest* request,
                        grpc::ServerWriter<v1::JobUpdate>* writer) override;
  grpc::Status GetProfile(grpc::ServerContext* context, const v1::GetProfileRequest* request,
                          v1::GetProfileResponse* response) override;
  grpc::Status ListCheckpoints(grpc::ServerContext* context,
                               const v1::ListCheckpointsRequest* request,
                               v1::ListCheckpointsResponse* response) override;

 private:
  // The directory job `job` keeps its checkpoints in.
  std::string CheckpointDir(const v1::Job& job) const;
  // UNAUTHENTICATED unless the call carries "authorization: Bearer <token>".
  grpc::Status Authenticate(const grpc::ServerContext& context) const;

  JobStore* store_;
  std::string token_;
  std::string checkpoint_root_;
  std::string data_root_;
};

}  // namespace mamba::coordinator
