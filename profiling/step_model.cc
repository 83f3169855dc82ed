#include "profiling/step_model.h"

namespace mamba::profiling {
namespace {

void Add(std::map<std::string, OpModel>& m, const std::string& op, const Traffic& t,
         int64_t calls = 1, double sram_bytes = 0) {
  OpModel& o = m[op];
  o.calls += calls;
  o.traffic += t;
  o.sram_bytes += sram_bytes;
}

// A conv backward: x, dy in; dx out; weight and bias gradients: about twice the forward's bytes.
Traffic ConvBackward(int64_t B, int64_t L, int64_t C, int64_t K, int act) {
  Traffic f = Conv1dForward(B, L, C, K, act), t;
  t.read_bytes = 2 * f.read_bytes;
  t.write_bytes = f.write_bytes + 4.0 * C * (K + 1);
  t.flops = 2 * f.flops;
  t.special = f.special;
  return t;
}

Traffic NormBackward(int64_t rows, int64_t dim, int act) {
  Traffic f = AddRmsNormForward(rows, dim, act), t;
  t.read_bytes = f.read_bytes + f.write_bytes;  // dy, the saved residual and rstd
  t.write_bytes = f.write_bytes;
  t.flops = 2 * f.flops;
  return t;
}

}  // namespace

std::map<std::string, OpModel> StepModel(const ModelConfig& c, const StepShape& s) {
  std::map<std::string, OpModel> m;
  const int64_t M = s.batch * s.len, dm = c.d_model, E = c.d_inner(), N = c.d_state, R = c.dt_rank,
                K = c.d_conv, V = c.vocab_size;
  const int a = s.act_bytes, w = s.act_bytes;  // GEMM operands in the activations' dtype
  const ScanShape scan{s.batch, s.len, E, N, 1};
  const auto layer_forward = [&](bool with_out_proj) {
    Add(m, "rmsnorm_fwd", AddRmsNormForward(M, dm, a));
    Add(m, "linear_fwd", GemmForward(M, E, dm, a, w, a), 2);  // in_proj's two halves
    Add(m, "conv1d_fwd", Conv1dForward(s.batch, s.len, E, K, a));
    Add(m, "linear_fwd", GemmForward(M, R + 2 * N, E, a, w, a));  // x_proj
    Add(m, "linear_fwd", GemmForward(M, E, R, a, w, a));          // dt_proj
    Add(m, "selective_scan_fwd", ScanForward(scan, a), 1, ScanForwardSramBytes(scan));
    if (with_out_proj) Add(m, "linear_fwd", GemmForward(M, dm, E, a, w, a));
  };
  for (int64_t l = 0; l < c.n_layer; ++l) {
    layer_forward(true);
    // The backward's recompute: the whole layer, or the conv output and delta.
    if (s.recompute_layer) {
      layer_forward(false);
    } else {
      Add(m, "conv1d_fwd", Conv1dForward(s.batch, s.len, E, K, a));
      Add(m, "linear_fwd", GemmForward(M, E, R, a, w, a));
    }
    Add(m, "linear_bwd", GemmBackward(M, dm, E, a, w));  // out_proj
    Add(m, "selective_scan_bwd", ScanBackward(scan, a), 1, ScanBackwardSramBytes(scan));
    Add(m, "linear_bwd", GemmBackward(M, E, R, a, w));          // dt_proj
    Add(m, "linear_bwd", GemmBackward(M, R + 2 * N, E, a, w));  // x_proj
    Add(m, "conv1d_bwd", ConvBackward(s.batch, s.len, E, K, a));
    Add(m, "linear_bwd", GemmBackward(M, E, dm, a, w), 2);  // in_proj's halves
    Add(m, "rmsnorm_bwd", NormBackward(M, dm, a));
  }
  // The head: final norm, tied lm_head, loss (logits once through the loss), and the embedding.
  Add(m, "rmsnorm_fwd", AddRmsNormForward(M, dm, a));
  Add(m, "linear_fwd", GemmForward(M, V, dm, a, w, a));
  Traffic ce;
  ce.read_bytes = double(M) * V * a;
  ce.write_bytes = double(M) * V * a;  // the logits' gradient, in place
  ce.flops = 5.0 * M * V;
  ce.special = double(M) * V;
  Add(m, "cross_entropy", ce);
  Add(m, "linear_bwd", GemmBackward(M, V, dm, a, w));
  Add(m, "rmsnorm_bwd", NormBackward(M, dm, a));
  Traffic emb;
  emb.read_bytes = double(M) * 4 + double(M) * dm * 4;
  emb.write_bytes = double(M) * dm * 4;
  Add(m, "embedding_fwd", emb);
  Add(m, "embedding_bwd", emb);
  // AdamW over every parameter: param, grad, m, v in; param, m, v out.
  Traffic adam;
  adam.read_bytes = 16.0 * s.parameters;
  adam.write_bytes = 12.0 * s.parameters;
  adam.flops = 15.0 * s.parameters;
  adam.special = double(s.parameters);
  Add(m, "adamw", adam);
  Traffic norm;  // the gradient norm: every gradient read once
  norm.read_bytes = 4.0 * s.parameters;
  norm.flops = 2.0 * s.parameters;
  Add(m, "sum_squares", norm);
  return m;
}

const std::vector<std::string>& OpNames() {
  static const std::vector<std::string> names = {"adamw",
                                                 "add",
                                                 "addproduct",
                                                 "conv1d_bwd",
                                                 "conv1d_fwd",
                                                 "convert",
                                                 "copy_columns",
                                                 "copy_from_host",
                                                 "cross_entropy",
                                                 "cross_entropy_stats",
                                                 "embedding_bwd",
                                                 "embedding_fwd",
                                                 "from_host",
                                                 "linear_bwd",
                                                 "linear_fwd",
                                                 "negexp",
                                                 "rmsnorm_bwd",
                                                 "rmsnorm_fwd",
                                                 "scale",
                                                 "scan_state_grad",
                                                 "scan_state_map",
                                                 "selective_scan_bwd",
                                                 "selective_scan_fwd",
                                                 "silu_bwd",
                                                 "silu_fwd",
                                                 "sum_squares",
                                                 "to_host",
                                                 "write_columns"};
  return names;
}

std::string PhaseOf(const std::string& op) {
  if (op.rfind("linear", 0) == 0) return "gemm";
  if (op.rfind("selective_scan", 0) == 0 || op.rfind("scan_state", 0) == 0) return "scan";
  if (op.rfind("conv1d", 0) == 0 || op.rfind("silu", 0) == 0) return "conv";
  if (op.rfind("rmsnorm", 0) == 0) return "norm";
  if (op.rfind("cross_entropy", 0) == 0) return "loss";
  if (op == "adamw" || op == "sum_squares") return "optimizer";
  if (op.rfind("embedding", 0) == 0) return "embedding";
  return "other";
}

}  // namespace mamba::profiling
