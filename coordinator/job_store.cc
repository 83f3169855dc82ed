#include "coordinator/job_store.h"

#include <sqlite3.h>

#include <chrono>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "worker/status_macros.h"

namespace mamba::coordinator {
namespace {

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// The same bytes for the same spec (map order and all), so that specs compare by their bytes.
std::string Canonical(const v1::JobSpec& spec) {
  std::string out;
  google::protobuf::io::StringOutputStream stream(&out);
  google::protobuf::io::CodedOutputStream coded(&stream);
  coded.SetSerializationDeterministic(true);
  spec.SerializeToCodedStream(&coded);
  coded.Trim();
  return out;
}

// A prepared statement, finalized when it goes out of scope.
class Statement {
 public:
  Statement(sqlite3* db, const char* sql) { sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr); }
  ~Statement() { sqlite3_finalize(stmt_); }
  bool ok() const { return stmt_ != nullptr; }
  sqlite3_stmt* get() { return stmt_; }
  Statement& Bind(int i, int64_t v) {
    sqlite3_bind_int64(stmt_, i, v);
    return *this;
  }
  Statement& Bind(int i, const std::string& v) {
    sqlite3_bind_text(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Statement& BindBlob(int i, const std::string& v) {
    sqlite3_bind_blob(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Statement& BindNull(int i) {
    sqlite3_bind_null(stmt_, i);
    return *this;
  }
  int Step() { return sqlite3_step(stmt_); }
  int64_t Int(int col) { return sqlite3_column_int64(stmt_, col); }
  std::string Text(int col) {
    const auto* p = reinterpret_cast<const char*>(sqlite3_column_blob(stmt_, col));
    return p ? std::string(p, sqlite3_column_bytes(stmt_, col)) : std::string();
  }

 private:
  sqlite3_stmt* stmt_ = nullptr;
};

constexpr char kJobColumns[] =
    "id, name, spec, state, reason, priority, idempotency_key, created_ms, updated_ms, restarts, "
    "pool";

v1::Job JobFromRow(Statement& s) {
  v1::Job job;
  job.set_id(s.Text(0));
  job.set_name(s.Text(1));
  job.mutable_spec()->ParseFromString(s.Text(2));
  job.set_state(static_cast<v1::JobState>(s.Int(3)));
  job.set_reason(s.Text(4));
  job.set_priority(static_cast<int32_t>(s.Int(5)));
  job.set_idempotency_key(s.Text(6));
  job.set_created_unix_ms(s.Int(7));
  job.set_updated_unix_ms(s.Int(8));
  job.set_restarts(static_cast<int32_t>(s.Int(9)));
  job.set_pool_id(s.Text(10));
  return job;
}

}  // namespace

absl::StatusOr<std::unique_ptr<JobStore>> JobStore::Open(const std::string& path) {
  sqlite3* db = nullptr;
  const int rc =
      sqlite3_open_v2(path.c_str(), &db,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nullptr);
  if (rc != SQLITE_OK) {
    const std::string why = db ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    sqlite3_close(db);
    return absl::UnavailableError(absl::StrCat("--db ", path, ": cannot open: ", why));
  }
  std::unique_ptr<JobStore> store(new JobStore(db, path));
  sqlite3_busy_timeout(db, 5000);
  RETURN_IF_ERROR(store->Exec("PRAGMA journal_mode=WAL"));
  RETURN_IF_ERROR(store->Exec("PRAGMA synchronous=FULL"));
  RETURN_IF_ERROR(store->Exec("PRAGMA foreign_keys=ON"));
  RETURN_IF_ERROR(store->Migrate());
  return store;
}

JobStore::~JobStore() { sqlite3_close(db_); }

absl::Status JobStore::Error(const std::string& what) const {
  return absl::InternalError(
      absl::StrCat("job store ", path_, ": ", what, ": ", sqlite3_errmsg(db_)));
}

absl::Status JobStore::Exec(const std::string& sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
    const std::string why = err ? err : "unknown error";
    sqlite3_free(err);
    return absl::InternalError(absl::StrCat("job store ", path_, ": ", sql, ": ", why));
  }
  return absl::OkStatus();
}

absl::Status JobStore::Migrate() {
  Statement version(db_, "PRAGMA user_version");
  if (!version.ok() || version.Step() != SQLITE_ROW) return Error("reading user_version");
  const int64_t v = version.Int(0);
  if (v > kSchemaVersion) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "--db %s: schema version %d was written by a newer coordinator (this one knows up to %d)",
        path_, v, kSchemaVersion));
  }
  if (v >= kSchemaVersion) return absl::OkStatus();
  RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
  absl::Status s = v < 1 ? CreateVersion1() : absl::OkStatus();
  // Version 2: the pool a job was given to.
  if (s.ok() && v < 2) {
    s = Exec("ALTER TABLE jobs ADD COLUMN pool TEXT NOT NULL DEFAULT ''; PRAGMA user_version = 2;");
  }
  if (s.ok() && v < 3) s = AddGridColumns();
  if (!s.ok()) {
    Exec("ROLLBACK").IgnoreError();
    return s;
  }
  return Exec("COMMIT");
}

absl::Status JobStore::AddGridColumns() {
  RETURN_IF_ERROR(
      Exec("ALTER TABLE jobs ADD COLUMN backend TEXT NOT NULL DEFAULT 'cpu';"
           "ALTER TABLE jobs ADD COLUMN dp INTEGER NOT NULL DEFAULT 0;"  // 0: unset
           "ALTER TABLE jobs ADD COLUMN sp INTEGER NOT NULL DEFAULT 1;"
           "CREATE INDEX jobs_queue ON jobs(state, backend, priority DESC, seq);"));
  std::vector<std::pair<int64_t, v1::JobSpec>> rows;
  {
    Statement s(db_, "SELECT seq, spec FROM jobs");
    if (!s.ok()) return Error("reading specs to migrate");
    for (int rc = s.Step(); rc == SQLITE_ROW; rc = s.Step()) {
      v1::JobSpec spec;
      spec.ParseFromString(s.Text(1));
      rows.emplace_back(s.Int(0), std::move(spec));
    }
  }
  for (const auto& [seq, spec] : rows) {
    Statement u(db_, "UPDATE jobs SET backend = ?1, dp = ?2, sp = ?3 WHERE seq = ?4");
    if (!u.ok()) return Error("preparing a migration");
    u.Bind(1, spec.backend().empty() ? std::string("cpu") : spec.backend())
        .Bind(2, int64_t{spec.parallel().has_dp() ? spec.parallel().dp() : 0})
        .Bind(3, int64_t{spec.parallel().has_sp() ? spec.parallel().sp() : 1})
        .Bind(4, seq);
    if (u.Step() != SQLITE_DONE) return Error("migrating a job");
  }
  return Exec("PRAGMA user_version = 3;");
}

absl::Status JobStore::CreateVersion1() {
  return Exec(R"sql(
    CREATE TABLE jobs (
      seq INTEGER PRIMARY KEY AUTOINCREMENT,
      id TEXT NOT NULL UNIQUE,
      name TEXT NOT NULL,
      spec BLOB NOT NULL,
      state INTEGER NOT NULL,
      reason TEXT NOT NULL DEFAULT '',
      priority INTEGER NOT NULL,
      idempotency_key TEXT UNIQUE,
      created_ms INTEGER NOT NULL,
      updated_ms INTEGER NOT NULL,
      restarts INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX jobs_by_state ON jobs(state, seq);
    CREATE TABLE events (
      job_id TEXT NOT NULL REFERENCES jobs(id),
      offset INTEGER NOT NULL,
      unix_ms INTEGER NOT NULL,
      kind TEXT NOT NULL,
      text TEXT NOT NULL,
      PRIMARY KEY (job_id, offset));
    PRAGMA user_version = 1;)sql");
}

absl::Status JobStore::AddEvent(const std::string& id, const std::string& kind,
                                const std::string& text, int64_t now_ms) {
  Statement s(db_,
              "INSERT INTO events (job_id, offset, unix_ms, kind, text) VALUES (?1, "
              "(SELECT COUNT(*) FROM events WHERE job_id = ?1), ?2, ?3, ?4)");
  if (!s.ok()) return Error("preparing an event");
  s.Bind(1, id).Bind(2, now_ms).Bind(3, kind).Bind(4, text);
  if (s.Step() != SQLITE_DONE) return Error("recording an event");
  return absl::OkStatus();
}

absl::StatusOr<v1::Job> JobStore::GetLocked(const std::string& id) {
  Statement s(db_, absl::StrCat("SELECT ", kJobColumns, " FROM jobs WHERE id = ?1").c_str());
  if (!s.ok()) return Error("preparing a read");
  s.Bind(1, id);
  const int rc = s.Step();
  if (rc == SQLITE_DONE) return absl::NotFoundError(absl::StrCat("job ", id, ": no such job"));
  if (rc != SQLITE_ROW) return Error("reading a job");
  return JobFromRow(s);
}

absl::StatusOr<JobStore::Submitted> JobStore::Submit(const v1::JobSpec& spec,
                                                     const std::string& idempotency_key,
                                                     const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  const std::string bytes = Canonical(spec);
  RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
  const auto rollback = [&](absl::Status s) {
    Exec("ROLLBACK").IgnoreError();
    return s;
  };
  if (!idempotency_key.empty()) {
    Statement s(db_, "SELECT id, spec FROM jobs WHERE idempotency_key = ?1");
    if (!s.ok()) return rollback(Error("preparing a read"));
    s.Bind(1, idempotency_key);
    if (s.Step() == SQLITE_ROW) {
      const std::string id = s.Text(0), stored = s.Text(1);
      if (stored != bytes) {
        return rollback(absl::AlreadyExistsError(absl::StrCat("idempotency_key \"", idempotency_key,
                                                              "\": already names job ", id,
                                                              ", submitted with another spec")));
      }
      auto job = GetLocked(id);
      RETURN_IF_ERROR(Exec("COMMIT"));
      if (!job.ok()) return job.status();
      return Submitted{*job, false};
    }
  }
  const int64_t now = NowMs();
  Statement insert(db_,
                   "INSERT INTO jobs (id, name, spec, state, reason, priority, idempotency_key, "
                   "created_ms, updated_ms, backend, dp, sp) VALUES ('', ?1, ?2, ?3, ?7, ?4, ?5, "
                   "?6, ?6, ?8, ?9, ?10)");
  if (!insert.ok()) return rollback(Error("preparing an insert"));
  insert.Bind(1, spec.name()).BindBlob(2, bytes).Bind(3, int64_t{v1::QUEUED});
  insert.Bind(4, int64_t{spec.priority()}).Bind(6, now).Bind(7, reason);
  insert.Bind(8, spec.backend().empty() ? std::string("cpu") : spec.backend())
      .Bind(9, int64_t{spec.parallel().has_dp() ? spec.parallel().dp() : 0})
      .Bind(10, int64_t{spec.parallel().has_sp() ? spec.parallel().sp() : 1});
  if (idempotency_key.empty()) {
    insert.BindNull(5);
  } else {
    insert.Bind(5, idempotency_key);
  }
  if (insert.Step() != SQLITE_DONE) return rollback(Error("storing a job"));
  const int64_t seq = sqlite3_last_insert_rowid(db_);
  const std::string id = absl::StrFormat("job-%06d", seq);
  Statement name(db_, "UPDATE jobs SET id = ?1 WHERE seq = ?2");
  if (!name.ok()) return rollback(Error("preparing an update"));
  name.Bind(1, id).Bind(2, seq);
  if (name.Step() != SQLITE_DONE) return rollback(Error("naming a job"));
  if (absl::Status s = AddEvent(id, "state", "QUEUED: submitted", now); !s.ok()) {
    return rollback(s);
  }
  auto job = GetLocked(id);
  if (!job.ok()) return rollback(job.status());
  RETURN_IF_ERROR(Exec("COMMIT"));
  Changed(id);
  return Submitted{*job, true};
}

absl::StatusOr<v1::Job> JobStore::Get(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  return GetLocked(id);
}

absl::StatusOr<JobStore::Page> JobStore::List(v1::JobState state, const std::string& name,
                                              int page_size, const std::string& page_token) {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t before = INT64_MAX;
  if (!page_token.empty() && (!absl::SimpleAtoi(page_token, &before) || before < 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_token: not a token this coordinator gave out: \"", page_token, "\""));
  }
  Statement s(db_, absl::StrCat("SELECT ", kJobColumns,
                                ", seq FROM jobs WHERE seq < ?1 AND (?2 = 0 OR state = ?2) AND "
                                "(?3 = '' OR name = ?3) ORDER BY seq DESC LIMIT ?4")
                       .c_str());
  if (!s.ok()) return Error("preparing a listing");
  s.Bind(1, before).Bind(2, int64_t{state}).Bind(3, name).Bind(4, int64_t{page_size} + 1);
  Page page;
  int64_t last_seq = 0;
  for (int rc = s.Step(); rc == SQLITE_ROW; rc = s.Step()) {
    if (static_cast<int>(page.jobs.size()) == page_size) {
      page.next_page_token = absl::StrCat(last_seq);
      break;
    }
    page.jobs.push_back(JobFromRow(s));
    last_seq = s.Int(11);
  }
  return page;
}

absl::StatusOr<v1::Job> JobStore::Transition(const std::string& id,
                                             const std::vector<v1::JobState>& from, v1::JobState to,
                                             const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
  const auto rollback = [&](absl::Status s) {
    Exec("ROLLBACK").IgnoreError();
    return s;
  };
  auto job = GetLocked(id);
  if (!job.ok()) return rollback(job.status());
  bool allowed = false;
  for (v1::JobState f : from) allowed |= job->state() == f;
  if (!allowed) {
    return rollback(absl::FailedPreconditionError(
        absl::StrCat("job ", id, " is ", v1::JobState_Name(job->state()), ": it cannot go ",
                     v1::JobState_Name(to))));
  }
  const int64_t now = NowMs();
  Statement s(db_, "UPDATE jobs SET state = ?1, reason = ?2, updated_ms = ?3 WHERE id = ?4");
  if (!s.ok()) return rollback(Error("preparing an update"));
  s.Bind(1, int64_t{to}).Bind(2, reason).Bind(3, now).Bind(4, id);
  if (s.Step() != SQLITE_DONE) return rollback(Error("updating a job"));
  if (absl::Status e =
          AddEvent(id, "state", absl::StrCat(v1::JobState_Name(to), ": ", reason), now);
      !e.ok()) {
    return rollback(e);
  }
  auto updated = GetLocked(id);
  if (!updated.ok()) return rollback(updated.status());
  RETURN_IF_ERROR(Exec("COMMIT"));
  Changed(id);
  return *updated;
}

absl::Status JobStore::AddEvents(const std::string& id,
                                 const std::vector<std::pair<std::string, std::string>>& events) {
  std::lock_guard<std::mutex> lock(mu_);
  RETURN_IF_ERROR(GetLocked(id).status());
  RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
  const int64_t now = NowMs();
  for (const auto& [kind, text] : events) {
    if (absl::Status s = AddEvent(id, kind, text, now); !s.ok()) {
      Exec("ROLLBACK").IgnoreError();
      return s;
    }
  }
  RETURN_IF_ERROR(Exec("COMMIT"));
  Changed(id);
  return absl::OkStatus();
}

absl::StatusOr<std::optional<v1::Job>> JobStore::AssignNext(const std::string& pool, int world_size,
                                                            const std::string& backend) {
  std::lock_guard<std::mutex> lock(mu_);
  RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
  const auto rollback = [&](absl::Status s) {
    Exec("ROLLBACK").IgnoreError();
    return s;
  };
  std::optional<v1::Job> chosen;
  {
    Statement s(db_, absl::StrCat("SELECT ", kJobColumns,
                                  " FROM jobs WHERE state IN (?1, ?2) AND backend = ?3 AND "
                                  "((dp > 0 AND dp * sp = ?4) OR (dp = 0 AND sp > 0 AND ?4 % sp "
                                  "= 0)) ORDER BY priority DESC, seq LIMIT 1")
                         .c_str());
    if (!s.ok()) return rollback(Error("preparing the queue"));
    s.Bind(1, int64_t{v1::QUEUED}).Bind(2, int64_t{v1::RECOVERING}).Bind(3, backend);
    s.Bind(4, int64_t{world_size});
    if (s.Step() == SQLITE_ROW) chosen = JobFromRow(s);
  }
  if (!chosen) {
    RETURN_IF_ERROR(Exec("COMMIT"));
    return std::optional<v1::Job>();
  }
  const bool restart = chosen->state() == v1::RECOVERING;
  const int64_t now = NowMs();
  const std::string reason = restart
                                 ? absl::StrCat("pool ", pool, ": restart ", chosen->restarts() + 1,
                                                " of at most ", chosen->spec().max_restarts())
                                 : absl::StrCat("pool ", pool);
  Statement u(db_,
              "UPDATE jobs SET state = ?1, reason = ?2, updated_ms = ?3, pool = ?4, restarts = "
              "restarts + ?5 WHERE id = ?6");
  if (!u.ok()) return rollback(Error("preparing an update"));
  u.Bind(1, int64_t{v1::ASSIGNED}).Bind(2, reason).Bind(3, now).Bind(4, pool);
  u.Bind(5, int64_t{restart ? 1 : 0}).Bind(6, chosen->id());
  if (u.Step() != SQLITE_DONE) return rollback(Error("assigning a job"));
  if (absl::Status e = AddEvent(chosen->id(), "state", "ASSIGNED: " + reason, now); !e.ok()) {
    return rollback(e);
  }
  auto job = GetLocked(chosen->id());
  if (!job.ok()) return rollback(job.status());
  RETURN_IF_ERROR(Exec("COMMIT"));
  Changed(chosen->id());
  return std::optional<v1::Job>(*job);
}

absl::StatusOr<std::vector<v1::Job>> JobStore::ActiveJobs() {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, absl::StrCat("SELECT ", kJobColumns,
                                " FROM jobs WHERE state IN (?1, ?2, ?3) ORDER BY seq")
                       .c_str());
  if (!s.ok()) return Error("preparing a read");
  s.Bind(1, int64_t{v1::ASSIGNED}).Bind(2, int64_t{v1::RUNNING}).Bind(3, int64_t{v1::STOPPING});
  std::vector<v1::Job> jobs;
  for (int rc = s.Step(); rc == SQLITE_ROW; rc = s.Step()) jobs.push_back(JobFromRow(s));
  return jobs;
}

absl::StatusOr<std::vector<JobStore::Event>> JobStore::Events(const std::string& id,
                                                              int64_t offset) {
  std::lock_guard<std::mutex> lock(mu_);
  RETURN_IF_ERROR(GetLocked(id).status());
  Statement s(db_,
              "SELECT offset, unix_ms, kind, text FROM events WHERE job_id = ?1 AND offset >= ?2 "
              "ORDER BY offset");
  if (!s.ok()) return Error("preparing a read");
  s.Bind(1, id).Bind(2, offset);
  std::vector<Event> events;
  for (int rc = s.Step(); rc == SQLITE_ROW; rc = s.Step()) {
    events.push_back({s.Int(0), s.Int(1), s.Text(2), s.Text(3)});
  }
  return events;
}

void JobStore::Changed(const std::string& id) {
  {
    std::lock_guard<std::mutex> lock(version_mu_);
    ++versions_[id];
  }
  version_cv_.notify_all();
}

int64_t JobStore::version(const std::string& id) const {
  std::lock_guard<std::mutex> lock(version_mu_);
  const auto it = versions_.find(id);
  return it == versions_.end() ? 0 : it->second;
}

int64_t JobStore::WaitForChange(const std::string& id, int64_t seen,
                                std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> lock(version_mu_);
  const auto now = [&] {
    const auto it = versions_.find(id);
    return it == versions_.end() ? 0 : it->second;
  };
  version_cv_.wait_for(lock, timeout, [&] { return now() != seen; });
  return now();
}

}  // namespace mamba::coordinator
