// AdamW over all parameters with global-norm clipping and a warmup + cosine/constant schedule,
// on the parameter arenas: per step one gradient-norm reduction (the step's one wait for the
// device) and one fused AdamW op per arena, which applies the clipping as a gradient scale.
#pragma once

#include <cstdint>
#include <vector>

#include "worker/backend.h"
#include "worker/parameters.h"

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
  // The moments mirror the store's arenas; `params` (allocated) must outlive the optimizer.
  AdamWOptimizer(const OptimizerConfig& config, Backend* backend, ParameterStore* params);

  struct StepInfo {
    double lr = 0;
    double grad_norm = 0;  // before clipping
    bool applied = false;  // false when the gradient norm was not finite
  };
  // Updates every parameter (and its shadow) from the clipped gradients, advances the step
  // counter. The gradients themselves are left as they were. A non-finite gradient norm changes
  // nothing (parameters, moments and step counter stay as they were), so the caller can stop
  // with the last good state intact. Returns before the update has finished on the device.
  StepInfo Step();
  // The global L2 norm of the gradients (Step's one wait for the device).
  double GradNorm();

  int64_t step() const { return step_; }
  // For resuming from a checkpoint (with the moments restored through the accessors below).
  void set_step(int64_t step) { step_ = step; }
  // Per-parameter views of the moments, in parameter order: written into (Backend::CopyFromHost),
  // never replaced.
  const std::vector<Tensor>& first_moments() const { return m_views_; }
  const std::vector<Tensor>& second_moments() const { return v_views_; }

 private:
  OptimizerConfig config_;
  Backend* backend_;
  ParameterStore* params_;
  std::vector<Tensor> m_, v_;  // one arena per parameter group
  std::vector<Tensor> m_views_, v_views_;
  int64_t step_ = 0;  // number of updates done
};

}  // namespace mamba
