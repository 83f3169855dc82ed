#include "coordinator/job_service.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "worker/job_spec.h"

namespace mamba::coordinator {

grpc::Status ToGrpc(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

grpc::Status JobServiceImpl::Authenticate(const grpc::ServerContext& context) const {
  if (token_.empty()) return grpc::Status::OK;
  const auto& metadata = context.client_metadata();
  const auto it = metadata.find("authorization");
  if (it == metadata.end() ||
      std::string(it->second.data(), it->second.size()) != absl::StrCat("Bearer ", token_)) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "this coordinator needs \"authorization: Bearer <token>\" (mambactl "
                        "--token_file)");
  }
  return grpc::Status::OK;
}

grpc::Status JobServiceImpl::SubmitJob(grpc::ServerContext* context,
                                       const v1::SubmitJobRequest* request,
                                       v1::SubmitJobResponse* response) {
  if (grpc::Status s = Authenticate(*context); !s.ok()) return s;
  if (!request->has_spec()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "spec: required");
  }
  // A job that names no checkpoint directory gets one when a pool runs it (<checkpoint root>/<job
  // id>), so its checkpoint schedule is valid without one here.
  v1::JobSpec given = request->spec();
  const bool dir_later = given.checkpoint().dir().empty();
  if (dir_later) given.mutable_checkpoint()->set_dir("(given when it runs)");
  auto spec = ResolveJobSpec(given);
  if (!spec.ok()) return ToGrpc(spec.status());
  if (dir_later) spec->mutable_checkpoint()->clear_dir();
  auto submitted = store_->Submit(*spec, request->idempotency_key());
  if (!submitted.ok()) return ToGrpc(submitted.status());
  *response->mutable_job() = submitted->job;
  response->set_created(submitted->created);
  return grpc::Status::OK;
}

grpc::Status JobServiceImpl::GetJob(grpc::ServerContext* context, const v1::GetJobRequest* request,
                                    v1::Job* response) {
  if (grpc::Status s = Authenticate(*context); !s.ok()) return s;
  auto job = store_->Get(request->id());
  if (!job.ok()) return ToGrpc(job.status());
  *response = *job;
  return grpc::Status::OK;
}

grpc::Status JobServiceImpl::ListJobs(grpc::ServerContext* context,
                                      const v1::ListJobsRequest* request,
                                      v1::ListJobsResponse* response) {
  if (grpc::Status s = Authenticate(*context); !s.ok()) return s;
  const int size = request->page_size() == 0 ? 50 : request->page_size();
  if (size < 1 || size > 1000) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("page_size: must be in [1, 1000], got ", size));
  }
  auto page = store_->List(request->state(), request->name(), size, request->page_token());
  if (!page.ok()) return ToGrpc(page.status());
  for (v1::Job& job : page->jobs) *response->add_jobs() = std::move(job);
  response->set_next_page_token(page->next_page_token);
  return grpc::Status::OK;
}

grpc::Status JobServiceImpl::CancelJob(grpc::ServerContext* context,
                                       const v1::CancelJobRequest* request, v1::Job* response) {
  if (grpc::Status s = Authenticate(*context); !s.ok()) return s;
  auto job = store_->Get(request->id());
  if (!job.ok()) return ToGrpc(job.status());
  // A job no pool has started ends at once; a running one stops at its next step boundary.
  absl::StatusOr<v1::Job> updated =
      job->state() == v1::RUNNING
          ? store_->Transition(request->id(), {v1::RUNNING}, v1::STOPPING,
                               "cancel requested: stopping at the next step")
          : store_->Transition(request->id(), {v1::QUEUED, v1::ASSIGNED, v1::RECOVERING},
                               v1::CANCELLED, "cancelled before it ran");
  if (!updated.ok()) return ToGrpc(updated.status());
  *response = *updated;
  return grpc::Status::OK;
}

grpc::Status JobServiceImpl::WatchJob(grpc::ServerContext* context,
                                      const v1::WatchJobRequest* request,
                                      grpc::ServerWriter<v1::JobUpdate>* writer) {
  if (grpc::Status s = Authenticate(*context); !s.ok()) return s;
  if (request->from_offset() < 0) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "from_offset: must be at least 0");
  }
  int64_t next = request->from_offset();
  while (!context->IsCancelled()) {
    // The state first, then the events: an ended job's last events are all stored by then.
    auto job = store_->Get(request->id());
    if (!job.ok()) return ToGrpc(job.status());
    auto events = store_->Events(request->id(), next);
    if (!events.ok()) return ToGrpc(events.status());
    for (const JobStore::Event& e : *events) {
      v1::JobUpdate u;
      u.set_offset(e.offset);
      u.set_unix_ms(e.unix_ms);
      u.set_kind(e.kind);
      u.set_text(e.text);
      u.set_state(job->state());
      if (!writer->Write(u)) return grpc::Status::OK;  // the client hung up
      next = e.offset + 1;
    }
    const v1::JobState st = job->state();
    if (st == v1::SUCCEEDED || st == v1::FAILED || st == v1::CANCELLED) return grpc::Status::OK;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  return grpc::Status::OK;
}

grpc::Status JobServiceImpl::ListCheckpoints(grpc::ServerContext* context,
                                             const v1::ListCheckpointsRequest* request,
                                             v1::ListCheckpointsResponse* response) {
  if (grpc::Status s = Authenticate(*context); !s.ok()) return s;
  auto job = store_->Get(request->id());
  if (!job.ok()) return ToGrpc(job.status());
  const std::string dir = job->spec().checkpoint().dir().empty()
                              ? checkpoint_root_ + "/" + job->id()
                              : job->spec().checkpoint().dir();
  response->set_dir(dir);
  std::vector<std::string> steps;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (entry.is_directory() && absl::StartsWith(name, "step_")) steps.push_back(name);
  }
  std::sort(steps.begin(), steps.end());
  for (const std::string& s : steps) response->add_checkpoints(dir + "/" + s);
  return grpc::Status::OK;
}

}  // namespace mamba::coordinator
