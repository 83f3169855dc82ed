// The coordinator's durable job store: jobs and the events that moved them, in a SQLite file (WAL
// journal, synchronous FULL: a committed transition survives a crash or power loss). Every state
// change is one transaction together with the event that caused it, so a restarted coordinator
// continues from the file with nothing lost and nothing half-done. The schema's version is the
// database's user_version; an older file is migrated forward when opened.
//
//   ASSIGN_OR_RETURN(auto store, JobStore::Open("coordinator.db"));
//   ASSIGN_OR_RETURN(JobStore::Submitted s, store->Submit(spec, "my-key"));
//   RETURN_IF_ERROR(store->Transition(s.job.id(), {v1::QUEUED}, v1::CANCELLED,
//   "cancelled").status());
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/service.pb.h"

struct sqlite3;

namespace mamba::coordinator {

class JobStore {
 public:
  // Opens (creating, or migrating forward) the database file. Fails naming the file and why.
  static absl::StatusOr<std::unique_ptr<JobStore>> Open(const std::string& path);
  ~JobStore();
  JobStore(const JobStore&) = delete;
  JobStore& operator=(const JobStore&) = delete;

  struct Submitted {
    v1::Job job;
    bool created = false;
  };
  // Stores a new QUEUED job for a resolved spec, or, when `idempotency_key` names a job already
  // stored, returns that one (created false) if its spec is the same, else ALREADY_EXISTS.
  absl::StatusOr<Submitted> Submit(const v1::JobSpec& spec, const std::string& idempotency_key,
                                   const std::string& reason = "");
  // NOT_FOUND naming the id when there is no such job.
  absl::StatusOr<v1::Job> Get(const std::string& id);

  struct Page {
    std::vector<v1::Job> jobs;  // newest first
    std::string next_page_token;
  };
  // Jobs in `state` (JOB_STATE_UNSPECIFIED: any) named `name` (empty: any), page_size at a time
  // after the job `page_token` names (empty: from the newest).
  absl::StatusOr<Page> List(v1::JobState state, const std::string& name, int page_size,
                            const std::string& page_token);

  // Moves job `id` from one of `from` to `to` with `reason`, recording the event, in one
  // transaction; FAILED_PRECONDITION naming the state when the job is in none of `from`.
  absl::StatusOr<v1::Job> Transition(const std::string& id, const std::vector<v1::JobState>& from,
                                     v1::JobState to, const std::string& reason);

  struct Event {
    int64_t offset = 0;  // per job, from 0
    int64_t unix_ms = 0;
    std::string kind, text;
  };
  // Job `id`'s events from `offset` on, in order.
  absl::StatusOr<std::vector<Event>> Events(const std::string& id, int64_t offset);
  // Appends events (a worker's log lines, metrics) to job `id`.
  absl::Status AddEvents(const std::string& id,
                         const std::vector<std::pair<std::string, std::string>>& events);

  // Scheduling: the first job, by priority then age, among the QUEUED and RECOVERING ones that a
  // pool of `world_size` ranks on `backend` runs (dp x sp equal to the ranks, or, dp unset, sp
  // dividing them), moved to ASSIGNED on `pool` with its event (a RECOVERING one counts a
  // restart); nullopt when none fits. One indexed query, however long the queue.
  absl::StatusOr<std::optional<v1::Job>> AssignNext(const std::string& pool, int world_size,
                                                    const std::string& backend);
  // The jobs that a pool holds (ASSIGNED, RUNNING or STOPPING on it).
  absl::StatusOr<std::vector<v1::Job>> ActiveJobs();

  // A counter a job's every stored change moves: a watcher of the job waits for it to pass the
  // value it last saw (WaitForChange returns the new value, or the old one after `timeout`)
  // instead of polling, and only its own job's changes wake it.
  int64_t version(const std::string& id) const;
  int64_t WaitForChange(const std::string& id, int64_t seen,
                        std::chrono::milliseconds timeout) const;

  static constexpr int kSchemaVersion = 3;

 private:
  explicit JobStore(sqlite3* db, std::string path) : db_(db), path_(std::move(path)) {}
  absl::Status Migrate();
  absl::Status Exec(const std::string& sql);
  absl::Status Error(const std::string& what) const;
  absl::StatusOr<v1::Job> GetLocked(const std::string& id);
  absl::Status AddEvent(const std::string& id, const std::string& kind, const std::string& text,
                        int64_t now_ms);
  absl::Status CreateVersion1();
  // Version 3: the grid and backend of each job as columns, filled in from the stored specs.
  absl::Status AddGridColumns();

  sqlite3* db_;
  std::string path_;
  // The server's threads share the connection; a transaction must not interleave with another
  // thread's statements.
  std::mutex mu_;
  // Changes, for watchers (Changed after each commit).
  void Changed(const std::string& id);
  mutable std::mutex version_mu_;
  mutable std::condition_variable version_cv_;
  std::map<std::string, int64_t> versions_;
};

}  // namespace mamba::coordinator
