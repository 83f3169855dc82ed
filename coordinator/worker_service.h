// The worker-facing gRPC service (proto/service.proto, WorkerService): pools register and
// heartbeat; an idle pool's heartbeat is answered with the next job that fits it (priority, then
// first come; its dp x sp equal to the pool's ranks, or sp dividing them when dp is unset, and its
// backend the pool's), a running job's heartbeat with its cancellation; pools report events and
// completions. A pool silent past its lease is lost: its job goes RECOVERING, back to the queue
// to resume from its last checkpoint on the next pool, up to max_restarts (then FAILED with every
// attempt's reason); a job that was stopping ends CANCELLED. A pool that reports for a job that was
// given to another is told to drop it. After a coordinator restart, the pools of the jobs still
// held get one lease to come back.
#pragma once

#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <thread>

#include "absl/time/time.h"
#include "coordinator/job_store.h"
#include "proto/service.grpc.pb.h"

namespace mamba::coordinator {

struct WorkerServiceOptions {
  std::string token;  // empty: no authentication
  absl::Duration heartbeat = absl::Seconds(1);
  absl::Duration lease = absl::Seconds(30);
  // Where a job's checkpoints go when its spec names no directory: <root>/<job id>.
  std::string checkpoint_root = "runs";
};

class WorkerServiceImpl final : public v1::WorkerService::Service {
 public:
  // Starts the lease watchdog; `store` outlives this.
  WorkerServiceImpl(JobStore* store, WorkerServiceOptions options);
  ~WorkerServiceImpl() override;

  grpc::Status RegisterPool(grpc::ServerContext* context, const v1::RegisterPoolRequest* request,
                            v1::RegisterPoolResponse* response) override;
  grpc::Status Heartbeat(grpc::ServerContext* context, const v1::HeartbeatRequest* request,
                         v1::HeartbeatResponse* response) override;
  grpc::Status ReportEvents(grpc::ServerContext* context, const v1::ReportEventsRequest* request,
                            v1::ReportEventsResponse* response) override;
  grpc::Status CompleteJob(grpc::ServerContext* context, const v1::CompleteJobRequest* request,
                           v1::CompleteJobResponse* response) override;

  // Declares the pools silent past their lease lost (the watchdog calls it every heartbeat).
  void ExpireLeases();

 private:
  struct Pool {
    int world_size = 0;  // 0: not registered since the coordinator started (a grace entry)
    std::string backend, host;
    absl::Time last_seen;
  };
  grpc::Status Authenticate(const grpc::ServerContext& context) const;
  // The job `id` if `pool` holds it (ASSIGNED, RUNNING or STOPPING on that pool).
  absl::StatusOr<v1::Job> HeldJob(const std::string& pool, const std::string& id);
  // The spec a pool runs: the checkpoint directory filled in, resuming from it after a restart.
  v1::JobSpec SpecToRun(const v1::Job& job) const;

  JobStore* store_;
  WorkerServiceOptions options_;
  std::mutex mu_;
  std::map<std::string, Pool> pools_;
  int64_t next_pool_ = 1;
  std::mutex stop_mu_;
  std::condition_variable stop_cv_;
  bool stop_ = false;
  std::thread watchdog_;
};

}  // namespace mamba::coordinator
