#include "coordinator/job_service.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "checkpoints/durable_io.h"
#include "coordinator/auth.h"
#include "worker/job_spec.h"

namespace mamba::coordinator {

grpc::Status ToGrpc(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

namespace {

// `path` (relative: inside `root`) resolved: "..", and the symbolic links of whatever part of it
// exists; INVALID_ARGUMENT naming `field` unless it lies within `root`, so resolved.
absl::StatusOr<std::string> Within(const std::string& field, const std::string& path,
                                   const std::string& root, const std::string& flag) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path base = fs::weakly_canonical(fs::absolute(root, ec), ec);
  const fs::path given(path);
  const fs::path full =
      fs::weakly_canonical(fs::absolute(given.is_absolute() ? given : base / given, ec), ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat(field, ": cannot resolve \"", path, "\""));
  const auto [b, f] = std::mismatch(base.begin(), base.end(), full.begin(), full.end());
  if (b != base.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": \"", path, "\" lies outside ", flag, " (", base.string(), ")"));
  }
  return full.string();
}

}  // namespace

absl::Status JobServiceImpl::PlacePaths(v1::JobSpec& spec) const {
  const auto place = [](std::string* path, const std::string& field, const std::string& root,
                        const std::string& flag) -> absl::Status {
    if (path->empty() || root.empty()) return absl::OkStatus();
    auto resolved = Within(field, *path, root, flag);
    if (!resolved.ok()) return resolved.status();
    *path = *resolved;
    return absl::OkStatus();
  };
  v1::DataSpec& d = *spec.mutable_data();
  if (d.has_text_file()) {
    if (absl::Status s = place(d.mutable_text_file()->mutable_path(), "data.text_file.path",
                               data_root_, "--data_root");
        !s.ok()) {
      return s;
    }
  }
  if (d.has_token_file()) {
    if (absl::Status s = place(d.mutable_token_file()->mutable_path(), "data.token_file.path",
                               data_root_, "--data_root");
        !s.ok()) {
      return s;
    }
  }
  v1::CheckpointSpec& c = *spec.mutable_checkpoint();
  for (auto [path, field] : {std::pair{c.mutable_dir(), "checkpoint.dir"},
                             std::pair{c.mutable_resume_from(), "checkpoint.resume_from"}}) {
    if (absl::Status s = place(path, field, checkpoint_root_, "--checkpoint_root"); !s.ok()) {
      return s;
    }
  }
  // Pretrained weights may come from either root.
  if (!c.init_from().empty()) {
    std::string from_data = c.init_from();
    if (!place(c.mutable_init_from(), "checkpoint.init_from", checkpoint_root_, "--checkpoint_root")
             .ok()) {
      if (data_root_.empty()) return absl::OkStatus();
      if (absl::Status s = place(&from_data, "checkpoint.init_from", data_root_,
                                 "--data_root or --checkpoint_root");
          !s.ok()) {
        return s;
      }
      c.set_init_from(from_data);
    }
  }
  return absl::OkStatus();
}

grpc::Status JobServiceImpl::Authenticate(const grpc::ServerContext& context) const {
  return CheckBearer(context, token_, "mambactl --token_file");
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
  if (absl::Status s = PlacePaths(*spec); !s.ok()) return ToGrpc(s);
  const v1::ParallelSpec& p = spec->parallel();
  const std::string ranks =
      p.has_dp() ? absl::StrCat(p.dp() * p.sp(), " ranks (dp ", p.dp(), " x sp ", p.sp(), ")")
                 : absl::StrCat("a multiple of ", p.sp(), " ranks (sp ", p.sp(), ")");
  auto submitted =
      store_->Submit(*spec, request->idempotency_key(),
                     absl::StrCat("waiting for a ", spec->backend(), " pool of ", ranks));
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
  {
    auto so_far = store_->Events(request->id(), 0);
    if (!so_far.ok()) return ToGrpc(so_far.status());
    if (next > static_cast<int64_t>(so_far->size())) {
      return grpc::Status(grpc::StatusCode::OUT_OF_RANGE,
                          absl::StrCat("from_offset: ", next, " is past the job's next event (",
                                       so_far->size(), ")"));
    }
  }
  int64_t version = store_->version(request->id());
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
    if (request->snapshot() || st == v1::SUCCEEDED || st == v1::FAILED || st == v1::CANCELLED) {
      return grpc::Status::OK;
    }
    // Sleeps until the store changes (or a second passes, to notice a client that left).
    version = store_->WaitForChange(request->id(), version, std::chrono::seconds(1));
  }
  return grpc::Status::OK;
}

std::string JobServiceImpl::CheckpointDir(const v1::Job& job) const {
  return job.spec().checkpoint().dir().empty() ? checkpoint_root_ + "/" + job.id()
                                               : job.spec().checkpoint().dir();
}

grpc::Status JobServiceImpl::GetProfile(grpc::ServerContext* context,
                                        const v1::GetProfileRequest* request,
                                        v1::GetProfileResponse* response) {
  if (grpc::Status s = Authenticate(*context); !s.ok()) return s;
  auto job = store_->Get(request->id());
  if (!job.ok()) return ToGrpc(job.status());
  const std::string dir = CheckpointDir(*job) + "/profile";
  response->set_dir(dir);
  for (const char* name : {"profile.json", "profile.md", "profile.svg"}) {
    auto bytes = ckpt::ReadWholeFile(dir + "/" + name);
    if (bytes.ok()) (*response->mutable_files())[name] = *std::move(bytes);
  }
  if (response->files().empty()) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        absl::StrCat("job ", job->id(), " has no profile in ", dir,
                                     " (its spec asks for one with \"profile\": {}; the report "
                                     "is written when the job ends)"));
  }
  return grpc::Status::OK;
}

grpc::Status JobServiceImpl::ListCheckpoints(grpc::ServerContext* context,
                                             const v1::ListCheckpointsRequest* request,
                                             v1::ListCheckpointsResponse* response) {
  if (grpc::Status s = Authenticate(*context); !s.ok()) return s;
  auto job = store_->Get(request->id());
  if (!job.ok()) return ToGrpc(job.status());
  const std::string dir = CheckpointDir(*job);
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
