#include "worker/parameters.h"

#include "worker/check.h"

namespace mamba {
namespace {

// Whether t is the view of `shape` that starts `offset` elements into `arena`.
bool IsViewOf(const Tensor& t, const Tensor& arena, int64_t offset, const Shape& shape) {
  return t.defined() && t.shape() == shape && t.dtype() == arena.dtype() &&
         t.device() == arena.device() &&
         t.raw() == static_cast<char*>(arena.raw()) + offset * DTypeSize(arena.dtype());
}

}  // namespace

ParameterStore::ParameterStore(size_t capacity) { params_.reserve(capacity); }

Parameter& ParameterStore::Add(const std::string& name, const Shape& shape, bool weight_decay) {
  MAMBA_CHECK(backend_ == nullptr) << "parameter " << name << " added after Allocate";
  MAMBA_CHECK(params_.size() < params_.capacity()) << "more parameters than the store's capacity";
  Parameter p;
  p.name = name;
  p.weight_decay = weight_decay;
  params_.push_back(std::move(p));
  slots_.push_back({0, 0, shape});
  return params_.back();
}

void ParameterStore::Allocate(Backend* backend, DType dtype) {
  MAMBA_CHECK(backend_ == nullptr) << "parameters allocated twice";
  backend_ = backend;
  const DType gemm_dtype = backend->GemmOperandDType(dtype);
  MAMBA_CHECK(gemm_dtype == dtype || gemm_dtype == DType::kBF16)
      << "shadow weights are bfloat16, the backend wants " << DTypeName(gemm_dtype);
  std::vector<int64_t> sizes;
  for (size_t i = 0; i < params_.size(); ++i) {
    Slot& s = slots_[i];
    s.group = groups_.size();
    for (size_t g = 0; g < groups_.size(); ++g) {
      if (groups_[g].weight_decay == params_[i].weight_decay) s.group = g;
    }
    if (s.group == groups_.size()) {
      groups_.push_back({params_[i].weight_decay, Tensor(), Tensor(), Tensor()});
      sizes.push_back(0);
    }
    s.offset = sizes[s.group];
    sizes[s.group] += (NumElements(s.shape) + kAlign - 1) / kAlign * kAlign;
  }
  for (size_t g = 0; g < groups_.size(); ++g) {
    ParameterGroup& group = groups_[g];
    group.values = backend->Empty({sizes[g]}, dtype);
    group.grads = backend->Empty({sizes[g]}, dtype);
    backend->Zero(group.values);
    backend->Zero(group.grads);
    // Every GEMM weight decays: only that group needs the GEMM dtype.
    if (group.weight_decay && gemm_dtype != dtype) {
      group.values_bf16 = backend->Empty({sizes[g]}, gemm_dtype);
      backend->Zero(group.values_bf16);
    }
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    const Slot& s = slots_[i];
    const ParameterGroup& group = groups_[s.group];
    params_[i].value = group.values.View(s.offset, s.shape);
    params_[i].grad = group.grads.View(s.offset, s.shape);
    if (group.values_bf16.defined()) {
      params_[i].value_bf16 = group.values_bf16.View(s.offset, s.shape);
    }
  }
}

std::vector<Tensor> ParameterStore::Views(const std::vector<Tensor>& arenas) const {
  MAMBA_CHECK(arenas.size() == groups_.size())
      << arenas.size() << " arenas for " << groups_.size() << " parameter groups";
  for (size_t g = 0; g < groups_.size(); ++g) {
    MAMBA_CHECK(arenas[g].shape() == groups_[g].values.shape())
        << "arena " << arenas[g].DebugString() << " for a group of "
        << groups_[g].values.DebugString();
  }
  std::vector<Tensor> views;
  for (const Slot& s : slots_) views.push_back(arenas[s.group].View(s.offset, s.shape));
  return views;
}

ParameterStore::Placement ParameterStore::PlacementOf(size_t index) const {
  const Slot& s = slots_.at(index);
  return {s.group, s.offset, NumElements(s.shape)};
}

size_t ParameterStore::IndexOf(const Parameter& p) const {
  MAMBA_CHECK(!params_.empty() && &p >= params_.data() && &p < params_.data() + params_.size())
      << "parameter " << p.name << " does not belong to this store";
  return static_cast<size_t>(&p - params_.data());
}

void ParameterStore::CopyFromHost(const Parameter& p, const Tensor& host) {
  const size_t i = IndexOf(p);
  CheckView(i);
  Tensor value = p.value;
  backend_->CopyFromHost(host, value);
  if (p.value_bf16.defined()) {
    Tensor shadow = p.value_bf16;
    backend_->Convert(value, shadow);
  }
}

void ParameterStore::ZeroGrads() {
  for (ParameterGroup& g : groups_) backend_->Zero(g.grads);
}

void ParameterStore::CheckView(size_t i) const {
  MAMBA_CHECK(backend_ != nullptr) << "parameters used before Allocate";
  const Parameter& p = params_[i];
  const Slot& s = slots_[i];
  const ParameterGroup& g = groups_[s.group];
  auto check = [&](const Tensor& t, const Tensor& arena, const char* what) {
    MAMBA_CHECK(IsViewOf(t, arena, s.offset, s.shape))
        << "parameter " << p.name << ": its " << what << " (" << t.DebugString()
        << ") is no longer its view into the parameter arena: it was replaced instead of written "
           "into (copy into it, e.g. with ParameterStore::CopyFromHost)";
  };
  check(p.value, g.values, "value");
  check(p.grad, g.grads, "grad");
  if (g.values_bf16.defined()) {
    check(p.value_bf16, g.values_bf16, "value_bf16");
  } else {
    MAMBA_CHECK(!p.value_bf16.defined())
        << "parameter " << p.name << ": a value_bf16 its group has no shadow arena for";
  }
}

void ParameterStore::CheckViews() const {
  for (size_t i = 0; i < params_.size(); ++i) CheckView(i);
}

}  // namespace mamba
