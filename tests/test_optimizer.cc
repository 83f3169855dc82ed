// AdamW, clipping and the learning-rate schedule against hand-written float64 formulas
// (torch.optim.AdamW and torch.nn.utils.clip_grad_norm_ semantics).
#include <gtest/gtest.h>

#include <cmath>
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

// Two parameters (one decayed, one not), three steps, float64: every value against the formulas.
TEST(AdamW, MatchesReferenceFormulasWithClipping) {
  auto backend = MakeCpuBackend();
  std::vector<Parameter> params(2);
  const std::vector<double> w0 = {0.5, -1.0, 2.0}, w1 = {0.1, 0.2};
  for (int i = 0; i < 2; ++i) {
    const auto& init = i == 0 ? w0 : w1;
    params[i].name = i == 0 ? "w" : "b";
    params[i].value = Tensor::Empty({int64_t(init.size())}, DType::kF64);
    params[i].grad = Tensor::Empty({int64_t(init.size())}, DType::kF64);
    std::copy(init.begin(), init.end(), params[i].value.data<double>());
    params[i].weight_decay = i == 0;
  }
  OptimizerConfig c;
  c.lr = 0.01;
  c.weight_decay = 0.1;
  c.grad_clip = 1.0;
  c.warmup_steps = 0;
  c.cosine = false;
  AdamWOptimizer opt(c, backend.get(), &params);

  std::vector<std::vector<double>> w = {w0, w1}, m = {{0, 0, 0}, {0, 0}}, v = m;
  const std::vector<std::vector<double>> grads = {{3.0, -4.0, 1.0}, {0.5, 2.0}};
  for (int step = 1; step <= 3; ++step) {
    double norm_sq = 0;
    for (int i = 0; i < 2; ++i) {
      for (size_t j = 0; j < grads[i].size(); ++j) {
        const double g = grads[i][j] * step;  // grows, so clipping always applies
        params[i].grad.data<double>()[j] = g;
        norm_sq += g * g;
      }
    }
    const double norm = std::sqrt(norm_sq), coef = std::min(1.0, 1.0 / (norm + 1e-6));
    const auto info = opt.Step();
    EXPECT_NEAR(info.grad_norm, norm, 1e-12);
    for (int i = 0; i < 2; ++i) {
      const double wd = i == 0 ? 0.1 : 0.0;
      for (size_t j = 0; j < grads[i].size(); ++j) {
        const double g = grads[i][j] * step * coef;
        m[i][j] = 0.9 * m[i][j] + 0.1 * g;
        v[i][j] = 0.95 * v[i][j] + 0.05 * g * g;
        const double mhat = m[i][j] / (1 - std::pow(0.9, step));
        const double vhat = v[i][j] / (1 - std::pow(0.95, step));
        w[i][j] = w[i][j] * (1 - 0.01 * wd) - 0.01 * mhat / (std::sqrt(vhat) + 1e-8);
        EXPECT_NEAR(params[i].value.data<double>()[j], w[i][j], 1e-12)
            << params[i].name << "[" << j << "] step " << step;
      }
    }
  }
  EXPECT_EQ(opt.step(), 3);
}

TEST(AdamW, NonFiniteGradientChangesNothing) {
  auto backend = MakeCpuBackend();
  std::vector<Parameter> params(1);
  params[0].name = "w";
  params[0].value = Tensor::Empty({3}, DType::kF64);
  params[0].grad = Tensor::Empty({3}, DType::kF64);
  const double w0[3] = {1.0, 2.0, 3.0};
  std::copy(w0, w0 + 3, params[0].value.data<double>());
  AdamWOptimizer opt(OptimizerConfig(), backend.get(), &params);
  params[0].grad.data<double>()[0] = 0.5;
  params[0].grad.data<double>()[1] = NAN;
  params[0].grad.data<double>()[2] = 0.5;
  const auto info = opt.Step();
  EXPECT_FALSE(info.applied);
  EXPECT_FALSE(std::isfinite(info.grad_norm));
  EXPECT_EQ(opt.step(), 0);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(params[0].value.data<double>()[i], w0[i]);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(opt.first_moments()[0].data<double>()[i], 0.0);
}

}  // namespace
}  // namespace mamba
