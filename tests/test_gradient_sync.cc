// The gradient synchronization's buckets: every gradient of every parameter summed exactly once,
// the buckets launched during the backward as their layers finish (the last layer's first, the
// embedding's after the backward), and the same gradients as one whole synchronization.
#include <gtest/gtest.h>

#include <random>

#include "worker/gradient_sync.h"

namespace mamba {
namespace {

// A group of one that records each asynchronous all-reduce and marks its elements (+1), so that
// a test sees which ranges were summed, how often, and when.
class RecordingCommunicator final : public comm::Communicator {
 public:
  const std::string& name() const override { return name_; }
  int rank() const override { return 0; }
  int size() const override { return 1; }
  absl::Status AllReduceSum(Tensor& t) override { return Mark(t); }
  absl::Status AllReduceSumAsync(Tensor& t) override {
    ++async_launches;
    return Mark(t);
  }
  absl::Status WaitAsync() override {
    ++waits;
    return absl::OkStatus();
  }
  absl::Status AllGather(const Tensor&, Tensor&) override { return absl::OkStatus(); }
  absl::Status SendRecv(const Tensor&, int, Tensor&, int) override { return absl::OkStatus(); }
  absl::Status Broadcast(Tensor&, int) override { return absl::OkStatus(); }
  absl::Status ReduceScatterSum(Tensor& t) override { return Mark(t); }
  absl::Status AllGatherChunks(Tensor&) override { return absl::OkStatus(); }

  int async_launches = 0, waits = 0;

 private:
  absl::Status Mark(Tensor& t) {
    for (int64_t i = 0; i < t.numel(); ++i) t.data<double>()[i] += 1.0;
    return absl::OkStatus();
  }
  std::string name_ = "world";
};

ModelConfig Config() {
  ModelConfig c;
  c.d_model = 8;
  c.n_layer = 3;
  c.d_state = 4;
  c.expand = 2;
  c.dt_rank = 2;
  c.vocab_size = 16;
  return c;
}

// Every parameter's gradient after a backward and a synchronization with `bucket_bytes`.
std::vector<std::vector<double>> GradsAfterSync(size_t bucket_bytes, int* launches_in_backward,
                                                size_t* buckets) {
  auto backend = MakeCpuBackend();
  MambaModel model(Config(), backend.get(), DType::kF64);
  model.Initialize(3);
  RecordingCommunicator world;
  GradientSync sync(&model, &world, /*sharded=*/false, bucket_bytes);
  *buckets = sync.buckets();
  std::mt19937 rng(1);
  Tensor in = Tensor::Empty({2, 9}, DType::kI32), tg = Tensor::Empty({2, 9}, DType::kI32);
  for (int i = 0; i < 18; ++i) {
    in.data<int32_t>()[i] = rng() % 16;
    tg.data<int32_t>()[i] = rng() % 16;
  }
  // A probe backward outside Begin / Finish launches nothing.
  model.ZeroGrad();
  model.ForwardBackward(in, tg, -100, 0.1, true);
  EXPECT_EQ(world.async_launches, 0);
  model.ZeroGrad();
  sync.Begin();
  model.ForwardBackward(in, tg, -100, 0.1, true);
  *launches_in_backward = world.async_launches;
  EXPECT_TRUE(sync.Finish().ok());
  std::vector<std::vector<double>> grads;
  for (const auto& p : model.parameters()) {
    grads.emplace_back(p.grad.data<double>(), p.grad.data<double>() + p.grad.numel());
  }
  return grads;
}

TEST(GradientSync, BucketsSumEveryGradientOnceAsTheBackwardFinishesThem) {
  int whole_launches = 0, bucket_launches = 0;
  size_t whole_buckets = 0, buckets = 0;
  const auto whole = GradsAfterSync(0, &whole_launches, &whole_buckets);
  // 1 KiB buckets: about a layer each here.
  const auto bucketed = GradsAfterSync(1024, &bucket_launches, &buckets);
  EXPECT_EQ(whole_buckets, 0u);
  EXPECT_EQ(whole_launches, 0);
  EXPECT_GE(buckets, 4u);  // 3 layers' worth and the embedding's
  // All but the embedding's bucket launched during the backward (two arena ranges each at most).
  EXPECT_GE(bucket_launches, int(buckets) - 1);
  // The same marks (+1 exactly once) on every gradient element.
  EXPECT_EQ(bucketed, whole);
}

}  // namespace
}  // namespace mamba
