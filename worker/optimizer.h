// AdamW over all parameters with global-norm clipping and a warmup + cosine/constant schedule.
#pragma once

#include <cstdint>
#include <vector>

#include "worker/backend.h"
#include "worker/model.h"

namespace mamba {

struct OptimizerConfig {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
  double grad_clip = 1.0;  // global L2 norm; 0 disables
  int64_t warmup_steps = 0;
  int64_t total_steps = 1000;
  bool cosine = true;         // else constant after warmup
  double min_lr_ratio = 0.1;  // cosine floor, as a fraction of lr
};

// Learning rate at 0-based `step`: linear warmup from lr/warmup to lr, then cosine decay to
// min_lr_ratio * lr at total_steps (or constant).
double LearningRate(const OptimizerConfig& c, int64_t step);

class AdamWOptimizer {
 public:
  AdamWOptimizer(const OptimizerConfig& config, Backend* backend, std::vector<Parameter>* params);

  struct StepInfo {
    double lr = 0;
    double grad_norm = 0;  // before clipping
    bool applied = false;  // false when the gradient norm was not finite
  };
  // Clips the gradients, updates every parameter, advances the step counter. A non-finite
  // gradient norm changes nothing (parameters, moments and step counter stay as they were), so
  // the caller can stop with the last good state intact.
  StepInfo Step();

  int64_t step() const { return step_; }
  // For resuming from a checkpoint (with the moments restored through the accessors below).
  void set_step(int64_t step) { step_ = step; }
  std::vector<Tensor>& first_moments() { return m_; }
  std::vector<Tensor>& second_moments() { return v_; }

 private:
  OptimizerConfig config_;
  Backend* backend_;
  std::vector<Parameter>* params_;
  std::vector<Tensor> m_, v_;
  int64_t step_ = 0;  // number of updates done
};

}  // namespace mamba
