// Multi-rank tests, run by ctest under `mpirun -np 2`, `-np 4` and `-np 8` (one OpenMP thread a
// rank): every dp x sp layout of the world against one rank computed in the same process, on the
// CPU backend over the MPI transport (and on the CUDA backend where a GPU is visible, the ranks
// sharing it).
//
// - float64: the loss and every parameter's gradient of one step equal one rank's to 1e-12
//   (relative), with slices of odd lengths and of exactly d_conv - 1 positions (the halo then
//   spans a whole slice); the same split without the exchanges is far off (the check can fail).
// - float32 training (the Trainer, 10 steps): the parameters equal one rank's to 1e-5, are
//   bitwise the same on every rank, and a repeated run repeats them bit for bit.
// - A checkpoint saved by one layout resumes on another (and on one rank) on the same losses.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <sstream>

#include "tests/test_util.h"
#include "worker/check.h"
#include "worker/comm/process_groups.h"
#include "worker/job_spec.h"
#include "worker/model.h"
#include "worker/trainer.h"

namespace mamba {
namespace {

constexpr int32_t kIgnore = -100;

const comm::MpiRuntime& Mpi() { return comm::MpiRuntime::Get(); }

// Every (dp, sp) whose product is the world size.
std::vector<comm::Layout> Layouts() {
  std::vector<comm::Layout> layouts;
  const int P = Mpi().world_size();
  for (int sp = 1; sp <= P; ++sp) {
    if (P % sp == 0) layouts.push_back({P / sp, sp});
  }
  return layouts;
}

// A global batch of at least 4 sequences that every layout's dp divides.
int64_t GlobalBatch() {
  const int P = Mpi().world_size();
  return P * ((4 + P - 1) / P);
}

// The world as one group, for the tests' own exchanges.
comm::ProcessGroups& World() {
  static auto* backend = MakeCpuBackend().release();
  static comm::ProcessGroups* groups = [] {
    auto g = comm::MakeProcessGroups(Mpi(), {Mpi().world_size(), 1}, comm::Transport::kMpi, backend,
                                     absl::Minutes(2));
    MAMBA_CHECK(g.ok()) << g.status();
    return new comm::ProcessGroups(std::move(*g));
  }();
  return *groups;
}

// True on every rank when `ok` holds on every rank.
bool AllRanks(bool ok) {
  Tensor t = Tensor::Zeros({1}, DType::kF64);
  t.data<double>()[0] = ok ? 0 : 1;
  EXPECT_TRUE(World().world->AllReduceSum(t).ok());
  return t.data<double>()[0] == 0;
}

ModelConfig Config() {
  ModelConfig c;
  c.d_model = 8;
  c.n_layer = 2;
  c.d_state = 4;
  c.d_conv = 4;
  c.expand = 2;
  c.dt_rank = 2;
  c.vocab_size = ModelConfig::PadVocab(11);
  return c;
}

// Random tokens in [0, 11); some targets ignored.
std::pair<Tensor, Tensor> RandomBatch(int64_t B, int64_t L, uint64_t seed) {
  std::mt19937 rng(seed);
  Tensor inputs = Tensor::Empty({B, L}, DType::kI32), targets = Tensor::Empty({B, L}, DType::kI32);
  for (int64_t i = 0; i < B * L; ++i) {
    inputs.data<int32_t>()[i] = rng() % 11;
    targets.data<int32_t>()[i] = (i % 5 == 2) ? kIgnore : int32_t(rng() % 11);
  }
  return {inputs, targets};
}

// Rows [b0, b0 + nb) and positions [t0, t0 + nt) of a (B, L) int32 tensor.
Tensor Block(const Tensor& t, int64_t b0, int64_t nb, int64_t t0, int64_t nt) {
  Tensor out = Tensor::Empty({nb, nt}, DType::kI32);
  for (int64_t b = 0; b < nb; ++b) {
    std::memcpy(out.data<int32_t>() + b * nt, t.data<int32_t>() + (b0 + b) * t.dim(1) + t0,
                nt * sizeof(int32_t));
  }
  return out;
}

// A float64 model whose step sizes and embeddings are large enough that states carry far across
// slice boundaries and every gradient has a checkable size.
std::unique_ptr<MambaModel> MakeModel(Backend* backend, Recompute recompute,
                                      bool state_chain = false) {
  ModelOptions options;
  options.recompute = recompute;
  options.state_chain = state_chain;
  auto m = std::make_unique<MambaModel>(Config(), backend, DType::kF64, options);
  m->Initialize(5);
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> unit(-1.0, 0.5);
  for (const auto& p : m->parameters()) {
    double* w = p.value.data<double>();
    for (int64_t i = 0; i < p.value.numel(); ++i) {
      if (p.name.ends_with("dt_proj.bias")) w[i] = unit(rng);
      if (p.name.ends_with("embeddings.weight")) w[i] *= 25;
    }
  }
  return m;
}

std::vector<std::vector<double>> Grads(const MambaModel& m) {
  std::vector<std::vector<double>> g;
  for (const auto& p : m.parameters()) {
    g.emplace_back(p.grad.data<double>(), p.grad.data<double>() + p.grad.numel());
  }
  return g;
}

TEST(Distributed, EveryLayoutGivesOneRanksLossAndGradientsInFloat64) {
  auto backend = MakeCpuBackend();
  const int64_t B = GlobalBatch();
  for (const comm::Layout& layout : Layouts()) {
    // Slices of 7 positions (odd), or of 3 = d_conv - 1 from sp 4 on (the halo is a whole slice).
    const int64_t slice = layout.sp >= 4 ? 3 : 7, L = slice * layout.sp;
    for (Recompute recompute : {Recompute::kConvAndDelta, Recompute::kLayer}) {
      SCOPED_TRACE(::testing::Message() << "dp " << layout.dp << " x sp " << layout.sp
                                        << ", recompute " << int(recompute));
      auto [inputs, targets] = RandomBatch(B, L, 17 + L);
      int64_t counted = 0;
      for (int64_t i = 0; i < B * L; ++i) counted += targets.data<int32_t>()[i] != kIgnore;

      auto one = MakeModel(backend.get(), recompute);
      one->ZeroGrad();
      const LossStats ref = one->ForwardBackward(inputs, targets, kIgnore, 1.0 / counted, true);

      auto groups = comm::MakeProcessGroups(Mpi(), layout, comm::Transport::kMpi, backend.get(),
                                            absl::Minutes(2));
      ASSERT_TRUE(groups.ok()) << groups.status();
      const int64_t nb = B / layout.dp, b0 = groups->dp_rank * nb, t0 = groups->sp_rank * slice;
      const Tensor in = Block(inputs, b0, nb, t0, slice), tg = Block(targets, b0, nb, t0, slice);
      // This rank's slice with the exchanges (the state maps all-gathered, then handed along a
      // send/recv chain: the same bits), and without them (a split that ignores the state and
      // the halo must be far off, or the comparison proves nothing).
      std::vector<std::vector<double>> gathered;
      for (const char* mode : {"all_gather", "chain", "none"}) {
        const bool exchange = std::string(mode) != "none", chain = std::string(mode) == "chain";
        auto m = MakeModel(backend.get(), recompute, chain);
        m->SetSequenceParallel(exchange ? groups->sp.get() : nullptr);
        m->ZeroGrad();
        const LossStats local = m->ForwardBackward(in, tg, kIgnore, 1.0 / counted, true);
        for (const ParameterGroup& g : m->parameter_store().groups()) {
          Tensor grads = g.grads;
          ASSERT_TRUE(groups->world->AllReduceSum(grads).ok());
        }
        Tensor loss = Tensor::Empty({2}, DType::kF64);
        loss.data<double>()[0] = local.loss_sum;
        loss.data<double>()[1] = double(local.count);
        ASSERT_TRUE(groups->world->AllReduceSum(loss).ok());
        EXPECT_EQ(loss.data<double>()[1], double(ref.count));
        const auto got = Grads(*m), want = Grads(*one);
        if (chain) {
          EXPECT_EQ(got, gathered) << "the chain's gradients differ from the all-gather's";
        } else if (exchange) {
          gathered = got;
        }
        double worst = 0;
        for (size_t i = 0; i < got.size(); ++i) {
          const double err = ::mamba::testing::NormRelativeError(got[i], want[i]);
          worst = std::max(worst, err);
          if (exchange) EXPECT_LT(err, 1e-12) << m->parameters()[i].name;
        }
        const double loss_err = std::abs(loss.data<double>()[0] - ref.loss_sum) / ref.loss_sum;
        if (exchange) {
          EXPECT_LT(loss_err, 1e-12);
        } else if (layout.sp > 1) {
          EXPECT_GT(std::max(worst, loss_err), 1e-4) << "the slices do not depend on each other";
        }
      }
    }
  }
}

// How a run sums its gradients: whole after the backward (bucket 0), in 1 KiB buckets during it,
// or reduce-scattered for an optimizer whose state is sharded.
struct Sync {
  bool shard = false;
  double bucket_mb = 0;
};

// Every layout with every way of summing the gradients.
std::vector<std::pair<comm::Layout, Sync>> LayoutsAndSyncs() {
  std::vector<std::pair<comm::Layout, Sync>> all;
  for (const comm::Layout& layout : Layouts()) {
    all.push_back({layout, {false, 0}});
    if (layout.world() > 1) {
      all.push_back({layout, {false, 1.0 / 1024}});
      all.push_back({layout, {true, 0}});
    }
  }
  return all;
}

// A float32 job spec of the Trainer: 10 steps of induction heads.
v1::JobSpec Spec(const comm::Layout& layout, const std::string& checkpoint_dir = "",
                 Sync sync = {}) {
  std::ostringstream json;
  json << R"({"data":{"inductionHeads":{"seqLen":24,"vocabSize":11}},)"
       << R"("model":{"dModel":8,"nLayer":2,"dState":4},"steps":10,"batchSize":)" << GlobalBatch()
       << R"(,"logEvery":5,"eval":{"batches":1,"seqLens":[24,48]},)"
       << R"("optimizer":{"lr":0.01,"shardState":)" << (sync.shard ? "true" : "false") << "},"
       << R"("parallel":{"dp":)" << layout.dp << R"(,"sp":)" << layout.sp << R"(,"gradBucketMb":)"
       << sync.bucket_mb << "}";
  if (!checkpoint_dir.empty()) {
    json << R"(,"checkpoint":{"dir":")" << checkpoint_dir << R"(","everySteps":5,"keepLast":0})";
  }
  json << "}";
  auto spec = ParseJobSpecJson(json.str());
  MAMBA_CHECK(spec.ok()) << spec.status();
  return *spec;
}

struct TrainedRun {
  TrainSummary summary;
  std::vector<std::vector<float>> params;
};

TrainedRun Train(const v1::JobSpec& spec, bool solo,
                 comm::Transport transport = comm::Transport::kMpi) {
  RankOptions options;
  options.solo = solo;
  options.transport = transport;
  auto trainer = Trainer::Create(spec, options);
  MAMBA_CHECK(trainer.ok()) << trainer.status();
  std::ostringstream log;
  auto summary = (*trainer)->Run(log);
  MAMBA_CHECK(summary.ok()) << summary.status();
  TrainedRun run{*summary, {}};
  Backend& backend = (*trainer)->backend();
  for (const auto& p : (*trainer)->model().parameters()) {
    const Tensor host = p.value.device() == Device::kCPU ? p.value : backend.ToHost(p.value);
    run.params.emplace_back(host.data<float>(), host.data<float>() + host.numel());
  }
  return run;
}

// With the optimizer's state sharded over the ranks too (ZeRO-1): the same update.
TEST(Distributed, TrainingOnEveryLayoutMatchesOneRankAndRepeatsBitForBit) {
  const TrainedRun one = Train(Spec({1, 1}), /*solo=*/true);
  for (const auto& [layout, sync] : LayoutsAndSyncs()) {
    SCOPED_TRACE(::testing::Message() << "dp " << layout.dp << " x sp " << layout.sp
                                      << (sync.shard ? ", sharded optimizer" : "")
                                      << ", buckets of " << sync.bucket_mb << " MiB");
    const TrainedRun a = Train(Spec(layout, "", sync), false),
                     b = Train(Spec(layout, "", sync), false);
    ASSERT_EQ(a.params.size(), one.params.size());
    for (size_t i = 0; i < a.params.size(); ++i) {
      EXPECT_LT(::mamba::testing::NormRelativeError(a.params[i], one.params[i]), 1e-5) << i;
      EXPECT_EQ(a.params[i], b.params[i]) << "a repeated run differs, parameter " << i;
    }
    EXPECT_LT(::mamba::testing::RelativeError(a.summary.losses, one.summary.losses), 1e-5);
    for (size_t e = 0; e < one.summary.evals.size(); ++e) {
      EXPECT_NEAR(a.summary.evals[e].loss, one.summary.evals[e].loss, 1e-5);
    }
    // Every rank holds rank 0's parameters, bit for bit.
    for (const auto& p : a.params) {
      Tensor mine = Tensor::Empty({int64_t(p.size())}, DType::kF32);
      std::memcpy(mine.raw(), p.data(), p.size() * sizeof(float));
      Tensor root = Tensor::Empty({int64_t(p.size())}, DType::kF32);
      std::memcpy(root.raw(), p.data(), p.size() * sizeof(float));
      ASSERT_TRUE(World().world->Broadcast(root, 0).ok());
      EXPECT_TRUE(AllRanks(std::memcmp(mine.raw(), root.raw(), mine.nbytes()) == 0));
    }
  }
}

TEST(Distributed, CheckpointsResumeOnAnotherLayoutAndOnOneRank) {
  // One directory for every rank: rank 0's process id names it.
  Tensor id = Tensor::Empty({1}, DType::kI32);
  id.data<int32_t>()[0] = getpid();
  ASSERT_TRUE(World().world->Broadcast(id, 0).ok());
  const std::string dir =
      ::testing::TempDir() + "/mamba-distributed-" + std::to_string(id.data<int32_t>()[0]);
  const std::vector<comm::Layout> layouts = Layouts();
  // Saved by all dp then resumed by all sp, and the other way round.
  for (const auto& [saved, resumed] :
       {std::pair{layouts.front(), layouts.back()}, {layouts.back(), layouts.front()}}) {
    SCOPED_TRACE(::testing::Message() << "saved at dp " << saved.dp << " x sp " << saved.sp);
    const std::string root = dir + "/saved-dp" + std::to_string(saved.dp);
    // Saved with the optimizer's state sharded (gathered for the checkpoint).
    const TrainedRun full = Train(Spec(saved, root, {.shard = true}), false);
    // The run saved step 5 and step 10; continue from step 5 on the other layout (state whole
    // and sharded), and alone.
    for (const auto& [solo, shard] : {std::pair{false, false}, {false, true}, {true, false}}) {
      SCOPED_TRACE(solo ? "one rank" : shard ? "other layout, sharded" : "other layout");
      v1::JobSpec spec = Spec(solo ? comm::Layout{1, 1} : resumed, "", {.shard = shard});
      spec.mutable_checkpoint()->set_resume_from(root + "/step_00000005");
      const TrainedRun rest = Train(spec, solo);
      ASSERT_EQ(rest.summary.losses.size(), full.summary.losses.size());
      EXPECT_LT(::mamba::testing::RelativeError(rest.summary.losses, full.summary.losses), 1e-5);
      for (size_t i = 0; i < rest.params.size(); ++i) {
        EXPECT_LT(::mamba::testing::NormRelativeError(rest.params[i], full.params[i]), 1e-5) << i;
      }
    }
  }
  ASSERT_TRUE(AllRanks(true));  // everyone is done reading before rank 0 deletes
  if (Mpi().world_rank() == 0) std::filesystem::remove_all(dir);
}

// The communicator's operations on host tensors, and on CUDA tensors where a GPU is visible
// (over the transport MAMBA_TEST_TRANSPORT names: mpi by default; nccl needs a GPU a rank).
void CheckOperations(Backend* backend, comm::Transport transport) {
  auto groups =
      comm::MakeProcessGroups(Mpi(), {Mpi().world_size(), 1}, transport, backend, absl::Minutes(2));
  ASSERT_TRUE(groups.ok()) << groups.status();
  comm::Communicator& world = *groups->world;
  const int r = world.rank(), P = world.size();
  const auto make = [&](const std::vector<float>& v) {
    Tensor host = Tensor::Empty({int64_t(v.size())}, DType::kF32);
    std::copy(v.begin(), v.end(), host.data<float>());
    return backend->device() == Device::kCPU ? host : backend->FromHost(host);
  };
  const auto read = [&](const Tensor& t) {
    Tensor host = t.device() == Device::kCPU ? t : backend->ToHost(t);
    return std::vector<float>(host.data<float>(), host.data<float>() + host.numel());
  };
  // All-reduce: 1001 elements (chunks of unequal sizes), rank r holding (r + 1) * (i + 1).
  std::vector<float> mine(1001);
  for (int i = 0; i < 1001; ++i) mine[i] = float((r + 1) * (i + 1));
  Tensor sum = make(mine);
  ASSERT_TRUE(world.AllReduceSum(sum).ok());
  const std::vector<float> got = read(sum);
  for (int i = 0; i < 1001; ++i) ASSERT_EQ(got[i], float(P * (P + 1) / 2 * (i + 1))) << i;
  // All-gather: rank after rank.
  Tensor gathered = make(std::vector<float>(3 * P, -1.f));
  ASSERT_TRUE(world.AllGather(make({float(r), float(10 * r), float(100 * r)}), gathered).ok());
  const std::vector<float> all = read(gathered);
  for (int q = 0; q < P; ++q) {
    EXPECT_EQ(all[3 * q], float(q));
    EXPECT_EQ(all[3 * q + 2], float(100 * q));
  }
  // A chain r -> r + 1 (the halo's pattern), and a broadcast from the last rank.
  Tensor from_prev = r > 0 ? make({-1.f, -1.f}) : Tensor();
  ASSERT_TRUE(
      world.SendRecv(make({float(r), 7.f}), r + 1 < P ? r + 1 : -1, from_prev, r > 0 ? r - 1 : -1)
          .ok());
  if (r > 0) EXPECT_EQ(read(from_prev), (std::vector<float>{float(r - 1), 7.f}));
  Tensor b = make({float(r), float(r)});
  ASSERT_TRUE(world.Broadcast(b, P - 1).ok());
  EXPECT_EQ(read(b), (std::vector<float>{float(P - 1), float(P - 1)}));
}

comm::Transport TestTransport() {
  const char* t = std::getenv("MAMBA_TEST_TRANSPORT");
  auto parsed = comm::ParseTransport(t ? t : "mpi");
  MAMBA_CHECK(parsed.ok()) << parsed.status();
  return *parsed;
}

TEST(Distributed, CommunicatorOperationsOnHostTensors) {
  auto backend = MakeCpuBackend();
  CheckOperations(backend.get(), comm::Transport::kMpi);
}

#ifdef MAMBA_HAS_CUDA
TEST(Distributed, CommunicatorOperationsOnCudaTensors) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  auto backend = MakeCudaBackend({Mpi().local_rank() % CudaDeviceCount()});
  CheckOperations(backend.get(), TestTransport());
}

// Ranks on the CUDA backend (sharing one GPU over the MPI transport, or one a rank over NCCL)
// against one rank: fp32 training, the parameters after 10 steps.
TEST(Distributed, CudaTrainingOnEveryLayoutMatchesOneRank) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  const auto cuda = [](v1::JobSpec spec) {
    spec.set_backend("cuda");
    return spec;
  };
  const TrainedRun one = Train(cuda(Spec({1, 1})), true);
  // Every layout; and the gradients summed whole, in buckets during the backward (on NCCL,
  // overlapped with it), and reduce-scattered for a sharded optimizer.
  std::vector<std::pair<comm::Layout, Sync>> runs = LayoutsAndSyncs();
  runs.push_back({{1, Mpi().world_size()}, {false, 1.0 / 1024}});
  runs.push_back({{1, Mpi().world_size()}, {true, 0}});
  for (const auto& [layout, sync] : runs) {
    SCOPED_TRACE(::testing::Message() << "dp " << layout.dp << " x sp " << layout.sp
                                      << (sync.shard ? ", sharded optimizer" : "")
                                      << ", buckets of " << sync.bucket_mb << " MiB");
    const TrainedRun a = Train(cuda(Spec(layout, "", sync)), false, TestTransport());
    const TrainedRun b = Train(cuda(Spec(layout, "", sync)), false, TestTransport());
    for (size_t i = 0; i < a.params.size(); ++i) {
      EXPECT_LT(::mamba::testing::NormRelativeError(a.params[i], one.params[i]), 1e-5) << i;
      EXPECT_EQ(a.params[i], b.params[i]) << "a repeated run differs, parameter " << i;
    }
    EXPECT_LT(::mamba::testing::RelativeError(a.summary.losses, one.summary.losses), 1e-5);
  }
}
#endif

}  // namespace
}  // namespace mamba

int main(int argc, char** argv) {
  mamba::comm::MpiRuntime::Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  // Rank 0 reports; the others print only their failures.
  if (mamba::comm::MpiRuntime::Get().world_rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  return RUN_ALL_TESTS();
}
