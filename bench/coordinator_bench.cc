// Coordinator benchmark: C concurrent gRPC clients against an in-process coordinator (the real
// services and SQLite store, on loopback) while simulated pools heartbeat. Three phases: a mix of
// 90 % reads (GetJob, ListJobs) and 10 % submissions; submissions alone; the mix again with W
// watchers following a running job. Prints RPCs/s and p50/p99 latency a phase, writes JSON.
//   coordinator_bench [--clients 8 --seconds 5 --pools 4 --watchers 100] [--json out.json]
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "coordinator/job_service.h"
#include "coordinator/worker_service.h"
#include "grpcpp/grpcpp.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(int, clients, 8, "concurrent clients");
ABSL_FLAG(double, seconds, 5, "length of each phase");
ABSL_FLAG(int, pools, 4, "simulated pools heartbeating every 100 ms");
ABSL_FLAG(int, watchers, 100, "watchers in the third phase");
ABSL_FLAG(std::string, json, "", "write results here");

namespace {

using Clock = std::chrono::steady_clock;
namespace v1 = mamba::v1;

struct Phase {
  std::string name;
  int64_t calls = 0, errors = 0;
  double seconds = 0, p50_ms = 0, p99_ms = 0;
};

double Percentile(std::vector<double>& v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * v.size()))];
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int clients = absl::GetFlag(FLAGS_clients);
  const double seconds = absl::GetFlag(FLAGS_seconds);
  const std::string dir = "/tmp/coordinator-bench-" + std::to_string(getpid());
  std::filesystem::create_directories(dir);
  auto store = mamba::coordinator::JobStore::Open(dir + "/jobs.db");
  if (!store.ok()) {
    std::fprintf(stderr, "%s\n", std::string(store.status().message()).c_str());
    return 2;
  }
  mamba::coordinator::JobServiceImpl jobs(store->get(), "", dir + "/ckpt");
  mamba::coordinator::WorkerServiceOptions wo;
  wo.checkpoint_root = dir + "/ckpt";
  mamba::coordinator::WorkerServiceImpl workers(store->get(), wo);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&jobs);
  builder.RegisterService(&workers);
  auto server = builder.BuildAndStart();
  const std::string address = absl::StrCat("127.0.0.1:", port);
  std::printf("coordinator_bench: %d clients, %d pools, phases of %.0f s, on %s\n", clients,
              absl::GetFlag(FLAGS_pools), seconds, address.c_str());

  std::atomic<bool> stop_pools{false};
  std::vector<std::thread> pools;
  for (int p = 0; p < absl::GetFlag(FLAGS_pools); ++p) {
    pools.emplace_back([&] {
      auto stub = v1::WorkerService::NewStub(
          grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
      grpc::ClientContext c;
      v1::RegisterPoolRequest r;
      r.set_world_size(64);  // fits no job of the benchmark: they stay queued
      r.set_backend("cuda");
      v1::RegisterPoolResponse id;
      if (!stub->RegisterPool(&c, r, &id).ok()) return;
      while (!stop_pools) {
        grpc::ClientContext hc;
        v1::HeartbeatRequest h;
        h.set_pool_id(id.pool_id());
        v1::HeartbeatResponse hr;
        (void)stub->Heartbeat(&hc, h, &hr);
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    });
  }

  const auto submit_request = [](int64_t i) {
    v1::SubmitJobRequest r;
    r.mutable_spec()->set_name(absl::StrCat("bench-", i % 10));
    r.mutable_spec()->mutable_data()->mutable_induction_heads()->set_seq_len(64);
    return r;
  };
  // A job for the reads and the watchers to look at.
  std::string first;
  {
    auto stub =
        v1::JobService::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
    grpc::ClientContext c;
    v1::SubmitJobResponse r;
    (void)stub->SubmitJob(&c, submit_request(0), &r);
    first = r.job().id();
  }
  std::atomic<int64_t> serial{1};
  const auto run_phase = [&](const std::string& name, double read_share) {
    std::vector<std::vector<double>> latency(clients);
    std::vector<int64_t> errors(clients, 0);
    const auto end = Clock::now() + std::chrono::duration<double>(seconds);
    std::vector<std::thread> threads;
    for (int t = 0; t < clients; ++t) {
      threads.emplace_back([&, t] {
        auto stub = v1::JobService::NewStub(
            grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
        std::mt19937 rng(t);
        std::uniform_real_distribution<double> u(0, 1);
        while (Clock::now() < end) {
          grpc::ClientContext c;
          const auto t0 = Clock::now();
          grpc::Status s;
          const double x = u(rng);
          if (x < read_share * 0.5) {
            v1::GetJobRequest g;
            g.set_id(first);
            v1::Job job;
            s = stub->GetJob(&c, g, &job);
          } else if (x < read_share) {
            v1::ListJobsRequest l;
            l.set_page_size(20);
            v1::ListJobsResponse page;
            s = stub->ListJobs(&c, l, &page);
          } else {
            v1::SubmitJobResponse r;
            s = stub->SubmitJob(&c, submit_request(serial++), &r);
          }
          latency[t].push_back(
              std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
          errors[t] += !s.ok();
        }
      });
    }
    for (auto& th : threads) th.join();
    Phase p;
    p.name = name;
    std::vector<double> all;
    for (int t = 0; t < clients; ++t) {
      all.insert(all.end(), latency[t].begin(), latency[t].end());
      p.errors += errors[t];
    }
    p.calls = static_cast<int64_t>(all.size());
    p.seconds = seconds;
    p.p50_ms = Percentile(all, 0.5);
    p.p99_ms = Percentile(all, 0.99);
    return p;
  };

  std::vector<Phase> phases;
  phases.push_back(run_phase("90 % reads / 10 % submits", 0.9));
  phases.push_back(run_phase("submits alone", 0.0));
  // Watchers follow the first job (queued: their streams stay open, polling the store).
  std::atomic<bool> stop_watch{false};
  std::vector<std::unique_ptr<grpc::ClientContext>> watch_contexts;
  std::vector<std::thread> watchers;
  for (int w = 0; w < absl::GetFlag(FLAGS_watchers); ++w) {
    watch_contexts.push_back(std::make_unique<grpc::ClientContext>());
  }
  for (int w = 0; w < absl::GetFlag(FLAGS_watchers); ++w) {
    watchers.emplace_back([&, w] {
      auto stub =
          v1::JobService::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
      v1::WatchJobRequest r;
      r.set_id(first);
      auto reader = stub->WatchJob(watch_contexts[w].get(), r);
      v1::JobUpdate u;
      while (reader->Read(&u)) {
      }
      (void)reader->Finish();
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  phases.push_back(
      run_phase(absl::StrCat("90/10 mix, ", absl::GetFlag(FLAGS_watchers), " watchers open"), 0.9));
  for (auto& c : watch_contexts) c->TryCancel();
  for (auto& t : watchers) t.join();
  stop_pools = true;
  for (auto& t : pools) t.join();
  server->Shutdown();

  std::printf("\n%-36s %10s %10s %9s %9s %7s\n", "phase", "calls", "RPCs/s", "p50 ms", "p99 ms",
              "errors");
  nlohmann::json out;
  for (const Phase& p : phases) {
    std::printf("%-36s %10ld %10.0f %9.2f %9.2f %7ld\n", p.name.c_str(), long(p.calls),
                p.calls / p.seconds, p.p50_ms, p.p99_ms, long(p.errors));
    out["phases"].push_back({{"name", p.name},
                             {"calls", p.calls},
                             {"rpcs_per_s", p.calls / p.seconds},
                             {"p50_ms", p.p50_ms},
                             {"p99_ms", p.p99_ms},
                             {"errors", p.errors}});
  }
  out["clients"] = clients;
  out["pools"] = absl::GetFlag(FLAGS_pools);
  out["watchers"] = absl::GetFlag(FLAGS_watchers);
  if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
    std::ofstream(path) << out.dump(2) << "\n";
  }
  std::filesystem::remove_all(dir);
  return 0;
}
