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
                               ParameterStore* params)
    : config_(config), backend_(backend), params_(params) {
  for (const ParameterGroup& g : params_->groups()) {
    for (std::vector<Tensor>* moments : {&m_, &v_}) {
      moments->push_back(backend_->Empty(g.values.shape(), g.values.dtype()));
      backend_->Zero(moments->back());
    }
  }
  m_views_ = params_->Views(m_);
  v_views_ = params_->Views(v_);
}

double AdamWOptimizer::GradNorm() {
  std::vector<Tensor> grads;
  for (const ParameterGroup& g : params_->groups()) grads.push_back(g.grads);
  return std::sqrt(backend_->SumSquares(grads));
}

AdamWOptimizer::StepInfo AdamWOptimizer::Step() {
  params_->CheckViews();
  const std::vector<ParameterGroup>& groups = params_->groups();
  StepInfo info;
  info.grad_norm = GradNorm();
  if (!std::isfinite(info.grad_norm)) return info;
  info.applied = true;
  // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1.
  double grad_scale = 1.0;
  if (config_.grad_clip > 0) {
    grad_scale = std::min(1.0, config_.grad_clip / (info.grad_norm + 1e-6));
  }
  info.lr = LearningRate(config_, step_);
  ++step_;
  for (size_t i = 0; i < groups.size(); ++i) {
    AdamWHyper h;
    h.lr = info.lr;
    h.beta1 = config_.beta1;
    h.beta2 = config_.beta2;
    h.eps = config_.eps;
    h.weight_decay = groups[i].weight_decay ? config_.weight_decay : 0.0;
    h.step = step_;
    h.grad_scale = grad_scale;
    Tensor values = groups[i].values, shadow = groups[i].values_bf16;
    backend_->AdamW(values, groups[i].grads, m_[i], v_[i], shadow, h);
  }
  return info;
}

}  // namespace mamba
