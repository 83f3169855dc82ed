// JobService over real gRPC on loopback (an in-process server on a free port, a real channel):
// the bearer token, specs checked before anything is stored, idempotent submission, NOT_FOUND,
// paging, and cancellation's rules.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "coordinator/job_service.h"
#include "grpcpp/grpcpp.h"

namespace mamba::coordinator {
namespace {

class JobServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    db_ = ::testing::TempDir() + "/job-service-" + std::to_string(getpid()) + ".db";
    std::filesystem::remove(db_);
    auto store = JobStore::Open(db_);
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    service_ = std::make_unique<JobServiceImpl>(store_.get(), "t0ken", CheckpointRoot());
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(port, 0);
    stub_ = v1::JobService::NewStub(
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    server_->Shutdown();
    for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(db_ + suffix);
  }
  static std::string CheckpointRoot() {
    return ::testing::TempDir() + "/job-service-ckpt-" + std::to_string(getpid());
  }
  std::unique_ptr<grpc::ClientContext> Context(const std::string& token = "t0ken") {
    auto c = std::make_unique<grpc::ClientContext>();
    c->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    if (!token.empty()) c->AddMetadata("authorization", "Bearer " + token);
    return c;
  }
  v1::SubmitJobRequest Request(int seq_len, const std::string& key) {
    v1::SubmitJobRequest r;
    r.mutable_spec()->set_name("ih");
    r.mutable_spec()->mutable_data()->mutable_induction_heads()->set_seq_len(seq_len);
    r.set_idempotency_key(key);
    return r;
  }

  std::string db_;
  std::unique_ptr<JobStore> store_;
  std::unique_ptr<JobServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::JobService::Stub> stub_;
};

TEST_F(JobServiceTest, EveryCallNeedsTheToken) {
  v1::ListJobsResponse list;
  for (const std::string token : {"", "wrong"}) {
    const grpc::Status s = stub_->ListJobs(Context(token).get(), v1::ListJobsRequest(), &list);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << token;
  }
  v1::SubmitJobResponse submitted;
  EXPECT_EQ(stub_->SubmitJob(Context("").get(), Request(32, ""), &submitted).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(store_->List(v1::JOB_STATE_UNSPECIFIED, "", 10, "")->jobs.empty());
  EXPECT_TRUE(stub_->ListJobs(Context().get(), v1::ListJobsRequest(), &list).ok());
}

TEST_F(JobServiceTest, SubmitChecksTheSpecAndIsIdempotent) {
  v1::SubmitJobResponse r;
  v1::SubmitJobRequest bad = Request(32, "k");
  bad.mutable_spec()->mutable_model()->set_d_state(300);
  grpc::Status s = stub_->SubmitJob(Context().get(), bad, &r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(), "model.d_state: must be in [1, 256], got 300");
  EXPECT_EQ(stub_->SubmitJob(Context().get(), v1::SubmitJobRequest(), &r).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  ASSERT_TRUE(stub_->SubmitJob(Context().get(), Request(32, "k"), &r).ok());
  EXPECT_TRUE(r.created());
  EXPECT_EQ(r.job().state(), v1::QUEUED);
  EXPECT_EQ(r.job().spec().model().d_model(), 64);  // resolved: defaults filled in
  const std::string id = r.job().id();
  ASSERT_TRUE(stub_->SubmitJob(Context().get(), Request(32, "k"), &r).ok());
  EXPECT_FALSE(r.created());
  EXPECT_EQ(r.job().id(), id);
  s = stub_->SubmitJob(Context().get(), Request(64, "k"), &r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::ALREADY_EXISTS);
  v1::Job job;
  v1::GetJobRequest get;
  get.set_id(id);
  ASSERT_TRUE(stub_->GetJob(Context().get(), get, &job).ok());
  EXPECT_EQ(job.id(), id);
  get.set_id("job-424242");
  EXPECT_EQ(stub_->GetJob(Context().get(), get, &job).error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(JobServiceTest, ListsPagesAndCancels) {
  v1::SubmitJobResponse r;
  std::vector<std::string> ids;
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(stub_->SubmitJob(Context().get(), Request(32 + i, ""), &r).ok());
    ids.push_back(r.job().id());
  }
  v1::ListJobsRequest req;
  req.set_page_size(2);
  std::vector<std::string> seen;
  do {
    v1::ListJobsResponse page;
    ASSERT_TRUE(stub_->ListJobs(Context().get(), req, &page).ok());
    for (const auto& j : page.jobs()) seen.push_back(j.id());
    req.set_page_token(page.next_page_token());
  } while (!req.page_token().empty());
  EXPECT_EQ(seen, std::vector<std::string>(ids.rbegin(), ids.rend()));
  req.set_page_size(5000);
  v1::ListJobsResponse page;
  EXPECT_EQ(stub_->ListJobs(Context().get(), req, &page).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);

  v1::CancelJobRequest cancel;
  cancel.set_id(ids[0]);
  v1::Job job;
  ASSERT_TRUE(stub_->CancelJob(Context().get(), cancel, &job).ok());
  EXPECT_EQ(job.state(), v1::CANCELLED);
  EXPECT_EQ(stub_->CancelJob(Context().get(), cancel, &job).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  // A running job stops at its next step instead.
  ASSERT_TRUE(store_->Transition(ids[1], {v1::QUEUED}, v1::ASSIGNED, "pool").ok());
  ASSERT_TRUE(store_->Transition(ids[1], {v1::ASSIGNED}, v1::RUNNING, "started").ok());
  cancel.set_id(ids[1]);
  ASSERT_TRUE(stub_->CancelJob(Context().get(), cancel, &job).ok());
  EXPECT_EQ(job.state(), v1::STOPPING);
}

// WatchJob: every event in order, resumable from any offset (nothing missed, nothing twice), and
// the stream closes once the job has ended.
TEST_F(JobServiceTest, WatchStreamsEventsFromAnOffsetUntilTheJobEnds) {
  v1::SubmitJobResponse r;
  ASSERT_TRUE(stub_->SubmitJob(Context().get(), Request(32, ""), &r).ok());
  const std::string id = r.job().id();
  ASSERT_TRUE(store_->Transition(id, {v1::QUEUED}, v1::ASSIGNED, "pool").ok());
  ASSERT_TRUE(store_->AddEvents(id, {{"log", "step 1"}, {"log", "step 2"}}).ok());
  // The job ends while a watcher follows it.
  std::thread ender([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    store_->Transition(id, {v1::ASSIGNED}, v1::CANCELLED, "by test").IgnoreError();
  });
  const auto watch = [&](int64_t from) {
    v1::WatchJobRequest w;
    w.set_id(id);
    w.set_from_offset(from);
    auto c = Context();
    auto reader = stub_->WatchJob(c.get(), w);
    std::vector<std::pair<int64_t, std::string>> got;
    v1::JobUpdate u;
    while (reader->Read(&u)) got.emplace_back(u.offset(), u.text());
    EXPECT_TRUE(reader->Finish().ok());
    return got;
  };
  const auto all = watch(0);
  ender.join();
  ASSERT_EQ(all.size(), 5u);
  for (size_t i = 0; i < all.size(); ++i) EXPECT_EQ(all[i].first, int64_t(i));
  EXPECT_EQ(all[0].second, "QUEUED: submitted");
  EXPECT_EQ(all[2].second, "step 1");
  EXPECT_EQ(all[4].second, "CANCELLED: by test");
  const auto rest = watch(3);
  ASSERT_EQ(rest.size(), 2u);
  EXPECT_EQ(rest[0], all[3]);
  EXPECT_EQ(rest[1], all[4]);
}

// GetProfile serves the report files a pool wrote into the job's checkpoint directory, and is
// NOT_FOUND while there are none.
TEST_F(JobServiceTest, GetProfileServesTheReportTheJobWrote) {
  v1::SubmitJobResponse r;
  v1::SubmitJobRequest req = Request(32, "");
  const std::string dir = CheckpointRoot() + "/profile-job";
  std::filesystem::remove_all(dir);
  req.mutable_spec()->mutable_checkpoint()->set_dir(dir);
  ASSERT_TRUE(stub_->SubmitJob(Context().get(), req, &r).ok());
  v1::GetProfileRequest get;
  get.set_id(r.job().id());
  v1::GetProfileResponse profile;
  grpc::Status s = stub_->GetProfile(Context().get(), get, &profile);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(s.error_message().find("has no profile"), std::string::npos);
  std::filesystem::create_directories(dir + "/profile");
  std::ofstream(dir + "/profile/profile.md") << "| kernel | ms |\n";
  std::ofstream(dir + "/profile/profile.json") << "{\"kernels\": []}";
  ASSERT_TRUE(stub_->GetProfile(Context().get(), get, &profile).ok());
  EXPECT_EQ(profile.files().size(), 2u);
  EXPECT_EQ(profile.files().at("profile.md"), "| kernel | ms |\n");
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace mamba::coordinator
