// AdamW, clipping and the learning-rate schedule against hand-written float64 formulas
// (torch.optim.AdamW and torch.nn.utils.clip_grad_norm_ semantics), on parameter arenas.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "worker/optimizer.h"

namespace mamba {
namespace {

TEST(LearningRate, WarmupThenCosineToFloor) {
  OptimizerConfig c;
  c.lr = 1e-3;
  c.warmup_steps = 10;
  c.total_steps = 110;
  c.min_lr_ratio = 0.1;
  EXPECT_DOUBLE_EQ(LearningRate(c, 0), 1e-4);
  EXPECT_DOUBLE_EQ(LearningRate(c, 9), 1e-3);
  EXPECT_DOUBLE_EQ(LearningRate(c, 10), 1e-3);
  EXPECT_NEAR(LearningRate(c, 60), 1e-4 + 0.5 * 9e-4, 1e-15);  // halfway: cos(pi/2) = 0
  EXPECT_NEAR(LearningRate(c, 110), 1e-4, 1e-15);
  EXPECT_NEAR(LearningRate(c, 500), 1e-4, 1e-15);
  c.cosine = false;
  EXPECT_DOUBLE_EQ(LearningRate(c, 60), 1e-3);
}

// Four parameters in two groups (decayed, not), interleaved so that each group's arena holds
// parameters that are not neighbours in parameter order; three steps, float64: every value and
// moment against the formulas.
TEST(AdamW, MatchesReferenceFormulasWithClipping) {
  auto backend = MakeCpuBackend();
  ParameterStore store(4);
  const std::vector<std::vector<double>> w0 = {{0.5, -1.0, 2.0}, {0.1, 0.2}, {-0.3}, {0.7, 0.25}};
  for (size_t i = 0; i < w0.size(); ++i) {
    store.Add("p" + std::to_string(i), {int64_t(w0[i].size())}, /*weight_decay=*/i % 2 == 0);
  }
  store.Allocate(backend.get(), DType::kF64);
  const std::vector<Parameter>& params = store.parameters();
  for (size_t i = 0; i < w0.size(); ++i) {
    std::copy(w0[i].begin(), w0[i].end(), params[i].value.data<double>());
  }
  OptimizerConfig c;
  c.lr = 0.01;
  c.weight_decay = 0.1;
  c.grad_clip = 1.0;
  c.warmup_steps = 0;
  c.cosine = false;
  AdamWOptimizer opt(c, backend.get(), &store);

  std::vector<std::vector<double>> w = w0, m = {{0, 0, 0}, {0, 0}, {0}, {0, 0}}, v = m;
  const std::vector<std::vector<double>> grads = {{3.0, -4.0, 1.0}, {0.5, 2.0}, {1.5}, {-1, 0.5}};
  for (int step = 1; step <= 3; ++step) {
    double norm_sq = 0;
    for (size_t i = 0; i < w0.size(); ++i) {
      for (size_t j = 0; j < grads[i].size(); ++j) {
        const double g = grads[i][j] * step;  // grows, so clipping always applies
        params[i].grad.data<double>()[j] = g;
        norm_sq += g * g;
      }
    }
    const double norm = std::sqrt(norm_sq), coef = std::min(1.0, 1.0 / (norm + 1e-6));
    const auto info = opt.Step();
    EXPECT_NEAR(info.grad_norm, norm, 1e-12);
    for (size_t i = 0; i < w0.size(); ++i) {
      const double wd = i % 2 == 0 ? 0.1 : 0.0;
      for (size_t j = 0; j < grads[i].size(); ++j) {
        const double g = grads[i][j] * step * coef;
        m[i][j] = 0.9 * m[i][j] + 0.1 * g;
        v[i][j] = 0.95 * v[i][j] + 0.05 * g * g;
        const double mhat = m[i][j] / (1 - std::pow(0.9, step));
        const double vhat = v[i][j] / (1 - std::pow(0.95, step));
        w[i][j] = w[i][j] * (1 - 0.01 * wd) - 0.01 * mhat / (std::sqrt(vhat) + 1e-8);
        EXPECT_NEAR(params[i].value.data<double>()[j], w[i][j], 1e-12)
            << params[i].name << "[" << j << "] step " << step;
        EXPECT_NEAR(opt.first_moments()[i].data<double>()[j], m[i][j], 1e-15);
        EXPECT_NEAR(opt.second_moments()[i].data<double>()[j], v[i][j], 1e-15);
      }
    }
  }
  EXPECT_EQ(opt.step(), 3);
}

// The clipping coefficient scales the gradient inside AdamW exactly as a separate Scale pass
// did: float32 bits equal to scaling the gradients first (and the gradients stay unscaled).
TEST(AdamW, ClippingAsGradScaleMatchesAScalePass) {
  auto backend = MakeCpuBackend();
  const int64_t n = 37;
  ParameterStore store(1);
  store.Add("w", {n}, true);
  store.Allocate(backend.get(), DType::kF32);
  const Parameter& p = store.parameters()[0];
  Tensor w = Tensor::Empty({n}, DType::kF32), g = Tensor::Empty({n}, DType::kF32);
  for (int64_t i = 0; i < n; ++i) {
    w.data<float>()[i] = 0.01f * float(i) - 0.2f;
    g.data<float>()[i] = std::sin(float(i)) * 3.f;
  }
  store.CopyFromHost(p, w);
  OptimizerConfig c;
  c.grad_clip = 0.5;
  AdamWOptimizer opt(c, backend.get(), &store);
  std::copy(g.data<float>(), g.data<float>() + n, p.grad.data<float>());
  const auto info = opt.Step();
  ASSERT_TRUE(info.applied);
  const double coef = 0.5 / (info.grad_norm + 1e-6);
  ASSERT_LT(coef, 1.0);
  EXPECT_EQ(std::memcmp(p.grad.raw(), g.raw(), g.nbytes()), 0) << "the gradients were changed";

  Tensor m = Tensor::Zeros({n}, DType::kF32), v = Tensor::Zeros({n}, DType::kF32), none;
  backend->Scale(g, coef);
  AdamWHyper h;
  h.lr = LearningRate(c, 0);
  h.beta1 = c.beta1;
  h.beta2 = c.beta2;
  h.eps = c.eps;
  h.weight_decay = c.weight_decay;
  backend->AdamW(w, g, m, v, none, h);
  EXPECT_EQ(std::memcmp(p.value.raw(), w.raw(), w.nbytes()), 0);
  EXPECT_EQ(std::memcmp(opt.first_moments()[0].raw(), m.raw(), m.nbytes()), 0);
  EXPECT_EQ(std::memcmp(opt.second_moments()[0].raw(), v.raw(), v.nbytes()), 0);
}

TEST(AdamW, NonFiniteGradientChangesNothing) {
  auto backend = MakeCpuBackend();
  ParameterStore store(2);
  store.Add("w", {3}, true);
  store.Add("b", {2}, false);
  store.Allocate(backend.get(), DType::kF64);
  const std::vector<Parameter>& params = store.parameters();
  const double w0[3] = {1.0, 2.0, 3.0};
  std::copy(w0, w0 + 3, params[0].value.data<double>());
  AdamWOptimizer opt(OptimizerConfig(), backend.get(), &store);
  params[0].grad.data<double>()[0] = 0.5;
  params[0].grad.data<double>()[1] = 0.5;
  params[0].grad.data<double>()[2] = 0.5;
  params[1].grad.data<double>()[1] = NAN;  // in the other arena: no update anywhere
  const auto info = opt.Step();
  EXPECT_FALSE(info.applied);
  EXPECT_FALSE(std::isfinite(info.grad_norm));
  EXPECT_EQ(opt.step(), 0);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(params[0].value.data<double>()[i], w0[i]);
  for (int i = 0; i < 2; ++i) EXPECT_EQ(params[1].value.data<double>()[i], 0.0);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(params[0].grad.data<double>()[i], 0.5);
  for (size_t k = 0; k < params.size(); ++k) {
    for (const Tensor& t : {opt.first_moments()[k], opt.second_moments()[k]}) {
      for (int64_t i = 0; i < t.numel(); ++i) EXPECT_EQ(t.data<double>()[i], 0.0);
    }
  }
}

// A replaced value (instead of a copy into it) would silently drop out of the arena the
// optimizer updates: Step refuses it, naming the parameter.
TEST(AdamW, ReplacedParameterTensorIsAnError) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto backend = MakeCpuBackend();
  ParameterStore store(2);
  store.Add("w", {3}, true);
  store.Add("b", {2}, false);
  store.Allocate(backend.get(), DType::kF32);
  AdamWOptimizer opt(OptimizerConfig(), backend.get(), &store);
  EXPECT_DEATH(
      {
        const_cast<Parameter&>(store.parameters()[1]).grad = Tensor::Zeros({2}, DType::kF32);
        opt.Step();
      },
      "parameter b: its grad .* is no longer its view into the parameter arena");
}

}  // namespace
}  // namespace mamba
