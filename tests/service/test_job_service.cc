// JobService over real gRPC on loopback (an in-process server on a free port, a real channel):
// the bearer token, specs checked before anything is stored, idempotent submission, NOT_FOUND,
// paging, and cancellation's rules.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
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

// Bad input, each with its status code and message, and nothing stored by any of them.
TEST_F(JobServiceTest, BadInputGetsItsStatusAndChangesNothing) {
  // Jobs stored on purpose: one under a key, one finished.
  v1::SubmitJobResponse r;
  ASSERT_TRUE(stub_->SubmitJob(Context().get(), Request(32, "kept"), &r).ok());
  const std::string kept = r.job().id();
  ASSERT_TRUE(stub_->SubmitJob(Context().get(), Request(40, ""), &r).ok());
  const std::string finished = r.job().id();
  ASSERT_TRUE(store_->Transition(finished, {v1::QUEUED}, v1::CANCELLED, "test").ok());
  const size_t events_before = store_->Events(kept, 0)->size();

  struct Case {
    std::string what;
    std::function<void(v1::JobSpec&)> edit;
    std::string message;
  };
  const std::vector<Case> specs = {
      {"d_state", [](v1::JobSpec& s) { s.mutable_model()->set_d_state(300); },
       "model.d_state: must be in [1, 256], got 300"},
      {"d_model", [](v1::JobSpec& s) { s.mutable_model()->set_d_model(0); }, "model.d_model"},
      {"n_layer", [](v1::JobSpec& s) { s.mutable_model()->set_n_layer(0); }, "model.n_layer"},
      {"d_conv", [](v1::JobSpec& s) { s.mutable_model()->set_d_conv(17); }, "model.d_conv"},
      {"expand", [](v1::JobSpec& s) { s.mutable_model()->set_expand(0); }, "model.expand"},
      {"dt_rank", [](v1::JobSpec& s) { s.mutable_model()->set_dt_rank(0); }, "model.dt_rank"},
      {"vocab", [](v1::JobSpec& s) { s.mutable_model()->set_vocab_size(0); }, "model.vocab_size"},
      {"no data", [](v1::JobSpec& s) { s.clear_data(); }, "data: one source is required"},
      {"lr", [](v1::JobSpec& s) { s.mutable_optimizer()->set_lr(-1); }, "optimizer.lr"},
      {"beta1", [](v1::JobSpec& s) { s.mutable_optimizer()->set_beta1(1.5); }, "optimizer.beta1"},
      {"beta2", [](v1::JobSpec& s) { s.mutable_optimizer()->set_beta2(-0.5); }, "optimizer.beta2"},
      {"eps", [](v1::JobSpec& s) { s.mutable_optimizer()->set_eps(0); }, "optimizer.eps"},
      {"wd", [](v1::JobSpec& s) { s.mutable_optimizer()->set_weight_decay(-1); },
       "optimizer.weight_decay"},
      {"clip", [](v1::JobSpec& s) { s.mutable_optimizer()->set_grad_clip(-1); },
       "optimizer.grad_clip"},
      {"lr nan", [](v1::JobSpec& s) { s.mutable_optimizer()->set_lr(std::nan("")); },
       "optimizer.lr"},
      {"steps", [](v1::JobSpec& s) { s.set_steps(0); }, "steps: must be in"},
      {"warmup",
       [](v1::JobSpec& s) { s.set_steps(10), s.mutable_schedule()->set_warmup_steps(11); },
       "schedule.warmup_steps"},
      {"min lr", [](v1::JobSpec& s) { s.mutable_schedule()->set_min_lr_ratio(2); },
       "schedule.min_lr_ratio"},
      {"batch", [](v1::JobSpec& s) { s.set_batch_size(0); }, "batch_size"},
      {"log_every", [](v1::JobSpec& s) { s.set_log_every(0); }, "log_every"},
      {"eval batches", [](v1::JobSpec& s) { s.mutable_eval()->set_batches(-1); }, "eval.batches"},
      {"eval len", [](v1::JobSpec& s) { s.mutable_eval()->add_seq_lens(0); }, "eval.seq_lens[0]"},
      {"sp", [](v1::JobSpec& s) { s.mutable_parallel()->set_sp(0); }, "parallel.sp"},
      {"dp", [](v1::JobSpec& s) { s.mutable_parallel()->set_dp(3); },
       "batch_size: must be a multiple of parallel.dp (3)"},
      {"bucket", [](v1::JobSpec& s) { s.mutable_parallel()->set_grad_bucket_mb(-1); },
       "parallel.grad_bucket_mb"},
      {"backend", [](v1::JobSpec& s) { s.set_backend("tpu"); }, "backend: must be"},
      {"precision", [](v1::JobSpec& s) { s.set_precision("fp8"); }, "precision: must be"},
      {"cpu bf16", [](v1::JobSpec& s) { s.set_precision("bf16"); },
       "precision: the cpu backend trains in fp32 only"},
      {"ckpt dtype", [](v1::JobSpec& s) { s.mutable_checkpoint()->set_dtype("fp16"); },
       "checkpoint.dtype"},
      {"keep_last", [](v1::JobSpec& s) { s.mutable_checkpoint()->set_keep_last(-1); },
       "checkpoint.keep_last"},
      {"resume+init",
       [](v1::JobSpec& s) {
         s.mutable_checkpoint()->set_resume_from("a");
         s.mutable_checkpoint()->set_init_from("b");
       },
       "checkpoint.init_from: cannot be combined"},
      {"priority", [](v1::JobSpec& s) { s.set_priority(2000000); }, "priority: must be in"},
      {"restarts", [](v1::JobSpec& s) { s.set_max_restarts(-1); }, "max_restarts: must be in"},
      {"dir outside", [](v1::JobSpec& s) { s.mutable_checkpoint()->set_dir("/etc/jobs"); },
       "checkpoint.dir: \"/etc/jobs\" lies outside --checkpoint_root"},
      {"dir ..", [](v1::JobSpec& s) { s.mutable_checkpoint()->set_dir("../../x"); },
       "checkpoint.dir"},
      {"resume outside", [](v1::JobSpec& s) { s.mutable_checkpoint()->set_resume_from("/tmp/r"); },
       "checkpoint.resume_from"},
  };
  for (const Case& c : specs) {
    v1::SubmitJobRequest req = Request(32, "");
    c.edit(*req.mutable_spec());
    const grpc::Status s = stub_->SubmitJob(Context().get(), req, &r);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.what;
    EXPECT_NE(s.error_message().find(c.message), std::string::npos)
        << c.what << ": " << s.error_message();
  }
  const auto expect = [](const grpc::Status& s, grpc::StatusCode code, const std::string& message,
                         const std::string& what) {
    EXPECT_EQ(s.error_code(), code) << what << ": " << s.error_message();
    EXPECT_NE(s.error_message().find(message), std::string::npos)
        << what << ": " << s.error_message();
  };
  expect(stub_->SubmitJob(Context().get(), v1::SubmitJobRequest(), &r),
         grpc::StatusCode::INVALID_ARGUMENT, "spec: required", "no spec");
  expect(stub_->SubmitJob(Context().get(), Request(64, "kept"), &r),
         grpc::StatusCode::ALREADY_EXISTS, "idempotency_key \"kept\"", "a reused key");
  expect(stub_->SubmitJob(Context("wrong").get(), Request(32, ""), &r),
         grpc::StatusCode::UNAUTHENTICATED, "Bearer", "a wrong token");
  v1::SubmitJobRequest huge = Request(32, "");
  huge.mutable_spec()->set_name(std::string(5 << 20, 'x'));
  EXPECT_EQ(stub_->SubmitJob(Context().get(), huge, &r).error_code(),
            grpc::StatusCode::RESOURCE_EXHAUSTED)
      << "an oversized message";
  v1::Job job;
  v1::GetJobRequest get;
  get.set_id("job-999999");
  expect(stub_->GetJob(Context().get(), get, &job), grpc::StatusCode::NOT_FOUND,
         "job job-999999: no such job", "an unknown id");
  v1::CancelJobRequest cancel;
  cancel.set_id("nope");
  expect(stub_->CancelJob(Context().get(), cancel, &job), grpc::StatusCode::NOT_FOUND,
         "no such job", "cancelling an unknown id");
  cancel.set_id(finished);
  expect(stub_->CancelJob(Context().get(), cancel, &job), grpc::StatusCode::FAILED_PRECONDITION,
         "is CANCELLED", "cancelling a finished job");
  v1::ListJobsRequest list;
  v1::ListJobsResponse listed;
  list.set_page_size(5000);
  expect(stub_->ListJobs(Context().get(), list, &listed), grpc::StatusCode::INVALID_ARGUMENT,
         "page_size", "a page too large");
  list.set_page_size(10);
  list.set_page_token("zz");
  expect(stub_->ListJobs(Context().get(), list, &listed), grpc::StatusCode::INVALID_ARGUMENT,
         "page_token", "a token never given");
  for (const int64_t from : {int64_t{-1}, int64_t{1000}}) {
    v1::WatchJobRequest w;
    w.set_id(finished);
    w.set_from_offset(from);
    auto c = Context();
    auto reader = stub_->WatchJob(c.get(), w);
    v1::JobUpdate u;
    EXPECT_FALSE(reader->Read(&u));
    expect(reader->Finish(),
           from < 0 ? grpc::StatusCode::INVALID_ARGUMENT : grpc::StatusCode::OUT_OF_RANGE,
           "from_offset", "watching from " + std::to_string(from));
  }
  // Nothing was stored or changed by any of it.
  auto all = store_->List(v1::JOB_STATE_UNSPECIFIED, "", 100, "");
  ASSERT_EQ(all->jobs.size(), 2u);
  EXPECT_EQ(store_->Get(kept)->state(), v1::QUEUED);
  EXPECT_EQ(store_->Events(kept, 0)->size(), events_before);
}

// Many clients submitting with one key at once get one job.
TEST_F(JobServiceTest, ConcurrentSubmissionsWithOneKeyMakeOneJob) {
  constexpr int kClients = 16;
  std::vector<std::string> ids(kClients);
  std::vector<bool> created(kClients);
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i) {
    clients.emplace_back([&, i] {
      v1::SubmitJobResponse r;
      if (stub_->SubmitJob(Context().get(), Request(32, "one-key"), &r).ok()) {
        ids[i] = r.job().id();
        created[i] = r.created();
      }
    });
  }
  for (auto& t : clients) t.join();
  EXPECT_EQ(std::count(created.begin(), created.end(), true), 1);
  for (const std::string& id : ids) EXPECT_EQ(id, ids[0]);
  EXPECT_EQ(store_->List(v1::JOB_STATE_UNSPECIFIED, "", 100, "")->jobs.size(), 1u);
}

}  // namespace
}  // namespace mamba::coordinator
