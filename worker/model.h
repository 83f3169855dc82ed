// The Mamba language model (Gu & Dao 2023), written once against the Backend op interface:
// embedding -> n_layer x [fused add + RMSNorm -> Mamba mixer] -> add + RMSNorm -> tied lm_head ->
// cross-entropy. Parameter names and shapes follow HF MambaForCausalLM.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "worker/backend.h"
#include "worker/comm/communicator.h"
#include "worker/model_config.h"
#include "worker/parameters.h"

namespace mamba {

struct LossStats {
  double loss_sum = 0;  // summed over counted tokens
  int64_t count = 0;    // tokens with a target
  int64_t correct = 0;  // argmax == target among them
  double mean_loss() const { return count ? loss_sum / count : 0; }
  double accuracy() const { return count ? double(correct) / count : 0; }
};

// What the forward keeps for the backward.
enum class Recompute {
  kNone,          // keep every activation
  kConvAndDelta,  // recompute the conv output and delta (mamba_ssm's checkpoint_lvl 1)
  kLayer,         // keep only each layer's input and rerun the layer (very long sequences)
};

struct ModelOptions {
  Recompute recompute = Recompute::kConvAndDelta;
  // Rows of the lm_head + loss per chunk; 0 picks about 512 MiB of logits per chunk.
  int64_t loss_chunk_rows = 0;
  // Forward-only passes (evaluation) longer than this many rows (batch x positions) run in
  // chunks of positions, each layer carrying its conv tail and scan state from chunk to chunk,
  // so that their memory does not grow with the length; 0 picks 65,536 rows.
  int64_t eval_chunk_rows = 0;
  // Sequence parallelism: hand each layer's composed scan state from rank to rank (a send/recv
  // chain: sp - 1 hops in turn) instead of all-gathering every slice's state map and composing
  // them on every rank (one collective). Both give the same bits.
  bool state_chain = false;
};

class MambaModel {
 public:
  // dtype: float32 for training, float64 for gradient checks (CPU backend). The parameters live
  // in arenas (ParameterStore), with bf16 shadows of the GEMM weights where the backend's GEMMs
  // want bf16.
  MambaModel(const ModelConfig& config, Backend* backend, DType dtype = DType::kF32,
             const ModelOptions& options = {});

  // mamba_ssm's initialization, drawn on the host from `seed`.
  void Initialize(uint64_t seed);

  const ModelConfig& config() const { return config_; }
  // In HF state-dict order. Values are written through parameter_store().CopyFromHost (or into
  // their memory), never replaced.
  const std::vector<Parameter>& parameters() const { return params_.parameters(); }
  const Parameter& parameter(const std::string& name) const;
  ParameterStore& parameter_store() { return params_; }
  int64_t num_parameters() const;
  void ZeroGrad();

  // inputs, targets: int32 host tensors (batch, seq_len). Computes the summed loss over targets
  // that are not ignore_index; with backward, adds grad_scale * d(summed loss)/d(param) to every
  // parameter's grad (grad_scale = 1 / tokens counted in the global batch gives the mean).
  // Out of device memory (DeviceOutOfMemory) propagates with every activation released; the
  // gradients are then partial (ZeroGrad before another pass).
  LossStats ForwardBackward(const Tensor& inputs, const Tensor& targets, int32_t ignore_index,
                            double grad_scale, bool backward);
  // Sequence parallelism: this model holds one slice of every sequence, the sp_group.rank()-th
  // of sp_group.size() consecutive ones, and exchanges with its neighbours per layer (DESIGN.md,
  // "Sequence parallelism"): forward, the conv halo (the last d_conv - 1 positions of the conv
  // input) to the next rank, and the slices' state maps (decay, state), all-gathered and folded
  // into this slice's initial state; backward, the state-gradient maps folded in reverse into
  // this slice's final-state gradient, and the halo's gradient to the previous rank. Inputs and
  // targets are then this slice's; the loss and the parameter gradients are this slice's
  // contributions, to be summed over the group. Null (the default) or a group of one: no split.
  // A failed exchange throws comm::CommunicationError.
  void SetSequenceParallel(comm::Communicator* sp_group) { sp_ = sp_group; }

  // Called during a backward each time some parameters' gradients are final, so that their
  // synchronization can start while the backward goes on: with the layer's index after its
  // backward, then with -1 after the embedding's (GradientsFinalAt says which parameters).
  void SetGradientsReadyHook(std::function<void(int64_t layer)> hook) { hook_ = std::move(hook); }
  // Indices into parameters() whose gradients are final when the hook is called with `layer`:
  // the layer's own (the last layer's with norm_f's, which the head's backward finished first),
  // or for -1 the embedding's (the tied lm_head adds to it first, the embedding backward last).
  std::vector<size_t> GradientsFinalAt(int64_t layer) const;

  // Logits (batch * seq_len, vocab), rows ordered (batch, position), on the backend's device,
  // for int32 host inputs (batch, seq_len). For evaluation and parity checks.
  Tensor Logits(const Tensor& inputs);

 private:
  // parameters() order: the embedding, this many a layer, norm_f.
  static constexpr size_t kParamsPerLayer = 10;
  // What the forward leaves for the backward of the final norm and the tied lm_head.
  struct Head {
    Tensor ids, res_f, hf, rstd_f;
  };
  Head Forward(const Tensor& inputs);
  // Per-layer parameters, activations saved for the backward, and gradient scratch.
  struct Layer {
    Parameter* norm;
    Parameter *in_proj, *conv_w, *conv_b, *x_proj, *dt_w, *dt_b, *A_log, *D, *out_proj;
    // dbc: x_proj's output (B, L, R + 2N); the scan reads Bm and Cm as its column blocks.
    Tensor residual, h, rstd, x, z, xa, dbc, dt_raw, delta, A, y, out;
    // Sequence parallelism (undefined without it, and on the first slice): the conv halo from the
    // previous slice (B, d_conv - 1, E), this slice's initial state (B, E, N) and its decay. A
    // chunked evaluation sets prefix and h0 from the previous chunk instead.
    Tensor prefix, h0, decay;
    // When defined (a chunked evaluation), the scan also writes its final state here.
    Tensor h_last;
  };
  // A chunked forward-only pass: per layer, the last d_conv - 1 positions of the conv input and
  // the scan's final state of the chunk before, carried into the next.
  struct Carry {
    std::vector<Tensor> tails, states;
  };
  LossStats ChunkedForwardLoss(const Tensor& inputs, const Tensor& targets, int32_t ignore_index,
                               int64_t chunk_len);
  bool sequence_parallel() const { return sp_ != nullptr && sp_->size() > 1; }
  // Forward exchanges of one layer (sequence parallelism): the conv halo into l.prefix; the
  // state maps into l.h0 and l.decay.
  void ExchangeHalo(Layer& l, int64_t B, int64_t L);
  void HandOffState(Layer& l, int64_t B);
  // Backward: this slice's final-state gradient from the later slices' maps; and the halo's
  // gradient dprefix sent back, the next slice's added into dx's last positions.
  Tensor HandBackStateGrad(const Layer& l, const Tensor& dy, int64_t B);
  // All-gathers the sp group's maps (each rank's `maps`: decay then offset, (2, B, E, N)) and
  // composes those of the ranks in `order`, first to last, from a zero state: undefined when
  // `order` is empty.
  Tensor ComposeMaps(const Tensor& maps, const std::vector<int>& order, int64_t B);
  // The same composition as a chain: the state of the slices before this one (after it, when
  // !forward) from the neighbour on that side, this slice's map applied to it for the other.
  Tensor ChainMaps(const Tensor& maps, bool forward, int64_t B);
  void ExchangeHaloGrad(const Tensor& dprefix, Tensor& dx, int64_t B, int64_t L);
  // A copy of the last H positions of each of the B sequences of x (B, L, E): (B, H, E).
  Tensor LastPositions(const Tensor& x, int64_t B, int64_t L, int64_t H);

  // recompute: rerun for the backward (Recompute::kLayer): keep every activation, skip out_proj.
  void ForwardLayer(Layer& l, const Tensor& residual_in, const Tensor& hidden_in, int64_t B,
                    int64_t L, bool recompute);
  // d_residual: the gradient w.r.t. the residual stream after this layer, which is also the
  // gradient w.r.t. the layer's output (it is added to the stream). Replaced by the gradient
  // w.r.t. the stream before the layer (equal to that w.r.t. the previous layer's output).
  // d_residual16: d_residual as a GEMM operand (bf16 in mixed precision; undefined otherwise),
  // replaced likewise.
  void BackwardLayer(Layer& l, Tensor& d_residual, Tensor& d_residual16, int64_t B, int64_t L);
  void ReleaseActivations(Layer& l);
  LossStats RunForwardBackward(const Tensor& inputs, const Tensor& targets, int32_t ignore_index,
                               double grad_scale, bool backward);
  ScanInputs ScanInputsOf(const Layer& l) const;
  // The residual stream, its gradient and the norms' statistics: the model dtype.
  Tensor Act(const Shape& shape) { return backend_->Empty(shape, dtype_); }
  // Activations that feed GEMMs, the conv and the scan (and their gradients): bf16 when the
  // backend multiplies in bf16 (mixed precision), else the model dtype.
  Tensor Act16(const Shape& shape) { return backend_->Empty(shape, act_dtype_); }
  // A bf16 copy of the residual stream's gradient, which the norm's backward writes in the same
  // pass for out_proj's backward (instead of the GEMM converting the fp32 one); undefined when
  // activations are in the model dtype.
  Tensor ResidualGradCopy(const Shape& shape) {
    return act_dtype_ != dtype_ ? Act16(shape) : Tensor();
  }

  ModelConfig config_;
  Backend* backend_;
  DType dtype_;
  DType act_dtype_;
  ModelOptions options_;
  ParameterStore params_;
  std::vector<Layer> layers_;
  Parameter* embedding_ = nullptr;
  Parameter* norm_f_ = nullptr;
  comm::Communicator* sp_ = nullptr;
  Carry* carry_ = nullptr;  // set during a chunked forward-only pass
  std::function<void(int64_t)> hook_;
};

}  // namespace mamba
