// AdamW over all parameters with global-norm clipping and a warmup + cosine/constant schedule,
// on the parameter arenas: per step one gradient-norm reduction (the step's one wait for the
// device) and one fused AdamW op per arena, which applies the clipping as a gradient scale.
//
// Sharded over a group of ranks (ZeRO stage 1, Megatron's distributed optimizer): each rank keeps
// the moments of one chunk of each arena (comm::ChunkOf), expects the gradients reduce-scattered
// (its chunk summed over the group: ShardGroup()->ReduceScatterSum), updates its chunk, and
// all-gathers the parameters (and their bf16 shadows). The moments then take 1/size of the
// memory; the norm is the same global norm, summed chunk by chunk.
#pragma once

#include <cstdint>
#include <vector>

#include "worker/backend.h"
#include "worker/comm/communicator.h"
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
  // The moments mirror the store's arenas (or their chunks, with a shard group of more than one
  // rank); `params` (allocated) and `shard_group` must outlive the optimizer.
  AdamWOptimizer(const OptimizerConfig& config, Backend* backend, ParameterStore* params,
                 comm::Communicator* shard_group = nullptr);

  struct StepInfo {
    double lr = 0;
    double grad_norm = 0;  // before clipping
    bool applied = false;  // false when the gradient norm was not finite
  };
  // Updates every parameter (and its shadow) from the clipped gradients, advances the step
  // counter. The gradients themselves are left as they were. A non-finite gradient norm changes
  // nothing (parameters, moments and step counter stay as they were), so the caller can stop
  // with the last good state intact. Returns before the update has finished on the device.
  // Sharded: a collective (every rank of the group calls it); a failed exchange throws
  // comm::CommunicationError.
  StepInfo Step();
  // The global L2 norm of the gradients (Step's one wait for the device); sharded, of the
  // reduce-scattered chunks, summed over the group (a collective).
  double GradNorm();

  // The group the state is sharded over, or null.
  comm::Communicator* shard_group() const { return sharded() ? shard_ : nullptr; }
  // Bytes of optimizer state this rank holds.
  size_t state_bytes() const;
  // Sharded: makes the full moments exist (first_moments() and second_moments() view them), from
  // every rank's chunk when `gather` (a collective: before saving a checkpoint), else zeros (to
  // load one into); KeepShard then keeps this rank's chunk of them and frees the rest. Unsharded,
  // both do nothing: the moments are always whole.
  void MaterializeMoments(bool gather);
  void KeepShard();

  int64_t step() const { return step_; }
  // For resuming from a checkpoint (with the moments restored through the accessors below).
  void set_step(int64_t step) { step_ = step; }
  // Per-parameter views of the moments, in parameter order: written into (Backend::CopyFromHost),
  // never replaced. Sharded, only between MaterializeMoments and KeepShard.
  const std::vector<Tensor>& first_moments() const { return m_views_; }
  const std::vector<Tensor>& second_moments() const { return v_views_; }

 private:
  OptimizerConfig config_;
  Backend* backend_;
  ParameterStore* params_;
  bool sharded() const { return shard_ != nullptr && shard_->size() > 1; }
  // This rank's chunk of group i's arenas.
  comm::Chunk ChunkOf(size_t group) const;

  comm::Communicator* shard_;
  std::vector<Tensor> m_, v_;            // one arena per parameter group, or its chunk when sharded
  std::vector<Tensor> full_m_, full_v_;  // sharded: whole moments, while materialized
  std::vector<Tensor> m_views_, v_views_;
  int64_t step_ = 0;  // number of updates done
};

}  // namespace mamba
