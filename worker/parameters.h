// Model parameters in flat storage. The values and the grads of each weight-decay group live in
// one arena each, every Parameter's tensors being views into them, so that whole-model passes
// (zeroing the grads, the gradient norm, AdamW) take one op per arena instead of one per
// parameter. Where the backend's GEMMs want weights in another dtype (bf16 under
// GemmPrecision::kBf16), the weight-decay group, which holds every GEMM weight, also has a shadow
// arena of its values in that dtype. Two writers keep the shadow equal to the rounded values: the
// optimizer's fused AdamW, and CopyFromHost here for everything else (initialization, checkpoint
// load, import).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "worker/backend.h"

namespace mamba {

struct Parameter {
  std::string name;           // HF state-dict name
  Tensor value;               // on the backend's device: a view into its group's value arena
  Tensor grad;                // same shape, a view into the grad arena; accumulated by the model
  Tensor value_bf16;          // value rounded to bf16 for the GEMMs, or undefined (no shadow)
  bool weight_decay = false;  // false for A_log, D, norm weights and biases
};

// One weight-decay group: 1-D arenas holding its parameters back to back, in parameter order.
struct ParameterGroup {
  bool weight_decay = false;
  Tensor values, grads;
  Tensor values_bf16;  // the shadow of values, or undefined
};

class ParameterStore {
 public:
  // Each parameter starts a multiple of this many elements into its arena (256 bytes of fp32:
  // cuBLAS's preferred operand alignment). The gaps stay zero, in the grads too.
  static constexpr int64_t kAlign = 64;

  // Room for `capacity` parameters: the references Add returns stay valid.
  explicit ParameterStore(size_t capacity);
  ParameterStore(const ParameterStore&) = delete;
  ParameterStore& operator=(const ParameterStore&) = delete;

  // Declares a parameter; its tensors exist once Allocate has run.
  Parameter& Add(const std::string& name, const Shape& shape, bool weight_decay);
  // Allocates zeroed arenas on `backend` in `dtype` (groups in order of first appearance), plus
  // the shadow where backend->GemmOperandDType(dtype) differs, and points every parameter at its
  // views. Once only.
  void Allocate(Backend* backend, DType dtype);

  const std::vector<Parameter>& parameters() const { return params_; }
  const std::vector<ParameterGroup>& groups() const { return groups_; }
  // Where parameter `index` (in parameters() order) lives: elements [offset, offset + numel) of
  // its group's arenas.
  struct Placement {
    size_t group = 0;
    int64_t offset = 0, numel = 0;
  };
  Placement PlacementOf(size_t index) const;
  // Per-parameter views (in parameter order) of tensors laid out like the groups' value arenas,
  // one per group: the optimizer's moments.
  std::vector<Tensor> Views(const std::vector<Tensor>& arenas) const;

  // Copies a host tensor into p's value and refreshes p's shadow: the way to set a value outside
  // the optimizer.
  void CopyFromHost(const Parameter& p, const Tensor& host);
  void ZeroGrads();
  // Aborts, naming the parameter, if a value, grad or shadow is no longer its view into the arena
  // (it was replaced instead of written into).
  void CheckViews() const;

 private:
  struct Slot {
    size_t group = 0;
    int64_t offset = 0;  // elements into the group's arenas
    Shape shape;
  };
  size_t IndexOf(const Parameter& p) const;
  void CheckView(size_t i) const;

  Backend* backend_ = nullptr;
  std::vector<Parameter> params_;
  std::vector<Slot> slots_;
  std::vector<ParameterGroup> groups_;
};

}  // namespace mamba
