#include "worker/gradient_sync.h"

#include <algorithm>

#include "profiling/nvtx.h"
#include "worker/status_macros.h"

namespace mamba {

GradientSync::GradientSync(MambaModel* model, comm::Communicator* world, bool sharded,
                           size_t bucket_bytes)
    : model_(model), world_(world), sharded_(sharded) {
  if (sharded_ || bucket_bytes == 0) return;
  ParameterStore& store = model_->parameter_store();
  const size_t groups = store.groups().size();
  const int64_t n_layer = model_->config().n_layer;
  bucket_of_.resize(n_layer + 1);
  // In the backward's order: the last layer (with norm_f) first, the embedding last. A layer's
  // parameters, and so a run of layers', are contiguous in each group's arena.
  Bucket current;
  size_t bytes = 0;
  std::vector<Range> spans(groups);
  std::vector<bool> used(groups, false);
  const auto flush = [&] {
    for (size_t g = 0; g < groups; ++g) {
      if (used[g]) current.ranges.push_back(spans[g]);
    }
    current.remaining = static_cast<int64_t>(current.layers.size());
    buckets_.push_back(current);
    current = Bucket();
    bytes = 0;
    std::fill(used.begin(), used.end(), false);
  };
  for (int64_t layer = n_layer - 1; layer >= -1; --layer) {
    for (size_t index : model_->GradientsFinalAt(layer)) {
      const ParameterStore::Placement p = store.PlacementOf(index);
      Range& r = spans[p.group];
      if (!used[p.group]) r = {p.group, p.offset, p.offset + p.numel};
      r.begin = std::min(r.begin, p.offset);
      r.end = std::max(r.end, p.offset + p.numel);
      used[p.group] = true;
      bytes += p.numel * DTypeSize(store.groups()[p.group].grads.dtype());
    }
    current.layers.push_back(layer);
    bucket_of_[layer + 1] = buckets_.size();
    // The embedding's bucket stands alone: it is final only after the whole backward.
    if (bytes >= bucket_bytes || layer == 0 || layer == -1) flush();
  }
  model_->SetGradientsReadyHook([this](int64_t layer) { OnReady(layer); });
}

GradientSync::~GradientSync() {
  if (!buckets_.empty()) model_->SetGradientsReadyHook(nullptr);
}

void GradientSync::Begin() {
  active_ = true;
  for (Bucket& b : buckets_) {
    b.remaining = static_cast<int64_t>(b.layers.size());
    b.launched = false;
  }
}

absl::Status GradientSync::Launch(Bucket& b) {
  b.launched = true;
  profiling::ScopedRange range("grad_all_reduce");
  for (const Range& r : b.ranges) {
    Tensor view =
        model_->parameter_store().groups()[r.group].grads.View(r.begin, {r.end - r.begin});
    RETURN_IF_ERROR(world_->AllReduceSumAsync(view));
  }
  return absl::OkStatus();
}

void GradientSync::OnReady(int64_t layer) {
  if (!active_) return;
  Bucket& b = buckets_[bucket_of_[layer + 1]];
  if (--b.remaining == 0) comm::ThrowIfError(Launch(b));
}

absl::Status GradientSync::Finish() {
  profiling::ScopedRange range("grad_sync");
  active_ = false;
  if (!buckets_.empty()) {
    for (Bucket& b : buckets_) {
      if (!b.launched) RETURN_IF_ERROR(Launch(b));
    }
    return world_->WaitAsync();
  }
  for (const ParameterGroup& g : model_->parameter_store().groups()) {
    Tensor grads = g.grads;
    RETURN_IF_ERROR(sharded_ ? world_->ReduceScatterSum(grads) : world_->AllReduceSum(grads));
  }
  return absl::OkStatus();
}

}  // namespace mamba
