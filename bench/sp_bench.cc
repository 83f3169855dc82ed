// Sequence-parallel benchmark on one GPU: one training step of a Mamba LM at batch 1 with its
// sequence split over sp ranks, simulated by running each rank's share in turn on the one device
// (tokens_per_rank positions each). A loopback communicator stands in for the sp group: each rank
// does exactly the work of a real rank at its position (its state maps, the folds of the maps of
// the ranks before and after it, the halo copies), with the exchanges as device-memory copies.
// Prints each rank's step time against the one-rank step at tokens_per_rank tokens (the overhead
// of sequence parallelism), the handoff ops' own time, the bytes each exchange moves per layer,
// and the step time projected for real ranks: the slowest rank's compute plus every exchange on
// the critical path at a stated interconnect bandwidth and per-message latency.
//   sp_bench [--tokens_per_rank 65536 --sps 1,2,4,8 --precision bf16] [--json out.json]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"
#include "worker/comm/communicator.h"
#include "worker/model.h"
#include "worker/optimizer.h"

ABSL_FLAG(int64_t, d_model, 768, "model width");
ABSL_FLAG(int64_t, n_layer, 24, "layers");
ABSL_FLAG(int64_t, vocab, 50280, "vocabulary (padded to a multiple of 8)");
ABSL_FLAG(int64_t, tokens_per_rank, 65536, "positions of the sequence each rank holds");
ABSL_FLAG(std::string, sps, "1,2,4,8", "sequence-parallel sizes to simulate");
ABSL_FLAG(std::string, precision, "bf16", "GEMM precision: fp32 or bf16");
ABSL_FLAG(std::string, recompute, "conv", "what the backward recomputes: conv or layer");
ABSL_FLAG(int64_t, steps, 3, "timed steps per rank");
ABSL_FLAG(int64_t, warmup, 2, "untimed steps first");
ABSL_FLAG(double, bandwidth_gbps, 329,
          "interconnect bandwidth for the projection, GB/s (default: the NCCL all-reduce bus "
          "bandwidth measured on two H100s of the lent machines, KINDS.md)");
ABSL_FLAG(double, latency_us, 15, "per-message latency for the projection, microseconds");
ABSL_FLAG(std::string, json, "", "write results here");

namespace {

using mamba::Backend;
using mamba::Tensor;

// The sp group of a simulated rank: exchanges become device copies of this rank's own data, and
// their bytes are counted as the real group would move them.
class LoopbackCommunicator final : public mamba::comm::Communicator {
 public:
  LoopbackCommunicator(Backend* backend, int rank, int size)
      : backend_(backend), rank_(rank), size_(size) {}
  const std::string& name() const override { return name_; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  absl::Status AllReduceSum(Tensor&) override { return absl::OkStatus(); }
  absl::Status AllGather(const Tensor& in, Tensor& out) override {
    for (int q = 0; q < size_; ++q) {
      Tensor slot = out.View(q * in.numel(), in.shape());
      backend_->Convert(in, slot);
    }
    bytes["state maps (all-gather, received)"] += double(in.nbytes()) * (size_ - 1);
    ++messages;
    return absl::OkStatus();
  }
  absl::Status SendRecv(const Tensor& send, int dst, Tensor& recv, int src) override {
    if (src >= 0 && send.defined() && send.shape() == recv.shape()) {
      backend_->Convert(send, recv);
    } else if (src >= 0) {
      backend_->Zero(recv);
    }
    if (dst >= 0) bytes["halo (send)"] += double(send.nbytes());
    ++messages;
    return absl::OkStatus();
  }
  absl::Status Broadcast(Tensor&, int) override { return absl::OkStatus(); }
  absl::Status ReduceScatterSum(Tensor&) override { return absl::OkStatus(); }
  absl::Status AllGatherChunks(Tensor&) override { return absl::OkStatus(); }

  std::map<std::string, double> bytes;  // per step, by exchange
  int64_t messages = 0;

 private:
  Backend* backend_;
  int rank_, size_;
  std::string name_ = "sp";
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
#ifndef MAMBA_HAS_CUDA
  std::fprintf(stderr, "sp_bench: built without CUDA\n");
  return 2;
#else
  if (mamba::CudaDeviceCount() == 0) {
    std::fprintf(stderr, "sp_bench: no CUDA device\n");
    return 2;
  }
  mamba::ModelConfig c;
  c.d_model = absl::GetFlag(FLAGS_d_model);
  c.n_layer = absl::GetFlag(FLAGS_n_layer);
  c.vocab_size = mamba::ModelConfig::PadVocab(absl::GetFlag(FLAGS_vocab));
  c.dt_rank = mamba::ModelConfig::DefaultDtRank(c.d_model);
  const int64_t L = absl::GetFlag(FLAGS_tokens_per_rank);
  std::vector<int> sps;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_sps), ',')) {
    int v = 0;
    if (!absl::SimpleAtoi(s, &v) || v < 1) {
      std::fprintf(stderr, "sp_bench: --sps must list positive integers\n");
      return 2;
    }
    sps.push_back(v);
  }
  mamba::CudaBackendOptions options;
  options.gemm_precision = absl::GetFlag(FLAGS_precision) == "bf16" ? mamba::GemmPrecision::kBf16
                                                                    : mamba::GemmPrecision::kFp32;
  auto backend = mamba::MakeCudaBackend(options);
  mamba::ModelOptions mo;
  mo.recompute = absl::GetFlag(FLAGS_recompute) == "layer" ? mamba::Recompute::kLayer
                                                           : mamba::Recompute::kConvAndDelta;
  mamba::MambaModel model(c, backend.get(), mamba::DType::kF32, mo);
  model.Initialize(1);
  mamba::AdamWOptimizer opt(mamba::OptimizerConfig{}, backend.get(), &model.parameter_store());
  std::printf(
      "sp_bench: d_model %ld x %ld layers (%.1fM parameters), %s GEMMs, batch 1 x %ld tokens a "
      "rank, recompute %s\n",
      long(c.d_model), long(c.n_layer), model.num_parameters() / 1e6,
      absl::GetFlag(FLAGS_precision).c_str(), long(L), absl::GetFlag(FLAGS_recompute).c_str());

  std::mt19937 rng(7);
  Tensor inputs = Tensor::Empty({1, L}, mamba::DType::kI32);
  Tensor targets = Tensor::Empty({1, L}, mamba::DType::kI32);
  for (int64_t i = 0; i < L; ++i) {
    inputs.data<int32_t>()[i] = int32_t(rng() % c.vocab_size);
    targets.data<int32_t>()[i] = int32_t(rng() % c.vocab_size);
  }
  const int64_t steps = absl::GetFlag(FLAGS_steps), warmup = absl::GetFlag(FLAGS_warmup);
  const double bw = absl::GetFlag(FLAGS_bandwidth_gbps) * 1e9;
  const double latency = absl::GetFlag(FLAGS_latency_us) * 1e-6;
  // Bytes of the gradients, all-reduced over the world once a step (ring: 2 (P - 1) / P of them).
  double grad_bytes = 0;
  for (const auto& g : model.parameter_store().groups()) grad_bytes += double(g.grads.nbytes());

  // One rank's step at its position in a group of sp: the median step time and the handoff ops'.
  struct RankResult {
    double step_ms = 0, handoff_ms = 0;
    std::map<std::string, double> bytes;
    int64_t messages = 0;
  };
  const auto run_rank = [&](int rank, int sp) {
    LoopbackCommunicator loop(backend.get(), rank, sp);
    model.SetSequenceParallel(sp > 1 ? &loop : nullptr);
    std::vector<double> ms;
    RankResult r;
    for (int64_t s = 0; s < warmup + steps + 1; ++s) {
      const bool profiled = s == warmup + steps;
      backend->EnableOpTiming(profiled);
      backend->TakeOpTimes();
      loop.bytes.clear();
      loop.messages = 0;
      const auto t0 = std::chrono::steady_clock::now();
      model.ZeroGrad();
      model.ForwardBackward(inputs, targets, -100, 1.0 / L, true);
      opt.Step();
      backend->Synchronize();
      const double t =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (s >= warmup && !profiled) ms.push_back(t);
      if (profiled) {
        for (const auto& [op, t_op] : backend->TakeOpTimes()) {
          if (op.rfind("scan_state", 0) == 0) r.handoff_ms += t_op;
        }
      }
    }
    r.step_ms = Median(ms);
    r.bytes = loop.bytes;
    r.messages = loop.messages;
    model.SetSequenceParallel(nullptr);
    return r;
  };

  const RankResult base = run_rank(0, 1);
  std::printf("\none rank, %ld tokens: %.1f ms a step\n\n", long(L), base.step_ms);
  std::printf("%3s %6s %10s %10s %9s %11s %12s %12s %10s\n", "sp", "rank", "step ms", "overhead",
              "handoff", "halo B/lyr", "maps B/lyr", "projected", "tokens/s");
  nlohmann::json out;
  out["tokens_per_rank"] = L;
  out["one_rank_step_ms"] = base.step_ms;
  out["bandwidth_gbps"] = bw / 1e9;
  out["latency_us"] = latency * 1e6;
  for (int sp : sps) {
    if (sp == 1) continue;
    double slowest = 0;
    nlohmann::json ranks = nlohmann::json::array();
    RankResult middle;
    for (int rank = 0; rank < sp; ++rank) {
      const RankResult r = run_rank(rank, sp);
      slowest = std::max(slowest, r.step_ms);
      if (rank == sp / 2) middle = r;
      const double halo = r.bytes.count("halo (send)") ? r.bytes.at("halo (send)") : 0;
      const double maps = r.bytes.count("state maps (all-gather, received)")
                              ? r.bytes.at("state maps (all-gather, received)")
                              : 0;
      std::printf("%3d %6d %10.1f %9.1f%% %7.1fms %11.0f %12.0f\n", sp, rank, r.step_ms,
                  100.0 * (r.step_ms / base.step_ms - 1), r.handoff_ms, halo / c.n_layer / 2,
                  maps / c.n_layer / 2);
      ranks.push_back({{"rank", rank},
                       {"step_ms", r.step_ms},
                       {"overhead", r.step_ms / base.step_ms - 1},
                       {"handoff_ms", r.handoff_ms},
                       {"bytes_per_step", r.bytes},
                       {"messages_per_step", r.messages}});
    }
    // Critical path: every exchange of the middle rank (latency + bytes), plus the gradient
    // all-reduce over the group.
    double exchange_bytes = 0;
    for (const auto& [k, b] : middle.bytes) exchange_bytes += b;
    const double comm_s = double(middle.messages) * latency + exchange_bytes / bw +
                          2.0 * (sp - 1) / sp * grad_bytes / bw;
    const double projected_ms = slowest + comm_s * 1e3;
    std::printf("%3d %6s %10.1f %9.1f%% %9s %11s %12s %10.1fms %10.0f\n\n", sp, "all", slowest,
                100.0 * (slowest / base.step_ms - 1), "", "", "", projected_ms,
                double(sp * L) / (projected_ms / 1e3));
    out["sp"][std::to_string(sp)] = {
        {"ranks", ranks},
        {"slowest_step_ms", slowest},
        {"overhead", slowest / base.step_ms - 1},
        {"exchange_ms", comm_s * 1e3},
        {"projected_step_ms", projected_ms},
        {"projected_tokens_per_s", double(sp * L) / (projected_ms / 1e3)}};
  }
  std::printf(
      "projection: slowest rank + %ld exchanges a step on the critical path at %.0f us each + "
      "their bytes and the gradient all-reduce (%.0f MB) at %.0f GB/s\n",
      long(4 * c.n_layer), latency * 1e6, grad_bytes / 1e6, bw / 1e9);
  const std::string path = absl::GetFlag(FLAGS_json);
  if (!path.empty()) std::ofstream(path) << out.dump(2) << "\n";
  return 0;
#endif
}
