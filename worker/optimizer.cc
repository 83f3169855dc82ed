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
                               ParameterStore* params, comm::Communicator* shard_group)
    : config_(config), backend_(backend), params_(params), shard_(shard_group) {
  for (size_t i = 0; i < params_->groups().size(); ++i) {
    const ParameterGroup& g = params_->groups()[i];
    for (std::vector<Tensor>* moments : {&m_, &v_}) {
      moments->push_back(backend_->Empty({ChunkOf(i).size()}, g.values.dtype()));
      if (moments->back().numel() > 0) backend_->Zero(moments->back());
    }
  }
  if (!sharded()) {
    m_views_ = params_->Views(m_);
    v_views_ = params_->Views(v_);
  }
}

comm::Chunk AdamWOptimizer::ChunkOf(size_t group) const {
  const int64_t n = params_->groups()[group].values.numel();
  return sharded() ? comm::ChunkOf(n, shard_->size(), shard_->rank()) : comm::Chunk{0, n};
}

size_t AdamWOptimizer::state_bytes() const {
  size_t bytes = 0;
  for (const auto* moments : {&m_, &v_}) {
    for (const Tensor& t : *moments) bytes += t.nbytes();
  }
  return bytes;
}

double AdamWOptimizer::GradNorm() {
  std::vector<Tensor> grads;
  for (size_t i = 0; i < params_->groups().size(); ++i) {
    const comm::Chunk c = ChunkOf(i);
    if (c.size() > 0) grads.push_back(params_->groups()[i].grads.View(c.begin, {c.size()}));
  }
  double squares = backend_->SumSquares(grads);
  if (sharded()) {
    Tensor total = Tensor::Empty({1}, DType::kF64);
    total.data<double>()[0] = squares;
    comm::ThrowIfError(shard_->AllReduceSum(total));
    squares = total.data<double>()[0];
  }
  return std::sqrt(squares);
}

void AdamWOptimizer::MaterializeMoments(bool gather) {
  if (!sharded()) return;
  full_m_.clear();
  full_v_.clear();
  for (size_t i = 0; i < params_->groups().size(); ++i) {
    const Tensor& values = params_->groups()[i].values;
    const comm::Chunk c = ChunkOf(i);
    for (auto [shard, full] : {std::pair{&m_[i], &full_m_}, std::pair{&v_[i], &full_v_}}) {
      Tensor whole = backend_->Empty(values.shape(), values.dtype());
      backend_->Zero(whole);
      if (gather) {
        if (c.size() > 0) {
          Tensor mine = whole.View(c.begin, {c.size()});
          backend_->Convert(*shard, mine);
        }
        comm::ThrowIfError(shard_->AllGatherChunks(whole));
      }
      full->push_back(whole);
    }
  }
  m_views_ = params_->Views(full_m_);
  v_views_ = params_->Views(full_v_);
}

void AdamWOptimizer::KeepShard() {
  if (!sharded() || full_m_.empty()) return;
  for (size_t i = 0; i < params_->groups().size(); ++i) {
    const comm::Chunk c = ChunkOf(i);
    if (c.size() == 0) continue;
    backend_->Convert(full_m_[i].View(c.begin, {c.size()}), m_[i]);
    backend_->Convert(full_v_[i].View(c.begin, {c.size()}), v_[i]);
  }
  full_m_.clear();
  full_v_.clear();
  m_views_.clear();
  v_views_.clear();
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
    const comm::Chunk c = ChunkOf(i);
    if (c.size() == 0) continue;
    const auto chunk = [&](const Tensor& t) {
      return t.defined() ? t.View(c.begin, {c.size()}) : Tensor();
    };
    Tensor values = chunk(groups[i].values), shadow = chunk(groups[i].values_bf16);
    backend_->AdamW(values, chunk(groups[i].grads), m_[i], v_[i], shadow, h);
  }
  if (sharded()) {
    // Every rank updated its chunk: pass the chunks around.
    for (const ParameterGroup& g : groups) {
      for (Tensor t : {g.values, g.values_bf16}) {
        if (t.defined()) comm::ThrowIfError(shard_->AllGatherChunks(t));
      }
    }
  }
  return info;
}

}  // namespace mamba
