// The whole model on the CPU backend: loss gradient of a tiny model against float64 finite
// differences, and initialization statistics against mamba_ssm's recipe.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "tests/test_util.h"
#include "worker/model.h"

namespace mamba {
namespace {

constexpr int32_t kIgnore = -100;

ModelConfig TinyConfig() {
  ModelConfig c;
  c.d_model = 16;
  c.n_layer = 2;
  c.d_state = 4;
  c.expand = 2;
  c.dt_rank = ModelConfig::DefaultDtRank(16);
  c.vocab_size = ModelConfig::PadVocab(11);
  return c;
}

// Random tokens in [0, 11); a few targets ignored.
std::pair<Tensor, Tensor> RandomBatch(int64_t B, int64_t L, uint64_t seed) {
  std::mt19937 rng(seed);
  Tensor inputs = Tensor::Empty({B, L}, DType::kI32), targets = Tensor::Empty({B, L}, DType::kI32);
  for (int64_t i = 0; i < B * L; ++i) {
    inputs.data<int32_t>()[i] = rng() % 11;
    targets.data<int32_t>()[i] = (i % 7 == 3) ? kIgnore : int32_t(rng() % 11);
  }
  return {inputs, targets};
}

TEST(Model, ParameterNamesAndShapesFollowHuggingFace) {
  auto backend = MakeCpuBackend();
  MambaModel model(TinyConfig(), backend.get());
  EXPECT_EQ(model.parameter("backbone.embeddings.weight").value.shape(), (Shape{16, 16}));
  EXPECT_EQ(model.parameter("backbone.layers.1.mixer.in_proj.weight").value.shape(),
            (Shape{64, 16}));
  EXPECT_EQ(model.parameter("backbone.layers.0.mixer.conv1d.weight").value.shape(),
            (Shape{32, 1, 4}));
  EXPECT_EQ(model.parameter("backbone.layers.0.mixer.x_proj.weight").value.shape(),
            (Shape{1 + 8, 32}));
  EXPECT_EQ(model.parameter("backbone.layers.0.mixer.dt_proj.weight").value.shape(),
            (Shape{32, 1}));
  EXPECT_EQ(model.parameter("backbone.layers.0.mixer.A_log").value.shape(), (Shape{32, 4}));
  EXPECT_EQ(model.parameter("backbone.layers.0.mixer.out_proj.weight").value.shape(),
            (Shape{16, 32}));
  EXPECT_EQ(model.parameter("backbone.norm_f.weight").value.shape(), (Shape{16}));
  EXPECT_EQ(model.parameters().size(), 2u + 10u * 2u);
  for (const auto& p : model.parameters()) {
    const bool no_decay = p.name.find("A_log") != std::string::npos || p.name.ends_with(".D") ||
                          p.name.find("norm") != std::string::npos || p.name.ends_with("bias");
    EXPECT_EQ(p.weight_decay, !no_decay) << p.name;
  }
}

TEST(Model, ParametersLiveInOneArenaPerWeightDecayGroup) {
  auto backend = MakeCpuBackend();
  MambaModel model(TinyConfig(), backend.get());
  const std::vector<ParameterGroup>& groups = model.parameter_store().groups();
  ASSERT_EQ(groups.size(), 2u);
  EXPECT_TRUE(groups[0].weight_decay);
  int64_t in_arenas = 0;
  for (const auto& p : model.parameters()) {
    SCOPED_TRACE(p.name);
    const ParameterGroup& g = groups[p.weight_decay ? 0 : 1];
    const char* values = static_cast<const char*>(g.values.raw());
    const char* at = static_cast<const char*>(p.value.raw());
    EXPECT_GE(at, values);
    EXPECT_LE(at + p.value.nbytes(), values + g.values.nbytes());
    EXPECT_EQ(static_cast<const char*>(p.grad.raw()) - static_cast<const char*>(g.grads.raw()),
              at - values);
    EXPECT_FALSE(p.value_bf16.defined());  // the CPU backend's GEMMs take the param dtype
    in_arenas += p.value.numel();
  }
  EXPECT_EQ(in_arenas, model.num_parameters());
  EXPECT_LE(in_arenas, groups[0].values.numel() + groups[1].values.numel());
  model.parameter_store().CheckViews();
}

// Every memory policy, with the loss in chunks of 7 rows (not dividing the 66 tokens).
class ModelGradient : public ::testing::TestWithParam<Recompute> {};

INSTANTIATE_TEST_SUITE_P(Policies, ModelGradient,
                         ::testing::Values(Recompute::kNone, Recompute::kConvAndDelta,
                                           Recompute::kLayer));

TEST_P(ModelGradient, LossGradientMatchesFiniteDifferences) {
  auto backend = MakeCpuBackend();
  ModelOptions options;
  options.recompute = GetParam();
  options.loss_chunk_rows = 7;
  MambaModel model(TinyConfig(), backend.get(), DType::kF64, options);
  model.Initialize(7);
  // At initialization dt is 1e-3..1e-1 and embeddings are N(0, 0.02), so the gradients of dt_proj
  // and A_log are ~1e-6: too small for finite differences to check. Larger step sizes and
  // embeddings make every path carry a gradient of a checkable size.
  std::mt19937 init_rng(3);
  std::uniform_real_distribution<double> unit(-1.0, 1.0);
  for (auto& p : model.parameters()) {
    double* w = p.value.data<double>();
    for (int64_t i = 0; i < p.value.numel(); ++i) {
      if (p.name.ends_with("dt_proj.bias")) w[i] = unit(init_rng);
      if (p.name.ends_with("embeddings.weight")) w[i] *= 25;
    }
  }
  const int64_t B = 2, L = 33;
  auto [inputs, targets] = RandomBatch(B, L, 3);
  int64_t counted = 0;
  for (int64_t i = 0; i < B * L; ++i) counted += targets.data<int32_t>()[i] != kIgnore;
  const double scale = 1.0 / counted;

  model.ZeroGrad();
  model.ForwardBackward(inputs, targets, kIgnore, scale, true);
  auto loss = [&]() {
    return model.ForwardBackward(inputs, targets, kIgnore, scale, false).loss_sum * scale;
  };

  std::mt19937 rng(11);
  for (auto& p : model.parameters()) {
    double* w = p.value.data<double>();
    const double* g = p.grad.data<double>();
    const int64_t n = p.value.numel();
    // Up to 24 entries of every parameter tensor.
    std::vector<int64_t> idx(n);
    for (int64_t i = 0; i < n; ++i) idx[i] = i;
    std::shuffle(idx.begin(), idx.end(), rng);
    idx.resize(std::min<int64_t>(n, 24));
    double max_diff = 0, max_ref = 0;
    for (int64_t i : idx) {
      const double saved = w[i], eps = 1e-4;
      w[i] = saved + eps;
      const double lp = loss();
      w[i] = saved - eps;
      const double lm = loss();
      w[i] = saved;
      const double fd = (lp - lm) / (2 * eps);
      max_diff = std::max(max_diff, std::abs(fd - g[i]));
      max_ref = std::max(max_ref, std::abs(fd));
    }
    EXPECT_GT(max_ref, 1e-9) << p.name << ": gradient is zero, the check proves nothing";
    EXPECT_LT(max_diff / max_ref, 1e-5) << p.name << " max_ref " << max_ref;
  }
}

// The memory policies and loss chunking change what is kept and when, never the result.
TEST(Model, PoliciesAndChunkingGiveIdenticalGradients) {
  auto backend = MakeCpuBackend();
  auto [inputs, targets] = RandomBatch(2, 33, 4);
  std::vector<std::vector<double>> results;
  for (Recompute policy : {Recompute::kNone, Recompute::kConvAndDelta, Recompute::kLayer}) {
    for (int64_t chunk : {0, 5}) {
      MambaModel model(TinyConfig(), backend.get(), DType::kF64, {policy, chunk});
      model.Initialize(9);
      model.ZeroGrad();
      const LossStats st = model.ForwardBackward(inputs, targets, kIgnore, 0.01, true);
      std::vector<double> all = {st.loss_sum};
      for (const auto& p : model.parameters()) {
        all.insert(all.end(), p.grad.data<double>(), p.grad.data<double>() + p.grad.numel());
      }
      results.push_back(all);
    }
  }
  // Chunking reorders the embedding gradient's sum over rows (last bits may differ); the policies
  // with equal chunking must agree exactly.
  for (size_t i = 2; i < results.size(); ++i) EXPECT_EQ(results[i], results[i % 2]) << i;
  EXPECT_LT(::mamba::testing::RelativeError(results[1], results[0]), 1e-12);
}

// A long forward-only pass runs chunk by chunk, each layer carrying its conv tail and scan state:
// the same loss as one pass, for chunks of any length (d_conv - 1 = 3 included; 33 is no
// multiple of them) and every memory policy.
TEST(Model, ChunkedEvaluationGivesOnePassLoss) {
  auto backend = MakeCpuBackend();
  const int64_t B = 2, L = 33;
  auto [inputs, targets] = RandomBatch(B, L, 5);
  for (Recompute policy : {Recompute::kConvAndDelta, Recompute::kLayer}) {
    ModelOptions whole;
    whole.recompute = policy;
    whole.eval_chunk_rows = B * L;
    MambaModel one(TinyConfig(), backend.get(), DType::kF64, whole);
    one.Initialize(9);
    const LossStats ref = one.ForwardBackward(inputs, targets, kIgnore, 0, false);
    for (int64_t chunk : {3, 7, 16, 32}) {
      SCOPED_TRACE(::testing::Message() << "chunks of " << chunk);
      ModelOptions chunked = whole;
      chunked.eval_chunk_rows = B * chunk;
      MambaModel m(TinyConfig(), backend.get(), DType::kF64, chunked);
      m.Initialize(9);
      const LossStats got = m.ForwardBackward(inputs, targets, kIgnore, 0, false);
      EXPECT_EQ(got.count, ref.count);
      EXPECT_EQ(got.correct, ref.correct);
      EXPECT_NEAR(got.loss_sum, ref.loss_sum, 1e-12 * std::abs(ref.loss_sum));
      // The same split without carrying anything must differ (the check can fail).
      double uncarried = 0;
      for (int64_t t0 = 0; t0 < L; t0 += chunk) {
        const int64_t len = std::min(chunk, L - t0);
        Tensor in = Tensor::Empty({B, len}, DType::kI32), tg = Tensor::Empty({B, len}, DType::kI32);
        for (int64_t b = 0; b < B; ++b) {
          for (int64_t t = 0; t < len; ++t) {
            in.data<int32_t>()[b * len + t] = inputs.data<int32_t>()[b * L + t0 + t];
            tg.data<int32_t>()[b * len + t] = targets.data<int32_t>()[b * L + t0 + t];
          }
        }
        uncarried += m.ForwardBackward(in, tg, kIgnore, 0, false).loss_sum;
      }
      EXPECT_GT(std::abs(uncarried - ref.loss_sum), 1e-6 * std::abs(ref.loss_sum));
    }
  }
}

TEST(Model, FloatAndDoubleAgree) {
  auto backend = MakeCpuBackend();
  MambaModel m32(TinyConfig(), backend.get(), DType::kF32);
  MambaModel m64(TinyConfig(), backend.get(), DType::kF64);
  m32.Initialize(5);
  m64.Initialize(5);
  auto [inputs, targets] = RandomBatch(3, 20, 9);
  const LossStats a = m32.ForwardBackward(inputs, targets, kIgnore, 1.0, false);
  const LossStats b = m64.ForwardBackward(inputs, targets, kIgnore, 1.0, false);
  EXPECT_NEAR(a.loss_sum, b.loss_sum, 1e-5 * std::abs(b.loss_sum));
  EXPECT_EQ(a.count, b.count);
}

TEST(Model, InitializationFollowsMambaSsm) {
  ModelConfig c;
  c.d_model = 128;
  c.n_layer = 4;
  c.d_state = 16;
  c.dt_rank = ModelConfig::DefaultDtRank(128);
  c.vocab_size = 256;
  auto backend = MakeCpuBackend();
  MambaModel model(c, backend.get());
  model.Initialize(42);
  const int64_t E = c.d_inner(), N = c.d_state;

  auto stats = [](const Tensor& t) {
    double sum = 0, sq = 0, max_abs = 0;
    const float* p = t.data<float>();
    for (int64_t i = 0; i < t.numel(); ++i) {
      sum += p[i];
      sq += double(p[i]) * p[i];
      max_abs = std::max(max_abs, double(std::abs(p[i])));
    }
    const double mean = sum / t.numel();
    return std::make_tuple(mean, std::sqrt(sq / t.numel() - mean * mean), max_abs);
  };
  auto [emb_mean, emb_std, emb_max] = stats(model.parameter("backbone.embeddings.weight").value);
  EXPECT_NEAR(emb_mean, 0.0, 0.002);
  EXPECT_NEAR(emb_std, 0.02, 0.001);

  for (int64_t i = 0; i < c.n_layer; ++i) {
    const std::string p = "backbone.layers." + std::to_string(i) + ".mixer.";
    const float* a_log = model.parameter(p + "A_log").value.data<float>();
    for (int64_t d = 0; d < E; ++d)
      for (int64_t n = 0; n < N; ++n) ASSERT_FLOAT_EQ(a_log[d * N + n], std::log(float(n + 1)));
    const float* D = model.parameter(p + "D").value.data<float>();
    for (int64_t d = 0; d < E; ++d) ASSERT_EQ(D[d], 1.0f);
    // softplus(dt bias) is the initial step size: log-uniform in [1e-3, 1e-1].
    const float* bias = model.parameter(p + "dt_proj.bias").value.data<float>();
    double log_sum = 0;
    for (int64_t d = 0; d < E; ++d) {
      const double dt = std::log1p(std::exp(double(bias[d])));
      EXPECT_GE(dt, 1e-3 * 0.999);
      EXPECT_LE(dt, 1e-1 * 1.001);
      log_sum += std::log(dt);
    }
    EXPECT_NEAR(log_sum / E, 0.5 * (std::log(1e-3) + std::log(1e-1)), 0.4);  // mean of log U
    auto [w_mean, w_std, w_max] = stats(model.parameter(p + "dt_proj.weight").value);
    EXPECT_LE(w_max, 1.0 / std::sqrt(double(c.dt_rank)));
    // out_proj: U(+-1/sqrt(E)) rescaled by 1/sqrt(n_layer): std = bound / sqrt(3).
    const double bound = 1.0 / std::sqrt(double(E)) / std::sqrt(double(c.n_layer));
    auto [o_mean, o_std, o_max] = stats(model.parameter(p + "out_proj.weight").value);
    EXPECT_LE(o_max, bound);
    EXPECT_NEAR(o_std, bound / std::sqrt(3.0), 0.05 * bound);
    auto [n_mean, n_std, n_max] =
        stats(model.parameter("backbone.layers." + std::to_string(i) + ".norm.weight").value);
    EXPECT_EQ(n_mean, 1.0);
    EXPECT_EQ(n_std, 0.0);
  }
}

}  // namespace
}  // namespace mamba
