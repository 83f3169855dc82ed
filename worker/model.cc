#include "worker/model.h"

#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"
#include "profiling/nvtx.h"
#include "worker/check.h"

namespace mamba {
namespace {

// The weight as the GEMMs take it: the shadow where the backend multiplies in its dtype.
const Tensor& GemmWeight(const Parameter& p) {
  return p.value_bf16.defined() ? p.value_bf16 : p.value;
}

}  // namespace

MambaModel::MambaModel(const ModelConfig& config, Backend* backend, DType dtype,
                       const ModelOptions& options)
    : config_(config),
      backend_(backend),
      dtype_(dtype),
      // Mixed precision (DESIGN.md): where the GEMMs take bf16, so do the activations around them.
      act_dtype_(backend->GemmOperandDType(dtype) == DType::kBF16 ? DType::kBF16 : dtype),
      options_(options),
      params_(2 + kParamsPerLayer * config.n_layer) {  // Layer keeps pointers into params_
  const int64_t dm = config.d_model, E = config.d_inner(), N = config.d_state, R = config.dt_rank,
                K = config.d_conv;
  embedding_ = &params_.Add("backbone.embeddings.weight", {config.vocab_size, dm}, true);
  layers_.resize(config.n_layer);
  for (int64_t i = 0; i < config.n_layer; ++i) {
    const std::string p = absl::StrCat("backbone.layers.", i, ".");
    Layer& l = layers_[i];
    l.norm = &params_.Add(p + "norm.weight", {dm}, false);
    l.in_proj = &params_.Add(p + "mixer.in_proj.weight", {2 * E, dm}, true);
    l.conv_w = &params_.Add(p + "mixer.conv1d.weight", {E, 1, K}, true);
    l.conv_b = &params_.Add(p + "mixer.conv1d.bias", {E}, false);
    l.x_proj = &params_.Add(p + "mixer.x_proj.weight", {R + 2 * N, E}, true);
    l.dt_w = &params_.Add(p + "mixer.dt_proj.weight", {E, R}, true);
    l.dt_b = &params_.Add(p + "mixer.dt_proj.bias", {E}, false);
    l.A_log = &params_.Add(p + "mixer.A_log", {E, N}, false);
    l.D = &params_.Add(p + "mixer.D", {E}, false);
    l.out_proj = &params_.Add(p + "mixer.out_proj.weight", {dm, E}, true);
  }
  norm_f_ = &params_.Add("backbone.norm_f.weight", {dm}, false);
  params_.Allocate(backend, dtype);
}

const Parameter& MambaModel::parameter(const std::string& name) const {
  for (const auto& p : parameters()) {
    if (p.name == name) return p;
  }
  MAMBA_CHECK(false) << "no parameter " << name;
  return parameters().front();
}

int64_t MambaModel::num_parameters() const {
  int64_t n = 0;
  for (const auto& p : parameters()) n += p.value.numel();
  return n;
}

void MambaModel::ZeroGrad() { params_.ZeroGrads(); }

void MambaModel::Initialize(uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t E = config_.d_inner(), N = config_.d_state, R = config_.dt_rank, K = config_.d_conv;
  // Host values in double, converted to the model dtype and copied to the device.
  auto set = [&](Parameter* p, const std::vector<double>& v) {
    Tensor host = Tensor::Empty(p->value.shape(), dtype_);
    MAMBA_CHECK(static_cast<int64_t>(v.size()) == host.numel());
    if (dtype_ == DType::kF64) {
      std::copy(v.begin(), v.end(), host.data<double>());
    } else {
      std::copy(v.begin(), v.end(), host.data<float>());
    }
    params_.CopyFromHost(*p, host);
  };
  auto uniform = [&](int64_t n, double bound) {
    std::uniform_real_distribution<double> dist(-bound, bound);
    std::vector<double> v(n);
    for (auto& x : v) x = dist(rng);
    return v;
  };
  auto constant = [](int64_t n, double c) { return std::vector<double>(n, c); };

  std::normal_distribution<double> normal(0.0, 0.02);
  std::vector<double> emb(embedding_->value.numel());
  for (auto& x : emb) x = normal(rng);
  set(embedding_, emb);
  set(norm_f_, constant(config_.d_model, 1.0));

  for (Layer& l : layers_) {
    set(l.norm, constant(config_.d_model, 1.0));
    // nn.Linear / nn.Conv1d defaults: U(+-1/sqrt(fan_in)).
    set(l.in_proj, uniform(l.in_proj->value.numel(), 1.0 / std::sqrt(double(config_.d_model))));
    set(l.conv_w, uniform(E * K, 1.0 / std::sqrt(double(K))));
    set(l.conv_b, uniform(E, 1.0 / std::sqrt(double(K))));
    set(l.x_proj, uniform(l.x_proj->value.numel(), 1.0 / std::sqrt(double(E))));
    // dt_proj: weight U(+-dt_rank^-0.5); bias = softplus^-1(dt), dt log-uniform in [1e-3, 1e-1].
    set(l.dt_w, uniform(E * R, 1.0 / std::sqrt(double(R))));
    std::uniform_real_distribution<double> log_dt(std::log(1e-3), std::log(1e-1));
    std::vector<double> dt_bias(E);
    for (auto& b : dt_bias) {
      const double dt = std::max(std::exp(log_dt(rng)), 1e-4);
      b = dt + std::log(-std::expm1(-dt));  // inverse softplus
    }
    set(l.dt_b, dt_bias);
    std::vector<double> a_log(E * N);
    for (int64_t d = 0; d < E; ++d) {
      for (int64_t n = 0; n < N; ++n) a_log[d * N + n] = std::log(double(n + 1));
    }
    set(l.A_log, a_log);
    set(l.D, constant(E, 1.0));
    // Prenorm residual rescaling: out_proj by 1/sqrt(n_layer) (one residual per Mamba block).
    set(l.out_proj, uniform(l.out_proj->value.numel(),
                            1.0 / std::sqrt(double(E)) / std::sqrt(double(config_.n_layer))));
  }
}

void MambaModel::ReleaseActivations(Layer& l) {
  for (Tensor* t : {&l.residual, &l.h, &l.rstd, &l.x, &l.z, &l.xa, &l.dbc, &l.dt_raw, &l.delta,
                    &l.A, &l.y, &l.out, &l.prefix, &l.h0, &l.decay, &l.h_last}) {
    *t = Tensor();
  }
}

ScanInputs MambaModel::ScanInputsOf(const Layer& l) const {
  ScanInputs in;
  in.u = l.xa;
  in.delta = l.delta;
  in.A = l.A;
  in.D_skip = l.D->value;
  in.z = l.z;
  in.dt_bias = l.dt_b->value;  // applied inside the scan with the softplus, as in mamba_ssm
  in.delta_softplus = true;
  // Bm and Cm are read in place from x_proj's output (dt_raw | Bm | Cm).
  in.bc = l.dbc;
  in.bm_col = config_.dt_rank;
  in.cm_col = config_.dt_rank + config_.d_state;
  in.h0 = l.h0;
  return in;
}

void MambaModel::ExchangeHalo(Layer& l, int64_t B, int64_t L) {
  const int64_t E = config_.d_inner(), H = config_.d_conv - 1;
  const int r = sp_->rank(), P = sp_->size();
  l.prefix = Tensor();
  if (H == 0) return;
  profiling::ScopedRange range("sp_halo");
  const Tensor halo = r + 1 < P ? LastPositions(l.x, B, L, H) : Tensor();
  if (r > 0) l.prefix = Act16({B, H, E});
  comm::ThrowIfError(sp_->SendRecv(halo, r + 1 < P ? r + 1 : -1, l.prefix, r > 0 ? r - 1 : -1));
}

Tensor MambaModel::LastPositions(const Tensor& x, int64_t B, int64_t L, int64_t H) {
  // A column block of x seen as (B, L * E).
  const int64_t E = x.dim(-1);
  Tensor last = Act16({B, H, E});
  Tensor rows = last.Reshape({B, H * E});
  backend_->CopyColumns(x.Reshape({B, L * E}), (L - H) * E, rows);
  return last;
}

void MambaModel::HandOffState(Layer& l, int64_t B) {
  profiling::ScopedRange range("sp_state");
  const int64_t E = config_.d_inner(), N = config_.d_state, S = B * E * N;
  const int r = sp_->rank(), P = sp_->size();
  Backend& be = *backend_;
  // This slice's map h -> decay * h + state, then everyone's, rank after rank. The last slice's
  // state reaches no later slice: it takes only the decay (its backward map needs it), and the
  // state it all-gathers, which no one reads, is zeros.
  Tensor maps = Act({2, B, E, N});
  Tensor decay = maps.View(0, {B, E, N}), state = maps.View(S, {B, E, N});
  ScanInputs in = ScanInputsOf(l);
  in.h0 = Tensor();
  const bool last = r + 1 == P;
  Tensor state_out = last ? Tensor() : state;
  be.SelectiveScanStateMap(in, decay, state_out);
  if (last && !options_.state_chain) be.Zero(state);
  // h0 of slice r: the earlier slices' maps composed in order, from a zero state.
  if (options_.state_chain) {
    l.h0 = ChainMaps(maps, /*forward=*/true, B);
  } else {
    std::vector<int> earlier;
    for (int q = 0; q < r; ++q) earlier.push_back(q);
    l.h0 = ComposeMaps(maps, earlier, B);
  }
  l.decay = decay;
}

Tensor MambaModel::ComposeMaps(const Tensor& maps, const std::vector<int>& order, int64_t B) {
  const int64_t E = config_.d_inner(), N = config_.d_state, S = B * E * N;
  Tensor all = Act({sp_->size(), 2, B, E, N});
  comm::ThrowIfError(sp_->AllGather(maps, all));
  Tensor h;
  for (int q : order) {
    Tensor next = Act({B, E, N});
    backend_->Convert(all.View((2 * q + 1) * S, {B, E, N}), next);
    if (h.defined()) backend_->AddProduct(all.View(2 * q * S, {B, E, N}), h, next);
    h = next;
  }
  return h;
}

Tensor MambaModel::HandBackStateGrad(const Layer& l, const Tensor& dy, int64_t B) {
  profiling::ScopedRange range("sp_state_grad");
  const int64_t E = config_.d_inner(), N = config_.d_state, S = B * E * N;
  const int r = sp_->rank(), P = sp_->size();
  Backend& be = *backend_;
  // This slice's map dh_last -> decay * dh_last + dstate, then everyone's. The first slice's map
  // reaches no earlier slice: not computed (zeros where it is all-gathered, never read).
  Tensor maps = Act({2, B, E, N});
  Tensor decay = maps.View(0, {B, E, N}), dstate = maps.View(S, {B, E, N});
  if (r > 0) {
    be.Convert(l.decay, decay);
    be.SelectiveScanStateGrad(ScanInputsOf(l), dy, dstate);
  } else if (!options_.state_chain) {
    be.Zero(maps);
  }
  // dh_last of slice r: the later slices' maps composed from the last one back, from zero.
  if (options_.state_chain) return ChainMaps(maps, /*forward=*/false, B);
  std::vector<int> later;
  for (int q = P - 1; q > r; --q) later.push_back(q);
  return ComposeMaps(maps, later, B);
}

Tensor MambaModel::ChainMaps(const Tensor& maps, bool forward, int64_t B) {
  const int64_t E = config_.d_inner(), N = config_.d_state, S = B * E * N;
  const int r = sp_->rank(), P = sp_->size();
  const int from = forward ? r - 1 : r + 1, to = forward ? r + 1 : r - 1;
  // The composed state so far; undefined (zero) at the chain's start. The same operations in the
  // same order as ComposeMaps, so the same bits.
  Tensor h;
  if (from >= 0 && from < P) {
    h = Act({B, E, N});
    comm::ThrowIfError(sp_->SendRecv(Tensor(), -1, h, from));
  }
  if (to >= 0 && to < P) {
    Tensor next = Act({B, E, N});
    backend_->Convert(maps.View(S, {B, E, N}), next);
    if (h.defined()) backend_->AddProduct(maps.View(0, {B, E, N}), h, next);
    Tensor none;
    comm::ThrowIfError(sp_->SendRecv(next, to, none, -1));
  }
  return h;
}

void MambaModel::ExchangeHaloGrad(const Tensor& dprefix, Tensor& dx, int64_t B, int64_t L) {
  const int64_t E = config_.d_inner(), H = config_.d_conv - 1;
  if (H == 0) return;
  profiling::ScopedRange range("sp_halo_grad");
  const int r = sp_->rank(), P = sp_->size();
  Tensor from_next = r + 1 < P ? Act16({B, H, E}) : Tensor();
  comm::ThrowIfError(sp_->SendRecv(dprefix, r > 0 ? r - 1 : -1, from_next, r + 1 < P ? r + 1 : -1));
  if (!from_next.defined()) return;
  // The next slice's conv read this slice's last H positions: their gradient adds to dx there.
  Tensor tail = LastPositions(dx, B, L, H).Reshape({B, H * E}), dx_rows = dx.Reshape({B, L * E});
  backend_->Add(from_next.Reshape({B, H * E}), tail);
  backend_->WriteColumns(tail, dx_rows, (L - H) * E);
}

void MambaModel::ForwardLayer(Layer& l, const Tensor& residual_in, const Tensor& hidden_in,
                              int64_t B, int64_t L, bool recompute) {
  profiling::ScopedRange range("layer_fwd");
  const int64_t M = B * L, dm = config_.d_model, E = config_.d_inner(), N = config_.d_state,
                R = config_.dt_rank;
  Backend& be = *backend_;
  l.residual = Act({M, dm});
  l.h = Act16({M, dm});
  l.rstd = Act({M});
  be.AddRmsNormForward(residual_in, hidden_in, l.norm->value, config_.norm_eps, l.residual, l.h,
                       l.rstd);
  // in_proj's two halves (rows [0, E) give x, [E, 2E) give z) as two GEMMs on weight views, so
  // x and z come out contiguous with no (tokens x 2E) buffer to split.
  l.x = Act16({B, L, E});
  l.z = Act16({B, L, E});
  const Tensor& in_w = GemmWeight(*l.in_proj);
  be.LinearForward(l.h, in_w.Slice(0, E), Tensor(), l.x);
  be.LinearForward(l.h, in_w.Slice(E, 2 * E), Tensor(), l.z);
  // A recompute reuses the exchanges' results kept from the forward.
  if (sequence_parallel() && !recompute) ExchangeHalo(l, B, L);
  const size_t index = &l - layers_.data();
  if (carry_ != nullptr) {
    // A chunk of a chunked evaluation: the chunk before's conv tail, and this chunk's for the
    // next (a chunk is at least d_conv - 1 long, but the last).
    l.prefix = carry_->tails[index];
    const int64_t H = config_.d_conv - 1;
    if (H > 0 && L >= H) carry_->tails[index] = LastPositions(l.x, B, L, H);
  }
  l.xa = Act16({B, L, E});
  be.CausalConv1dForward(l.x, l.conv_w->value, l.conv_b->value, l.prefix, /*silu=*/true, l.xa);
  l.dbc = Act16({B, L, R + 2 * N});
  be.LinearForward(l.xa, GemmWeight(*l.x_proj), Tensor(), l.dbc);
  l.dt_raw = Act16({M, R});  // dt_proj's GEMM input; the scan reads Bm and Cm from dbc
  be.CopyColumns(l.dbc, 0, l.dt_raw);
  l.delta = Act16({B, L, E});
  be.LinearForward(l.dt_raw, GemmWeight(*l.dt_w), Tensor(), l.delta);
  l.A = Act({E, N});
  be.NegExp(l.A_log->value, l.A);
  if (sequence_parallel() && !recompute) HandOffState(l, B);
  if (carry_ != nullptr) {
    l.h0 = carry_->states[index];
    l.h_last = Act({B, E, N});
  }
  l.y = Act16({B, L, E});
  be.SelectiveScanForward(ScanInputsOf(l), l.y, l.h_last);
  if (carry_ != nullptr) carry_->states[index] = l.h_last;
  // A recompute for the backward keeps everything and skips the output projection: the backward
  // needs y, not the output.
  if (recompute) return;
  l.out = Act16({M, dm});
  be.LinearForward(l.y, GemmWeight(*l.out_proj), Tensor(), l.out);
  // Keep only what the backward cannot cheaply recompute (see Recompute).
  if (options_.recompute == Recompute::kLayer) {
    const Tensor residual = l.residual, out = l.out, prefix = l.prefix, h0 = l.h0, decay = l.decay;
    ReleaseActivations(l);
    l.residual = residual;  // the layer's input (residual stream after the add)
    l.out = out;            // for the next layer's add (Forward releases it)
    l.prefix = prefix;      // what the exchanges brought, for the recompute
    l.h0 = h0;
    l.decay = decay;
  } else if (options_.recompute == Recompute::kConvAndDelta) {
    l.xa = Tensor();
    l.delta = Tensor();
  }
}

void MambaModel::BackwardLayer(Layer& l, Tensor& d_residual, Tensor& d_residual16, int64_t B,
                               int64_t L) {
  profiling::ScopedRange range("layer_bwd");
  const int64_t M = B * L, dm = config_.d_model, E = config_.d_inner(), N = config_.d_state,
                R = config_.dt_rank;
  Backend& be = *backend_;
  if (!l.h.defined()) {
    // Recompute::kLayer: rerun the layer from its input (its own residual stream, whose add with
    // nothing leaves it unchanged), keeping everything this time.
    const Tensor input = l.residual;
    ForwardLayer(l, Tensor(), input, B, L, /*recompute=*/true);
  } else if (!l.xa.defined()) {
    // Recompute::kConvAndDelta (mamba_ssm's checkpoint_lvl 1): two cheap ops instead of two
    // (tokens x d_inner) activations kept from the forward.
    l.xa = Act16({B, L, E});
    be.CausalConv1dForward(l.x, l.conv_w->value, l.conv_b->value, l.prefix, true, l.xa);
    l.delta = Act16({B, L, E});
    be.LinearForward(l.dt_raw, GemmWeight(*l.dt_w), Tensor(), l.delta);
  }
  Tensor none;
  // out_proj
  Tensor dy = Act16({B, L, E});
  be.LinearBackward(d_residual16.defined() ? d_residual16 : d_residual, l.y,
                    GemmWeight(*l.out_proj), dy, l.out_proj->grad, none);
  // scan
  ScanGrads g;
  g.du = Act16({B, L, E});
  g.ddelta = Act16({B, L, E});
  g.dA = Act({E, N});
  g.dD_skip = Act({E});
  g.dz = Act16({B, L, E});
  g.ddt_bias = Act({E});
  // x_proj's output gradient (ddt_raw | dBm | dCm): the scan writes its dBm and dCm columns.
  Tensor ddbc = Act16({B, L, R + 2 * N});
  g.dbc = ddbc;
  const Tensor dh_last = sequence_parallel() ? HandBackStateGrad(l, dy, B) : Tensor();
  be.SelectiveScanBackward(ScanInputsOf(l), dy, dh_last, g);
  be.AddProduct(g.dA, l.A, l.A_log->grad);  // A = -exp(A_log): dA_log = dA * A
  be.Add(g.dD_skip, l.D->grad);
  be.Add(g.ddt_bias, l.dt_b->grad);
  // dt_proj (no bias here) completes x_proj's output gradient.
  Tensor ddt_raw = Act16({M, R});
  be.LinearBackward(g.ddelta, l.dt_raw, GemmWeight(*l.dt_w), ddt_raw, l.dt_w->grad, none);
  be.WriteColumns(ddt_raw, ddbc, 0);
  // The conv output feeds both the scan (u) and x_proj: its gradient is du + x_proj's, summed by
  // the GEMM itself.
  Tensor& dxa = g.du;
  be.LinearBackward(ddbc, l.xa, GemmWeight(*l.x_proj), dxa, l.x_proj->grad, none,
                    /*accumulate_dx=*/true);
  // conv1d + SiLU
  Tensor dx = Act16({B, L, E});
  Tensor dprefix = l.prefix.defined() ? Act16(l.prefix.shape()) : Tensor();
  be.CausalConv1dBackward(l.x, l.conv_w->value, l.conv_b->value, l.prefix, true, dxa, dx,
                          l.conv_w->grad, l.conv_b->grad, dprefix);
  if (sequence_parallel()) ExchangeHaloGrad(dprefix, dx, B, L);
  // in_proj backward, half by half: weight-gradient views accumulate in place; dh sums both.
  // bf16 in mixed precision, as mamba_ssm's: the GEMMs write and accumulate half the bytes and
  // the norm's backward reads them; the residual stream's gradient stays fp32.
  Tensor dh = Act16({M, dm});
  Tensor in_grad_x = l.in_proj->grad.Slice(0, E), in_grad_z = l.in_proj->grad.Slice(E, 2 * E);
  const Tensor& in_w = GemmWeight(*l.in_proj);
  be.LinearBackward(dx, l.h, in_w.Slice(0, E), dh, in_grad_x, none);
  be.LinearBackward(g.dz, l.h, in_w.Slice(E, 2 * E), dh, in_grad_z, none, /*accumulate_dx=*/true);
  // Fused add + norm: the residual stream's gradient so far joins the norm's.
  Tensor d_res_in = Act({M, dm}), d_res_in16 = ResidualGradCopy({M, dm});
  be.AddRmsNormBackward(dh, d_residual, l.residual, l.norm->value, l.rstd, d_res_in, l.norm->grad,
                        d_res_in16);
  d_residual = d_res_in;
  d_residual16 = d_res_in16;
}

std::vector<size_t> MambaModel::GradientsFinalAt(int64_t layer) const {
  if (layer < 0) return {0};
  std::vector<size_t> indices;
  for (size_t k = 0; k < kParamsPerLayer; ++k) indices.push_back(1 + layer * kParamsPerLayer + k);
  if (layer == config_.n_layer - 1) indices.push_back(1 + config_.n_layer * kParamsPerLayer);
  return indices;
}

MambaModel::Head MambaModel::Forward(const Tensor& inputs) {
  profiling::ScopedRange range("forward");
  MAMBA_CHECK(inputs.rank() == 2);
  const int64_t B = inputs.dim(0), L = inputs.dim(1), M = B * L, dm = config_.d_model;
  Backend& be = *backend_;
  Head h;
  h.ids = be.FromHost(inputs);
  Tensor emb = Act({M, dm});
  be.EmbeddingForward(h.ids, embedding_->value, emb);
  Tensor residual, hidden = emb;
  for (Layer& l : layers_) {
    ForwardLayer(l, residual, hidden, B, L, /*recompute=*/false);
    residual = l.residual;
    hidden = l.out;
    l.out = Tensor();  // the next add consumes it; its backward needs only the sum
  }
  h.res_f = Act({M, dm});
  h.hf = Act16({M, dm});
  h.rstd_f = Act({M});
  be.AddRmsNormForward(residual, hidden, norm_f_->value, config_.norm_eps, h.res_f, h.hf, h.rstd_f);
  return h;
}

Tensor MambaModel::Logits(const Tensor& inputs) {
  Head head = Forward(inputs);
  for (Layer& l : layers_) ReleaseActivations(l);
  Tensor logits = Act({head.hf.dim(0), config_.vocab_size});
  backend_->LinearForward(head.hf, GemmWeight(*embedding_), Tensor(), logits);  // tied lm_head
  return logits;
}

LossStats MambaModel::ForwardBackward(const Tensor& inputs, const Tensor& targets,
                                      int32_t ignore_index, double grad_scale, bool backward) {
  try {
    return RunForwardBackward(inputs, targets, ignore_index, grad_scale, backward);
  } catch (const DeviceOutOfMemory&) {
    // The layers' saved activations would otherwise hold the failed pass's memory, and the
    // loss chunks already counted would join the next pass's statistics.
    for (Layer& l : layers_) ReleaseActivations(l);
    backend_->TakeCrossEntropyStats();
    throw;
  }
}

LossStats MambaModel::ChunkedForwardLoss(const Tensor& inputs, const Tensor& targets,
                                         int32_t ignore_index, int64_t chunk_len) {
  const int64_t B = inputs.dim(0), L = inputs.dim(1);
  Carry carry;
  carry.tails.resize(layers_.size());
  carry.states.resize(layers_.size());
  LossStats total;
  for (int64_t t0 = 0; t0 < L; t0 += chunk_len) {
    const int64_t len = std::min(chunk_len, L - t0);
    Tensor in = Tensor::Empty({B, len}, DType::kI32), tg = Tensor::Empty({B, len}, DType::kI32);
    for (int64_t b = 0; b < B; ++b) {
      std::copy_n(inputs.data<int32_t>() + b * L + t0, len, in.data<int32_t>() + b * len);
      std::copy_n(targets.data<int32_t>() + b * L + t0, len, tg.data<int32_t>() + b * len);
    }
    carry_ = &carry;
    LossStats s;
    try {
      s = RunForwardBackward(in, tg, ignore_index, 0, false);
    } catch (...) {
      carry_ = nullptr;
      throw;
    }
    carry_ = nullptr;
    total.loss_sum += s.loss_sum;
    total.count += s.count;
    total.correct += s.correct;
  }
  return total;
}

LossStats MambaModel::RunForwardBackward(const Tensor& inputs, const Tensor& targets,
                                         int32_t ignore_index, double grad_scale, bool backward) {
  MAMBA_CHECK(inputs.rank() == 2 && targets.shape() == inputs.shape());
  const int64_t B = inputs.dim(0), L = inputs.dim(1), M = B * L, dm = config_.d_model;
  // A long forward-only pass (not already a chunk of one): chunk by chunk, in bounded memory.
  // Under sequence parallelism the slices already spread it over the ranks.
  if (!backward && carry_ == nullptr && !sequence_parallel()) {
    const int64_t rows = options_.eval_chunk_rows > 0 ? options_.eval_chunk_rows : 65536;
    const int64_t chunk_len = std::max<int64_t>(rows / B, std::max<int64_t>(1, config_.d_conv - 1));
    if (L > chunk_len) return ChunkedForwardLoss(inputs, targets, ignore_index, chunk_len);
  }
  Backend& be = *backend_;
  Tensor tgt = be.FromHost(targets);
  Head head = Forward(inputs);
  // The tied lm_head and the loss, a chunk of rows at a time: the full (tokens x vocab) logits
  // never exist. With backward, each chunk's logits are overwritten by their gradient, which goes
  // straight through the lm_head's backward (dhf rows, embedding grad +=, in chunk order).
  const int64_t V = config_.vocab_size;
  // 512 MiB of logits per chunk by default (2^27 fp32 or 2^28 bf16 logits): each chunk's
  // lm_head weight-gradient GEMM reads and writes the whole fp32 embedding gradient, so fewer,
  // larger chunks save that traffic (4 chunks instead of 13 at 16,384 tokens x 50,280 in bf16).
  const int64_t chunk_logits = (int64_t{1} << 29) / int64_t(DTypeSize(act_dtype_));
  const int64_t chunk = options_.loss_chunk_rows > 0 ? options_.loss_chunk_rows
                                                     : std::max<int64_t>(1, chunk_logits / V);
  Tensor dhf = backward ? Act({M, dm}) : Tensor();
  LossStats stats;
  {
    profiling::ScopedRange range("loss");
    Tensor none;
    for (int64_t r0 = 0; r0 < M; r0 += chunk) {
      const int64_t r1 = std::min(M, r0 + chunk);
      const Tensor hf = head.hf.Slice(r0, r1);
      Tensor logits = Act16({r1 - r0, V});
      be.LinearForward(hf, GemmWeight(*embedding_), Tensor(), logits);
      Tensor dlogits = backward ? logits : Tensor();
      // The statistics stay on the device: one wait for all chunks, after the loop.
      be.AccumulateCrossEntropy(logits, tgt.Reshape({M}).Slice(r0, r1), ignore_index, grad_scale,
                                dlogits);
      if (backward) {
        Tensor dhf_rows = dhf.Slice(r0, r1);
        be.LinearBackward(dlogits, hf, GemmWeight(*embedding_), dhf_rows, embedding_->grad, none);
      }
    }
    const kernels::CrossEntropyStats ce = be.TakeCrossEntropyStats();
    stats.loss_sum = ce.loss_sum;
    stats.count = ce.count;
    stats.correct = ce.correct;
  }
  if (!backward) {
    for (Layer& l : layers_) ReleaseActivations(l);
    return stats;
  }

  profiling::ScopedRange range("backward");
  Tensor none;
  const Tensor& ids = head.ids;
  Tensor d_residual = Act({M, dm}), d_residual16 = ResidualGradCopy({M, dm});
  be.AddRmsNormBackward(dhf, none, head.res_f, norm_f_->value, head.rstd_f, d_residual,
                        norm_f_->grad, d_residual16);
  for (int64_t i = config_.n_layer - 1; i >= 0; --i) {
    BackwardLayer(layers_[i], d_residual, d_residual16, B, L);
    ReleaseActivations(layers_[i]);  // its memory serves the remaining layers' gradients
    if (hook_) hook_(i);
  }
  be.EmbeddingBackward(ids, d_residual, embedding_->grad);
  if (hook_) hook_(-1);
  return stats;
}

}  // namespace mamba
