#include "coordinator/worker_service.h"

#include <filesystem>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "coordinator/auth.h"
#include "coordinator/job_service.h"

namespace mamba::coordinator {
namespace {

bool Active(v1::JobState s) { return s == v1::ASSIGNED || s == v1::RUNNING || s == v1::STOPPING; }

// Whether a checkpoint root holds a step_ directory.
bool HasCheckpoint(const std::string& root) {
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(root, ec)) {
    if (entry.is_directory() && absl::StartsWith(entry.path().filename().string(), "step_")) {
      return true;
    }
  }
  return false;
}

}  // namespace

WorkerServiceImpl::WorkerServiceImpl(JobStore* store, WorkerServiceOptions options)
    : store_(store), options_(std::move(options)) {
  // Pools holding jobs when the coordinator stopped get one lease to come back.
  if (auto active = store_->ActiveJobs(); active.ok()) {
    for (const v1::Job& job : *active) {
      if (!job.pool_id().empty()) pools_[job.pool_id()].last_seen = absl::Now();
    }
  }
  watchdog_ = std::thread([this] {
    std::unique_lock<std::mutex> lock(stop_mu_);
    while (!stop_cv_.wait_for(lock, absl::ToChronoNanoseconds(options_.heartbeat),
                              [this] { return stop_; })) {
      lock.unlock();
      ExpireLeases();
      lock.lock();
    }
  });
}

WorkerServiceImpl::~WorkerServiceImpl() {
  {
    std::lock_guard<std::mutex> lock(stop_mu_);
    stop_ = true;
  }
  stop_cv_.notify_all();
  watchdog_.join();
}

grpc::Status WorkerServiceImpl::Authenticate(const grpc::ServerContext& context) const {
  return CheckBearer(context, options_.token, "mamba-worker --token_file");
}

void WorkerServiceImpl::ExpireLeases() {
  std::vector<std::string> lost;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const absl::Time now = absl::Now();
    for (auto it = pools_.begin(); it != pools_.end();) {
      if (now - it->second.last_seen > options_.lease) {
        lost.push_back(it->first);
        it = pools_.erase(it);
      } else {
        ++it;
      }
    }
  }
  if (lost.empty()) return;
  auto active = store_->ActiveJobs();
  if (!active.ok()) return;
  for (const v1::Job& job : *active) {
    if (std::find(lost.begin(), lost.end(), job.pool_id()) == lost.end()) continue;
    const std::string why = absl::StrCat("pool ", job.pool_id(), " lost (no heartbeat for ",
                                         absl::FormatDuration(options_.lease), ")");
    if (job.state() == v1::STOPPING) {
      store_->Transition(job.id(), {v1::STOPPING}, v1::CANCELLED, why + " while stopping")
          .IgnoreError();
    } else if (job.restarts() >= job.spec().max_restarts()) {
      // Every attempt's reason: the earlier recoveries' and this one's.
      std::vector<std::string> attempts;
      if (auto events = store_->Events(job.id(), 0); events.ok()) {
        for (const JobStore::Event& e : *events) {
          if (absl::StartsWith(e.text, "RECOVERING: ")) attempts.push_back(e.text.substr(12));
        }
      }
      attempts.push_back(why);
      store_
          ->Transition(
              job.id(), {job.state()}, v1::FAILED,
              absl::StrCat("out of restarts (", job.restarts(), " of ", job.spec().max_restarts(),
                           "); attempts: ", absl::StrJoin(attempts, " | ")))
          .IgnoreError();
    } else {
      store_
          ->Transition(job.id(), {job.state()}, v1::RECOVERING,
                       why + "; resumes from its last checkpoint on the next pool")
          .IgnoreError();
    }
  }
}

grpc::Status WorkerServiceImpl::RegisterPool(grpc::ServerContext* context,
                                             const v1::RegisterPoolRequest* request,
                                             v1::RegisterPoolResponse* response) {
  if (grpc::Status s = Authenticate(*context); !s.ok()) return s;
  if (request->world_size() < 1) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "world_size: must be at least 1");
  }
  if (request->backend() != "cpu" && request->backend() != "cuda") {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "backend: must be \"cpu\" or \"cuda\", got \"" + request->backend() + "\"");
  }
  std::string id = request->pool_id();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (id.empty()) {
      id = absl::StrFormat("pool-%d-%x", next_pool_++, absl::ToUnixMillis(absl::Now()) & 0xffffff);
    }
    Pool& p = pools_[id];
    p.world_size = request->world_size();
    p.backend = request->backend();
    p.host = request->host();
    p.last_seen = absl::Now();
  }
  response->set_pool_id(id);
  response->set_heartbeat_ms(absl::ToInt64Milliseconds(options_.heartbeat));
  response->set_lease_ms(absl::ToInt64Milliseconds(options_.lease));
  if (!request->holding_job_id().empty()) {
    response->set_drop_job(!HeldJob(id, request->holding_job_id()).ok());
  }
  return grpc::Status::OK;
}

absl::StatusOr<v1::Job> WorkerServiceImpl::HeldJob(const std::string& pool, const std::string& id) {
  auto job = store_->Get(id);
  if (!job.ok()) return job.status();
  if (job->pool_id() != pool || !Active(job->state())) {
    return absl::FailedPreconditionError(
        absl::StrCat("job ", id, " is ", v1::JobState_Name(job->state()),
                     job->pool_id() == pool ? "" : " on pool " + job->pool_id(), ": pool ", pool,
                     " does not hold it"));
  }
  return job;
}

v1::JobSpec WorkerServiceImpl::SpecToRun(const v1::Job& job) const {
  v1::JobSpec spec = job.spec();
  v1::CheckpointSpec& c = *spec.mutable_checkpoint();
  if (c.dir().empty()) c.set_dir(options_.checkpoint_root + "/" + job.id());
  if (job.restarts() > 0 && HasCheckpoint(c.dir())) {
    c.set_resume_from(c.dir());
    c.clear_init_from();  // a resumed run has its weights
  }
  return spec;
}

grpc::Status WorkerServiceImpl::Heartbeat(grpc::ServerContext* context,
                                          const v1::HeartbeatRequest* request,
                                          v1::HeartbeatResponse* response) {
  if (grpc::Status s = Authenticate(*context); !s.ok()) return s;
  Pool pool;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = pools_.find(request->pool_id());
    if (it == pools_.end() || it->second.world_size == 0) {
      response->set_unknown_pool(true);
      return grpc::Status::OK;
    }
    it->second.last_seen = absl::Now();
    pool = it->second;
  }
  if (!request->job_id().empty()) {
    auto job = HeldJob(request->pool_id(), request->job_id());
    if (!job.ok()) {
      response->set_drop_job(true);
      return grpc::Status::OK;
    }
    if (job->state() == v1::ASSIGNED) {
      store_
          ->Transition(job->id(), {v1::ASSIGNED}, v1::RUNNING,
                       absl::StrCat("running on pool ", request->pool_id()))
          .IgnoreError();
    }
    if (job->state() == v1::STOPPING) response->set_cancel(true);
    if (request->step() > 0) {  // progress, as a metric event (watchers see it live)
      store_
          ->AddEvents(job->id(), {{"metric", absl::StrFormat("step=%d loss=%.4f tokens_per_s=%.0f",
                                                             request->step(), request->loss(),
                                                             request->tokens_per_second())}})
          .IgnoreError();
    }
    return grpc::Status::OK;
  }
  auto next = store_->AssignNext(request->pool_id(), pool.world_size, pool.backend);
  if (!next.ok()) return ToGrpc(next.status());
  if (next->has_value()) {
    v1::JobAssignment& a = *response->mutable_assignment();
    a.set_job_id((*next)->id());
    *a.mutable_spec() = SpecToRun(**next);
  }
  return grpc::Status::OK;
}

grpc::Status WorkerServiceImpl::ReportEvents(grpc::ServerContext* context,
                                             const v1::ReportEventsRequest* request,
                                             v1::ReportEventsResponse*) {
  if (grpc::Status s = Authenticate(*context); !s.ok()) return s;
  if (auto job = HeldJob(request->pool_id(), request->job_id()); !job.ok()) {
    return ToGrpc(job.status());
  }
  std::vector<std::pair<std::string, std::string>> events;
  for (const v1::JobEvent& e : request->events()) events.emplace_back(e.kind(), e.text());
  return ToGrpc(store_->AddEvents(request->job_id(), events));
}

grpc::Status WorkerServiceImpl::CompleteJob(grpc::ServerContext* context,
                                            const v1::CompleteJobRequest* request,
                                            v1::CompleteJobResponse*) {
  if (grpc::Status s = Authenticate(*context); !s.ok()) return s;
  const v1::JobState to = request->state();
  if (to != v1::SUCCEEDED && to != v1::FAILED && to != v1::CANCELLED) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "state: must be SUCCEEDED, FAILED or CANCELLED");
  }
  if (auto job = HeldJob(request->pool_id(), request->job_id()); !job.ok()) {
    return ToGrpc(job.status());
  }
  return ToGrpc(store_
                    ->Transition(request->job_id(), {v1::ASSIGNED, v1::RUNNING, v1::STOPPING}, to,
                                 request->reason())
                    .status());
}

}  // namespace mamba::coordinator
