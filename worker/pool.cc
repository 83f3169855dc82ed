#include "worker/pool.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "grpcpp/grpcpp.h"
#include "proto/service.grpc.pb.h"
#include "worker/comm/mpi_communicator.h"
#include "worker/comm/process_groups.h"

namespace mamba {
namespace {

std::atomic<bool> g_stop{false};

// What rank 0 tells the other ranks between jobs.
enum Command : int32_t { kExit = 0, kRun = 1 };

// The control channel: rank 0's commands to every rank, waiting without a deadline (a pool may
// stay idle for long). Without MPI (one process) there is no one to tell.
class Control {
 public:
  explicit Control(const comm::MpiRuntime& mpi) {
    if (!mpi.active() || mpi.world_size() == 1) return;
    MPI_Comm dup;
    MPI_Comm_dup(MPI_COMM_WORLD, &dup);
    comm_ =
        std::make_unique<comm::MpiCommunicator>(dup, "control", nullptr, absl::InfiniteDuration());
  }
  // Rank 0 sends (command, bytes); the others receive them.
  absl::Status Share(Command& command, std::string& bytes) {
    if (!comm_) return absl::OkStatus();
    Tensor head = Tensor::Empty({2}, DType::kI32);
    head.data<int32_t>()[0] = command;
    head.data<int32_t>()[1] = static_cast<int32_t>(bytes.size());
    if (absl::Status s = comm_->Broadcast(head, 0); !s.ok()) return s;
    command = static_cast<Command>(head.data<int32_t>()[0]);
    const int32_t n = head.data<int32_t>()[1];
    Tensor body = Tensor::Empty({(n + 3) / 4}, DType::kI32);
    if (comm_->rank() == 0) std::copy(bytes.begin(), bytes.end(), static_cast<char*>(body.raw()));
    if (absl::Status s = comm_->Broadcast(body, 0); !s.ok()) return s;
    bytes.assign(static_cast<const char*>(body.raw()), n);
    return absl::OkStatus();
  }
  // True on every rank when `ok` holds on every rank.
  bool AllOk(bool ok) {
    if (!comm_) return ok;
    Tensor t = Tensor::Zeros({1}, DType::kI32);
    t.data<int32_t>()[0] = ok ? 0 : 1;
    return comm_->AllReduceSum(t).ok() && t.data<int32_t>()[0] == 0;
  }

 private:
  std::unique_ptr<comm::MpiCommunicator> comm_;
};

// Rank 0's link to the coordinator.
class Link {
 public:
  explicit Link(const PoolOptions& o)
      : options_(o),
        stub_(v1::WorkerService::NewStub(grpc::CreateChannel(o.coordinator, Credentials(o)))) {}

  static std::shared_ptr<grpc::ChannelCredentials> Credentials(const PoolOptions& o) {
    if (o.tls_ca.empty()) return grpc::InsecureChannelCredentials();
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = o.tls_ca;
    return grpc::SslCredentials(ssl);
  }

  std::unique_ptr<grpc::ClientContext> Context() const {
    auto c = std::make_unique<grpc::ClientContext>();
    c->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    if (!options_.token.empty()) c->AddMetadata("authorization", "Bearer " + options_.token);
    return c;
  }
  // Registers (again, naming the held job, after a coordinator restart); retries while the
  // coordinator is unreachable. Returns false when asked to drop `holding`.
  bool Register(const std::string& holding, std::ostream& log) {
    v1::RegisterPoolRequest r;
    r.set_world_size(comm::MpiRuntime::Get().world_size());
    r.set_backend(options_.backend);
    r.set_devices(options_.backend == "cuda" ? r.world_size() : 0);
    char host[256] = {};
    gethostname(host, sizeof(host) - 1);
    r.set_host(host);
    r.set_pool_id(pool_id_);
    r.set_holding_job_id(holding);
    for (int attempt = 0; !g_stop; ++attempt) {
      v1::RegisterPoolResponse response;
      const grpc::Status s = stub_->RegisterPool(Context().get(), r, &response);
      if (s.ok()) {
        if (pool_id_.empty()) {
          log << absl::StrFormat("pool %s: registered with %s (%d ranks, backend %s)\n",
                                 response.pool_id(), options_.coordinator, r.world_size(),
                                 options_.backend);
        }
        pool_id_ = response.pool_id();
        heartbeat_ = std::chrono::milliseconds(std::max<int64_t>(50, response.heartbeat_ms()));
        return !response.drop_job();
      }
      if (s.error_code() == grpc::StatusCode::UNAUTHENTICATED ||
          s.error_code() == grpc::StatusCode::INVALID_ARGUMENT) {
        log << "pool: the coordinator refuses to register it: " << s.error_message() << "\n";
        g_stop = true;
        return false;
      }
      if (attempt % 10 == 0) {
        log << "pool: waiting for the coordinator at " << options_.coordinator << " ("
            << s.error_message() << ")\n";
      }
      std::this_thread::sleep_for(std::chrono::seconds(1));
    }
    return false;
  }
  const std::string& pool_id() const { return pool_id_; }
  std::chrono::milliseconds heartbeat() const { return heartbeat_; }
  v1::WorkerService::Stub& stub() { return *stub_; }

 private:
  PoolOptions options_;
  std::unique_ptr<v1::WorkerService::Stub> stub_;
  std::string pool_id_;
  std::chrono::milliseconds heartbeat_{1000};
};

// Rank 0's observer of a running job: heartbeats with progress (and learns of a cancellation),
// ships the log's new lines as events. On the other ranks it does nothing.
class JobObserver final : public TrainObserver {
 public:
  JobObserver(Link* link, std::string job_id, std::stringstream* log_lines)
      : link_(link), job_id_(std::move(job_id)), lines_(log_lines) {}
  void OnStep(int64_t step, double loss, double tokens_per_second) override {
    if (link_ == nullptr) return;
    step_ = step;
    const auto now = std::chrono::steady_clock::now();
    if (now - last_ < link_->heartbeat()) return;
    last_ = now;
    v1::HeartbeatRequest r;
    r.set_pool_id(link_->pool_id());
    r.set_job_id(job_id_);
    r.set_step(step);
    r.set_loss(loss);
    r.set_tokens_per_second(tokens_per_second);
    v1::HeartbeatResponse response;
    if (link_->stub().Heartbeat(link_->Context().get(), r, &response).ok()) {
      if (response.unknown_pool()) dropped_ = !link_->Register(job_id_, std::cout);
      cancelled_ |= response.cancel();
      dropped_ |= response.drop_job();
    }
    Flush();
  }
  void OnCheckpoint(const std::string& dir) override { checkpoints_.push_back(dir); }
  bool ShouldStop() override { return cancelled_ || dropped_ || g_stop; }
  // Sends the log lines written since the last call.
  void Flush() {
    if (link_ == nullptr || dropped_) return;
    v1::ReportEventsRequest r;
    r.set_pool_id(link_->pool_id());
    r.set_job_id(job_id_);
    std::string line;
    while (std::getline(*lines_, line)) {
      v1::JobEvent& e = *r.add_events();
      e.set_kind(line.rfind("  checkpoint:", 0) == 0 ? "checkpoint" : "log");
      e.set_text(line);
    }
    lines_->clear();
    if (r.events_size() > 0) {
      v1::ReportEventsResponse response;
      (void)link_->stub().ReportEvents(link_->Context().get(), r, &response);
    }
  }
  bool cancelled() const { return cancelled_; }
  bool dropped() const { return dropped_; }
  int64_t step() const { return step_; }

 private:
  Link* link_;
  std::string job_id_;
  std::stringstream* lines_;
  std::chrono::steady_clock::time_point last_{};
  int64_t step_ = 0;
  bool cancelled_ = false, dropped_ = false;
  std::vector<std::string> checkpoints_;
};

// A stream that writes to `out` and keeps a copy of every line for the events.
class TeeBuffer : public std::streambuf {
 public:
  TeeBuffer(std::ostream& out, std::stringstream& copy) : out_(out), copy_(copy) {}

 protected:
  int overflow(int c) override {
    if (c != EOF) {
      out_.put(static_cast<char>(c));
      copy_.put(static_cast<char>(c));
    }
    return c;
  }
  int sync() override {
    out_.flush();
    return 0;
  }

 private:
  std::ostream& out_;
  std::stringstream& copy_;
};

}  // namespace

int RunPool(const PoolOptions& options, std::ostream& log) {
  const comm::MpiRuntime& mpi = comm::MpiRuntime::Get();
  const bool root = mpi.world_rank() == 0;
  std::signal(SIGINT, [](int) { g_stop = true; });
  std::signal(SIGTERM, [](int) { g_stop = true; });
  Control control(mpi);
  std::unique_ptr<Link> link = root ? std::make_unique<Link>(options) : nullptr;
  if (root && !link->Register("", log)) g_stop = true;
  for (;;) {
    // Rank 0 waits for an assignment; then every rank learns the next command.
    Command command = kExit;
    std::string bytes;
    std::string job_id;
    if (root) {
      while (!g_stop) {
        v1::HeartbeatRequest r;
        r.set_pool_id(link->pool_id());
        v1::HeartbeatResponse response;
        const grpc::Status s = link->stub().Heartbeat(link->Context().get(), r, &response);
        if (s.ok() && response.unknown_pool()) {
          link->Register("", log);
        } else if (s.ok() && response.has_assignment()) {
          command = kRun;
          response.assignment().SerializeToString(&bytes);
          break;
        }
        std::this_thread::sleep_for(link->heartbeat());
      }
    }
    if (absl::Status s = control.Share(command, bytes); !s.ok()) {
      log << "pool: rank " << mpi.world_rank() << ": " << s.message() << "\n";
      return 2;
    }
    if (command == kExit) break;
    v1::JobAssignment assignment;
    assignment.ParseFromString(bytes);
    job_id = assignment.job_id();
    if (root) log << "job " << job_id << ": assigned\n";

    std::stringstream lines;
    TeeBuffer tee_buffer(log, lines);
    std::ostream tee(&tee_buffer);
    JobObserver observer(link.get(), job_id, &lines);
    RankOptions rank = options.rank;
    rank.observer = &observer;
    auto trainer = Trainer::Create(assignment.spec(), rank);
    // Every rank must have its trainer, or none trains (a file one node cannot read, say).
    absl::StatusOr<TrainSummary> summary =
        absl::FailedPreconditionError("another rank could not set the job up");
    if (control.AllOk(trainer.ok())) {
      summary = (*trainer)->Run(tee);
    } else if (!trainer.ok()) {
      summary = trainer.status();
    }
    trainer = absl::CancelledError("done");  // releases the job's memory before the next
    if (!root) continue;
    observer.Flush();
    if (observer.dropped()) {
      log << "job " << job_id << ": given to another pool; dropped\n";
      continue;
    }
    v1::CompleteJobRequest done;
    done.set_pool_id(link->pool_id());
    done.set_job_id(job_id);
    if (!summary.ok()) {
      done.set_state(v1::FAILED);
      done.set_reason(std::string(summary.status().message()));
    } else if (summary->stopped) {
      done.set_state(v1::CANCELLED);
      done.set_reason(absl::StrCat("stopped after step ", summary->steps,
                                   observer.cancelled() ? " (cancelled)" : " (the pool stopped)"));
    } else {
      done.set_state(v1::SUCCEEDED);
      done.set_reason(absl::StrFormat("%d steps, loss %.4f -> %.4f, %.0f tokens/s", summary->steps,
                                      summary->first_loss, summary->final_loss,
                                      summary->tokens_per_second));
    }
    log << "job " << job_id << ": " << v1::JobState_Name(done.state()) << " (" << done.reason()
        << ")\n";
    // The report must arrive: while the coordinator is away (restarting), try again; after a
    // restart, register again first (naming the job, which it may have given away meanwhile).
    for (int attempt = 0; !g_stop; ++attempt) {
      v1::CompleteJobResponse response;
      const grpc::Status s = link->stub().CompleteJob(link->Context().get(), done, &response);
      if (s.ok()) break;
      if (s.error_code() == grpc::StatusCode::FAILED_PRECONDITION ||
          s.error_code() == grpc::StatusCode::NOT_FOUND) {
        log << "job " << job_id << ": the coordinator refuses the report (" << s.error_message()
            << "); dropped\n";
        break;
      }
      if (attempt % 10 == 0) {
        log << "job " << job_id << ": reporting again (" << s.error_message() << ")\n";
      }
      std::this_thread::sleep_for(std::chrono::seconds(1));
      if (s.error_code() == grpc::StatusCode::UNAVAILABLE && !link->Register(job_id, log)) break;
    }
  }
  if (root) log << "pool " << (link ? link->pool_id() : "") << ": stopped\n";
  return 0;
}

}  // namespace mamba
