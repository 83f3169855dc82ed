#include "worker/optimizer.h"

#include <algorithm>
#include <cmath>

namespace mamba {

double LearningRate(const OptimizerConfig& c, int64_t step) {
  if (step < c.warmup_steps) return c.lr * double(step + 1) / double(c.warmup_steps);
  if (!c.cosine) return c.lr;
  const double min_lr = c.lr * c.min_lr_ratio;
  const int64_t decay_steps = std::max<int64_t>(1, c.total_steps - c.warmup_steps);
  const double progress = std::min(1.0, double(step - c.warmup_steps) / double(decay_steps));
  return min_lr + 0.5 * (c.lr - min_lr) * (1.0 + std::cos(M_PI * progress));
}

AdamWOptimizer::AdamWOptimizer(const OptimizerConfig& config, Backend* backend,
                               std::vector<Parameter>* params)
    : config_(config), backend_(backend), params_(params) {
  for (const Parameter& p : *params_) {
    m_.push_back(backend_->Empty(p.value.shape(), p.value.dtype()));
    v_.push_back(backend_->Empty(p.value.shape(), p.value.dtype()));
    backend_->Zero(m_.back());
    backend_->Zero(v_.back());
  }
}

AdamWOptimizer::StepInfo AdamWOptimizer::Step() {
  StepInfo info;
  double sum_sq = 0;
  for (const Parameter& p : *params_) sum_sq += backend_->SumSquares(p.grad);
  info.grad_norm = std::sqrt(sum_sq);
  if (!std::isfinite(info.grad_norm)) return info;
  info.applied = true;
  // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1.
  if (config_.grad_clip > 0) {
    const double coef = config_.grad_clip / (info.grad_norm + 1e-6);
    if (coef < 1.0) {
      for (Parameter& p : *params_) backend_->Scale(p.grad, coef);
    }
  }
  info.lr = LearningRate(config_, step_);
  ++step_;
  for (size_t i = 0; i < params_->size(); ++i) {
    Parameter& p = (*params_)[i];
    AdamWHyper h;
    h.lr = info.lr;
    h.beta1 = config_.beta1;
    h.beta2 = config_.beta2;
    h.eps = config_.eps;
    h.weight_decay = p.weight_decay ? config_.weight_decay : 0.0;
    h.step = step_;
    backend_->AdamW(p.value, p.grad, m_[i], v_[i], h);
  }
  return info;
}

}  // namespace mamba
