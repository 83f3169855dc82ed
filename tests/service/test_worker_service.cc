// WorkerService over real gRPC on loopback, driven as pools would: registration, assignment by
// fit, a lease that expires (the job RECOVERING, then given to another pool, counting a restart),
// the lost pool told to drop the job when it comes back, and completion only by the holder.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <thread>

#include "coordinator/job_service.h"
#include "coordinator/worker_service.h"
#include "grpcpp/grpcpp.h"
#include "worker/job_spec.h"

namespace mamba::coordinator {
namespace {

class WorkerServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    db_ = ::testing::TempDir() + "/worker-service-" + std::to_string(getpid()) + ".db";
    std::filesystem::remove(db_);
    store_ = std::move(*JobStore::Open(db_));
    WorkerServiceOptions o;
    o.heartbeat = absl::Milliseconds(50);
    o.lease = absl::Seconds(1);
    o.checkpoint_root = ::testing::TempDir() + "/ws-ckpt";
    workers_ = std::make_unique<WorkerServiceImpl>(store_.get(), o);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(workers_.get());
    server_ = builder.BuildAndStart();
    stub_ = v1::WorkerService::NewStub(
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    server_->Shutdown();
    workers_.reset();
    for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(db_ + suffix);
  }
  std::string Register(int world, const std::string& id = "", const std::string& holding = "",
                       bool* drop = nullptr) {
    grpc::ClientContext c;
    v1::RegisterPoolRequest r;
    r.set_world_size(world);
    r.set_backend("cpu");
    r.set_pool_id(id);
    r.set_holding_job_id(holding);
    v1::RegisterPoolResponse response;
    EXPECT_TRUE(stub_->RegisterPool(&c, r, &response).ok());
    if (drop) *drop = response.drop_job();
    return response.pool_id();
  }
  v1::HeartbeatResponse Beat(const std::string& pool, const std::string& job = "") {
    grpc::ClientContext c;
    v1::HeartbeatRequest r;
    r.set_pool_id(pool);
    r.set_job_id(job);
    v1::HeartbeatResponse response;
    EXPECT_TRUE(stub_->Heartbeat(&c, r, &response).ok());
    return response;
  }
  std::string Submit(int sp) {
    auto spec = ParseJobSpecJson(R"({"data":{"inductionHeads":{"seqLen":32}},"parallel":{"sp":)" +
                                 std::to_string(sp) + "}}");
    return store_->Submit(*spec, "")->job.id();
  }
  v1::JobState State(const std::string& id) { return store_->Get(id)->state(); }

  std::string db_;
  std::unique_ptr<JobStore> store_;
  std::unique_ptr<WorkerServiceImpl> workers_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::WorkerService::Stub> stub_;
};

TEST_F(WorkerServiceTest, AJobRunsOnOnePoolAtATimeThroughLossAndRecovery) {
  const std::string wide = Submit(4), job = Submit(1);
  const std::string a = Register(2);
  // Pool a (2 ranks) gets the job it fits, never the sp-4 one.
  v1::HeartbeatResponse r = Beat(a);
  ASSERT_TRUE(r.has_assignment());
  EXPECT_EQ(r.assignment().job_id(), job);
  EXPECT_EQ(r.assignment().spec().checkpoint().dir(),
            ::testing::TempDir() + "/ws-ckpt/" + job);  // the default checkpoint directory
  EXPECT_FALSE(Beat(a).has_assignment());               // idle again: nothing else fits
  EXPECT_FALSE(Beat(a, job).drop_job());
  EXPECT_EQ(State(job), v1::RUNNING);
  // Pool a falls silent: its lease expires, the job recovers and goes to pool b.
  const std::string b = Register(2);
  for (int i = 0; i < 100 && State(job) != v1::RECOVERING; ++i) {
    Beat(b);  // keeps b alive (and may already take the job)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (store_->Get(job)->pool_id() == b) break;
  }
  Beat(b);
  auto now = store_->Get(job);
  ASSERT_EQ(now->pool_id(), b) << v1::JobState_Name(now->state()) << " " << now->reason();
  EXPECT_EQ(now->restarts(), 1);
  // Pool a comes back still holding the job: told to drop it, now and on every heartbeat.
  bool drop = false;
  EXPECT_EQ(Register(2, a, job, &drop), a);
  EXPECT_TRUE(drop);
  EXPECT_TRUE(Beat(a, job).drop_job());
  // Only the holder may complete it.
  grpc::ClientContext c1;
  v1::CompleteJobRequest done;
  done.set_pool_id(a);
  done.set_job_id(job);
  done.set_state(v1::SUCCEEDED);
  v1::CompleteJobResponse response;
  EXPECT_EQ(stub_->CompleteJob(&c1, done, &response).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  done.set_pool_id(b);
  grpc::ClientContext c2;
  EXPECT_TRUE(stub_->CompleteJob(&c2, done, &response).ok());
  EXPECT_EQ(State(job), v1::SUCCEEDED);
  EXPECT_EQ(State(wide), v1::QUEUED);
  // An unknown pool is told to register.
  EXPECT_TRUE(Beat("pool-nobody").unknown_pool());
}

}  // namespace
}  // namespace mamba::coordinator
