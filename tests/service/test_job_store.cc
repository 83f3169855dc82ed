// The SQLite job store on a real file: submission and idempotency, paging, the transition rules
// with their events, and everything still there after the file is closed and opened again.
#include <gtest/gtest.h>
#include <sqlite3.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "coordinator/job_store.h"
#include "worker/job_spec.h"

namespace mamba::coordinator {
namespace {

class JobStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = ::testing::TempDir() + "/job-store-" + std::to_string(getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name() + ".db";
    std::filesystem::remove(path_);
  }
  void TearDown() override {
    for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(path_ + suffix);
  }
  v1::JobSpec Spec(const std::string& name, int seq_len = 32) {
    auto spec =
        ParseJobSpecJson(R"({"name":")" + name + R"(","data":{"inductionHeads":{"seqLen":)" +
                         std::to_string(seq_len) + "}}}");
    EXPECT_TRUE(spec.ok()) << spec.status();
    return *spec;
  }
  std::string path_;
};

TEST_F(JobStoreTest, SubmissionsAreIdempotentByKey) {
  auto store = JobStore::Open(path_);
  ASSERT_TRUE(store.ok()) << store.status();
  auto a = (*store)->Submit(Spec("a"), "key-1");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE(a->created);
  EXPECT_EQ(a->job.state(), v1::QUEUED);
  EXPECT_EQ(a->job.name(), "a");
  auto again = (*store)->Submit(Spec("a"), "key-1");
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->created);
  EXPECT_EQ(again->job.id(), a->job.id());
  auto other = (*store)->Submit(Spec("a", 64), "key-1");
  EXPECT_EQ(other.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_NE(other.status().message().find("key-1"), std::string::npos);
  // No key: always a new job.
  auto b = (*store)->Submit(Spec("a"), ""), c = (*store)->Submit(Spec("a"), "");
  ASSERT_TRUE(b.ok() && c.ok());
  EXPECT_NE(b->job.id(), c->job.id());
  EXPECT_EQ((*store)->Get("job-999999").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(JobStoreTest, ListsNewestFirstInPagesWithFilters) {
  auto store = JobStore::Open(path_);
  ASSERT_TRUE(store.ok());
  std::vector<std::string> ids;
  for (int i = 0; i < 7; ++i) {
    ids.push_back((*store)->Submit(Spec(i % 2 ? "odd" : "even"), "")->job.id());
  }
  ASSERT_TRUE((*store)->Transition(ids[3], {v1::QUEUED}, v1::CANCELLED, "test").ok());
  std::vector<std::string> seen;
  std::string token;
  do {
    auto page = (*store)->List(v1::JOB_STATE_UNSPECIFIED, "", 3, token);
    ASSERT_TRUE(page.ok()) << page.status();
    EXPECT_LE(page->jobs.size(), 3u);
    for (const auto& j : page->jobs) seen.push_back(j.id());
    token = page->next_page_token;
  } while (!token.empty());
  EXPECT_EQ(seen, std::vector<std::string>(ids.rbegin(), ids.rend()));
  auto odd = (*store)->List(v1::JOB_STATE_UNSPECIFIED, "odd", 50, "");
  EXPECT_EQ(odd->jobs.size(), 3u);
  auto cancelled = (*store)->List(v1::CANCELLED, "", 50, "");
  ASSERT_EQ(cancelled->jobs.size(), 1u);
  EXPECT_EQ(cancelled->jobs[0].id(), ids[3]);
  EXPECT_EQ((*store)->List(v1::JOB_STATE_UNSPECIFIED, "", 3, "x").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(JobStoreTest, TransitionsFollowTheRulesAndRecordTheirEvents) {
  auto store = JobStore::Open(path_);
  ASSERT_TRUE(store.ok());
  const std::string id = (*store)->Submit(Spec("t"), "")->job.id();
  ASSERT_TRUE((*store)->Transition(id, {v1::QUEUED}, v1::ASSIGNED, "pool p1").ok());
  auto wrong = (*store)->Transition(id, {v1::QUEUED}, v1::RUNNING, "again");
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(wrong.status().message().find("ASSIGNED"), std::string::npos);
  auto running = (*store)->Transition(id, {v1::ASSIGNED}, v1::RUNNING, "started");
  ASSERT_TRUE(running.ok());
  EXPECT_EQ(running->state(), v1::RUNNING);
  EXPECT_EQ(running->reason(), "started");
  auto events = (*store)->Events(id, 0);
  ASSERT_TRUE(events.ok());
  ASSERT_EQ(events->size(), 3u);
  EXPECT_EQ((*events)[0].text, "QUEUED: submitted");
  EXPECT_EQ((*events)[2].text, "RUNNING: started");
  EXPECT_EQ((*events)[2].offset, 2);
  auto tail = (*store)->Events(id, 2);
  ASSERT_EQ(tail->size(), 1u);
}

TEST_F(JobStoreTest, EverythingSurvivesReopeningTheFile) {
  std::string id;
  {
    auto store = JobStore::Open(path_);
    ASSERT_TRUE(store.ok());
    id = (*store)->Submit(Spec("kept"), "key-kept")->job.id();
    ASSERT_TRUE((*store)->Transition(id, {v1::QUEUED}, v1::CANCELLED, "by test").ok());
  }
  auto store = JobStore::Open(path_);
  ASSERT_TRUE(store.ok()) << store.status();
  auto job = (*store)->Get(id);
  ASSERT_TRUE(job.ok());
  EXPECT_EQ(job->state(), v1::CANCELLED);
  EXPECT_EQ(job->spec().data().induction_heads().seq_len(), 32);
  EXPECT_FALSE((*store)->Submit(Spec("kept"), "key-kept")->created);
  EXPECT_EQ((*store)->Events(id, 0)->size(), 2u);
  // A new job continues the numbering.
  EXPECT_GT((*store)->Submit(Spec("new"), "")->job.id(), id);
}

TEST_F(JobStoreTest, RefusesAFileFromANewerCoordinatorOrNotADatabase) {
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
    ASSERT_EQ(sqlite3_exec(db, "PRAGMA user_version = 99", nullptr, nullptr, nullptr), SQLITE_OK);
    sqlite3_close(db);
  }
  auto store = JobStore::Open(path_);
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(store.status().message().find("newer coordinator"), std::string::npos);
  std::filesystem::remove(path_);
  { std::ofstream(path_) << "this is not a database, but long enough to look like a header....."; }
  EXPECT_FALSE(JobStore::Open(path_).ok());
}

// A file of schema version 1 (no pool column) is migrated forward when opened, its jobs kept.
TEST_F(JobStoreTest, MigratesAVersionOneFileForward) {
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
    const v1::JobSpec spec = Spec("old");
    std::string bytes;
    spec.SerializeToString(&bytes);
    ASSERT_EQ(sqlite3_exec(db, R"sql(
      CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL, spec BLOB NOT NULL, state INTEGER NOT NULL,
        reason TEXT NOT NULL DEFAULT '', priority INTEGER NOT NULL, idempotency_key TEXT UNIQUE,
        created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
        restarts INTEGER NOT NULL DEFAULT 0);
      CREATE INDEX jobs_by_state ON jobs(state, seq);
      CREATE TABLE events (job_id TEXT NOT NULL REFERENCES jobs(id), offset INTEGER NOT NULL,
        unix_ms INTEGER NOT NULL, kind TEXT NOT NULL, text TEXT NOT NULL,
        PRIMARY KEY (job_id, offset));
      PRAGMA user_version = 1;)sql",
                           nullptr, nullptr, nullptr),
              SQLITE_OK);
    sqlite3_stmt* insert = nullptr;
    ASSERT_EQ(sqlite3_prepare_v2(db,
                                 "INSERT INTO jobs (id, name, spec, state, priority, created_ms, "
                                 "updated_ms) VALUES ('job-000001', 'old', ?1, 1, 0, 1, 1)",
                                 -1, &insert, nullptr),
              SQLITE_OK);
    sqlite3_bind_blob(insert, 1, bytes.data(), int(bytes.size()), SQLITE_TRANSIENT);
    ASSERT_EQ(sqlite3_step(insert), SQLITE_DONE);
    sqlite3_finalize(insert);
    sqlite3_close(db);
  }
  auto store = JobStore::Open(path_);
  ASSERT_TRUE(store.ok()) << store.status();
  auto job = (*store)->Get("job-000001");
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->name(), "old");
  EXPECT_EQ(job->pool_id(), "");
  auto assigned = (*store)->AssignNext("pool-x", 1, "cpu");
  ASSERT_TRUE(assigned.ok() && assigned->has_value());
  EXPECT_EQ((**assigned).pool_id(), "pool-x");
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* version = nullptr;
  sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &version, nullptr);
  ASSERT_EQ(sqlite3_step(version), SQLITE_ROW);
  EXPECT_EQ(sqlite3_column_int(version, 0), JobStore::kSchemaVersion);
  sqlite3_finalize(version);
  sqlite3_close(db);
}

// Scheduling: priority first, then the oldest; only jobs that fit; a recovering job counts a
// restart.
TEST_F(JobStoreTest, AssignsByPriorityThenAgeAmongJobsThatFit) {
  auto store = JobStore::Open(path_);
  ASSERT_TRUE(store.ok());
  v1::JobSpec low = Spec("low"), high = Spec("high"), wide = Spec("wide");
  high.set_priority(5);
  wide.set_priority(9);
  wide.mutable_parallel()->set_sp(4);
  const std::string low_id = (*store)->Submit(low, "")->job.id();
  const std::string high_id = (*store)->Submit(high, "")->job.id();
  (*store)->Submit(wide, "").IgnoreError();
  // A pool of 2 cpu ranks: the sp 4 job does not fit it.
  auto first = (*store)->AssignNext("p", 2, "cpu");
  ASSERT_TRUE(first.ok() && first->has_value());
  EXPECT_EQ((**first).id(), high_id);
  EXPECT_EQ((**first).state(), v1::ASSIGNED);
  auto second = (*store)->AssignNext("p", 2, "cpu");
  EXPECT_EQ((**second).id(), low_id);
  EXPECT_FALSE((*store)->AssignNext("p", 2, "cpu")->has_value());   // only the wide one is left
  EXPECT_FALSE((*store)->AssignNext("g", 4, "cuda")->has_value());  // another backend
  EXPECT_TRUE((*store)->AssignNext("w", 4, "cpu")->has_value());    // the wide one fits 4 ranks
  ASSERT_TRUE((*store)->Transition(low_id, {v1::ASSIGNED}, v1::RECOVERING, "pool lost").ok());
  auto again = (*store)->AssignNext("q", 2, "cpu");
  EXPECT_EQ((**again).id(), low_id);
  EXPECT_EQ((**again).restarts(), 1);
  EXPECT_EQ((**again).pool_id(), "q");
}

}  // namespace
}  // namespace mamba::coordinator
