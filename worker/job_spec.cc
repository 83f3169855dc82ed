#include "worker/job_spec.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/util/json_util.h"
#include "profiling/step_model.h"
#include "worker/status_macros.h"

namespace mamba {
namespace {

absl::Status Invalid(const std::string& field, const std::string& rule) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", rule));
}

// Checks lo <= value <= hi for an integer field.
template <typename V>
absl::Status InRange(const std::string& field, V value, V lo, V hi) {
  if (value < lo || value > hi) {
    return Invalid(field, absl::StrCat("must be in [", lo, ", ", hi, "], got ", value));
  }
  return absl::OkStatus();
}

absl::Status CheckRange(const std::string& field, double value, double lo, double hi) {
  if (!(value >= lo && value <= hi)) {  // also rejects NaN
    return Invalid(field, absl::StrCat("must be in [", lo, ", ", hi, "], got ", value));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<v1::JobSpec> ParseJobSpecJson(const std::string& json) {
  v1::JobSpec spec;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = false;
  const auto status = google::protobuf::util::JsonStringToMessage(json, &spec, options);
  if (!status.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("job spec is not a valid JobSpec JSON: ", std::string(status.message())));
  }
  return ResolveJobSpec(std::move(spec));
}

absl::StatusOr<v1::JobSpec> LoadJobSpecFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("job spec file not found: ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  auto spec = ParseJobSpecJson(ss.str());
  if (!spec.ok()) {
    return absl::Status(spec.status().code(), absl::StrCat(path, ": ", spec.status().message()));
  }
  return spec;
}

absl::StatusOr<v1::JobSpec> ResolveJobSpec(v1::JobSpec spec) {
  // Model.
  v1::ModelSpec& m = *spec.mutable_model();
  if (!m.has_d_model()) m.set_d_model(64);
  if (!m.has_n_layer()) m.set_n_layer(2);
  if (!m.has_d_state()) m.set_d_state(16);
  if (!m.has_d_conv()) m.set_d_conv(4);
  if (!m.has_expand()) m.set_expand(2);
  RETURN_IF_ERROR(InRange("model.d_model", m.d_model(), 1, 65536));
  RETURN_IF_ERROR(InRange("model.n_layer", m.n_layer(), 1, 1024));
  RETURN_IF_ERROR(InRange("model.d_state", m.d_state(), 1, 256));
  RETURN_IF_ERROR(InRange("model.d_conv", m.d_conv(), 1, 16));
  RETURN_IF_ERROR(InRange("model.expand", m.expand(), 1, 16));
  if (!m.has_dt_rank())
    m.set_dt_rank(static_cast<int32_t>(ModelConfig::DefaultDtRank(m.d_model())));
  RETURN_IF_ERROR(InRange("model.dt_rank", m.dt_rank(), 1, m.d_model()));
  if (m.has_vocab_size()) RETURN_IF_ERROR(InRange("model.vocab_size", m.vocab_size(), 1, 1 << 24));

  if (spec.data().source_case() == v1::DataSpec::SOURCE_NOT_SET) {
    return Invalid("data",
                   "one source is required: selective_copying, induction_heads, "
                   "text_file or token_file");
  }

  // Optimizer.
  v1::OptimizerSpec& o = *spec.mutable_optimizer();
  if (!o.has_lr()) o.set_lr(1e-3);
  if (!o.has_beta1()) o.set_beta1(0.9);
  if (!o.has_beta2()) o.set_beta2(0.95);
  if (!o.has_eps()) o.set_eps(1e-8);
  if (!o.has_weight_decay()) o.set_weight_decay(0.1);
  if (!o.has_grad_clip()) o.set_grad_clip(1.0);
  if (!o.has_shard_state()) o.set_shard_state(false);
  RETURN_IF_ERROR(CheckRange("optimizer.lr", o.lr(), 0.0, 10.0));
  RETURN_IF_ERROR(CheckRange("optimizer.beta1", o.beta1(), 0.0, 0.999999));
  RETURN_IF_ERROR(CheckRange("optimizer.beta2", o.beta2(), 0.0, 0.999999));
  RETURN_IF_ERROR(CheckRange("optimizer.eps", o.eps(), 1e-30, 1.0));
  RETURN_IF_ERROR(CheckRange("optimizer.weight_decay", o.weight_decay(), 0.0, 10.0));
  RETURN_IF_ERROR(CheckRange("optimizer.grad_clip", o.grad_clip(), 0.0, 1e9));

  // Schedule and run length.
  if (!spec.has_steps()) spec.set_steps(1000);
  RETURN_IF_ERROR(InRange<int64_t>("steps", spec.steps(), 1, int64_t{1} << 40));
  v1::ScheduleSpec& s = *spec.mutable_schedule();
  if (s.kind() == v1::ScheduleSpec::KIND_UNSPECIFIED) s.set_kind(v1::ScheduleSpec::COSINE);
  if (!s.has_warmup_steps()) s.set_warmup_steps(0);
  if (!s.has_min_lr_ratio()) s.set_min_lr_ratio(0.1);
  RETURN_IF_ERROR(InRange<int64_t>("schedule.warmup_steps", s.warmup_steps(), 0, spec.steps()));
  RETURN_IF_ERROR(CheckRange("schedule.min_lr_ratio", s.min_lr_ratio(), 0.0, 1.0));

  if (!spec.has_batch_size()) spec.set_batch_size(8);
  RETURN_IF_ERROR(InRange("batch_size", spec.batch_size(), 1, 1 << 20));
  if (!spec.has_seed()) spec.set_seed(1234);
  if (!spec.has_log_every()) spec.set_log_every(10);
  if (!spec.has_priority()) spec.set_priority(0);
  if (!spec.has_max_restarts()) spec.set_max_restarts(3);
  RETURN_IF_ERROR(InRange("priority", spec.priority(), -1000000, 1000000));
  RETURN_IF_ERROR(InRange("max_restarts", spec.max_restarts(), 0, 1000));
  if (spec.has_profile()) {
    v1::ProfileSpec& pr = *spec.mutable_profile();
    if (!pr.has_steps()) pr.set_steps(static_cast<int32_t>(std::min<int64_t>(3, spec.steps())));
    RETURN_IF_ERROR(InRange<int64_t>("profile.steps", pr.steps(), 1, spec.steps()));
    if (!pr.has_counter_steps()) {
      pr.set_counter_steps(spec.steps() > pr.steps() ? 1 : 0);
    }
    RETURN_IF_ERROR(InRange<int64_t>("profile.counter_steps", pr.counter_steps(), 0,
                                     spec.steps() - pr.steps()));
    if (pr.kernels().empty()) {
      pr.add_kernels("selective_scan_fwd");
      pr.add_kernels("selective_scan_bwd");
    }
    for (int i = 0; i < pr.kernels_size(); ++i) {
      const std::string& k = pr.kernels(i);
      const auto& ops = profiling::OpNames();
      if (k != "*" && std::find(ops.begin(), ops.end(), k) == ops.end()) {
        return absl::InvalidArgumentError(absl::StrCat("profile.kernels[", i, "]: \"", k,
                                                       "\" is not an op (one of ",
                                                       absl::StrJoin(ops, ", "), ", or \"*\")"));
      }
    }
  }
  RETURN_IF_ERROR(InRange<int64_t>("log_every", spec.log_every(), 1, int64_t{1} << 40));

  // Evaluation.
  v1::EvalSpec& e = *spec.mutable_eval();
  if (!e.has_every_steps()) e.set_every_steps(0);
  if (!e.has_batches()) e.set_batches(4);
  RETURN_IF_ERROR(InRange<int64_t>("eval.every_steps", e.every_steps(), 0, int64_t{1} << 40));
  RETURN_IF_ERROR(InRange("eval.batches", e.batches(), 0, 1 << 20));
  for (int i = 0; i < e.seq_lens_size(); ++i) {
    RETURN_IF_ERROR(InRange(absl::StrCat("eval.seq_lens[", i, "]"), e.seq_lens(i), 1, 1 << 24));
  }

  // Parallelism, backend, precision.
  // dp stays unset when absent: it defaults to the number of ranks / sp (ResolveLayout).
  v1::ParallelSpec& p = *spec.mutable_parallel();
  if (!p.has_sp()) p.set_sp(1);
  if (!p.has_grad_bucket_mb()) p.set_grad_bucket_mb(25);
  RETURN_IF_ERROR(CheckRange("parallel.grad_bucket_mb", p.grad_bucket_mb(), 0.0, 65536.0));
  if (p.has_dp()) RETURN_IF_ERROR(InRange("parallel.dp", p.dp(), 1, 65536));
  RETURN_IF_ERROR(InRange("parallel.sp", p.sp(), 1, 65536));
  if (p.has_dp() && spec.batch_size() % p.dp() != 0) {
    return Invalid("batch_size", absl::StrCat("must be a multiple of parallel.dp (", p.dp(),
                                              "), got ", spec.batch_size()));
  }
  if (spec.backend().empty()) spec.set_backend("cpu");
  if (spec.backend() != "cpu" && spec.backend() != "cuda") {
    return Invalid("backend",
                   absl::StrCat("must be \"cpu\" or \"cuda\", got \"", spec.backend(), "\""));
  }
  if (spec.precision().empty()) spec.set_precision("fp32");
  if (spec.precision() != "fp32" && spec.precision() != "bf16") {
    return Invalid("precision",
                   absl::StrCat("must be \"fp32\" or \"bf16\", got \"", spec.precision(), "\""));
  }
  if (spec.backend() == "cpu" && spec.precision() != "fp32") {
    return Invalid("precision", "the cpu backend trains in fp32 only");
  }

  // Checkpoints.
  v1::CheckpointSpec& c = *spec.mutable_checkpoint();
  if (!c.has_every_steps()) c.set_every_steps(0);
  if (!c.has_keep_last()) c.set_keep_last(3);
  if (c.dtype().empty()) c.set_dtype("fp32");
  RETURN_IF_ERROR(InRange<int64_t>("checkpoint.every_steps", c.every_steps(), 0, int64_t{1} << 40));
  RETURN_IF_ERROR(InRange("checkpoint.keep_last", c.keep_last(), 0, 1 << 20));
  if (c.dtype() != "fp32" && c.dtype() != "bf16") {
    return Invalid("checkpoint.dtype",
                   absl::StrCat("must be \"fp32\" or \"bf16\", got \"", c.dtype(), "\""));
  }
  if (c.every_steps() > 0 && c.dir().empty()) {
    return Invalid("checkpoint.dir", "required when checkpoint.every_steps is set");
  }
  if (!c.resume_from().empty() && !c.init_from().empty()) {
    return Invalid("checkpoint.init_from",
                   "cannot be combined with checkpoint.resume_from (a resumed run has weights)");
  }
  return spec;
}

absl::StatusOr<comm::Layout> ResolveLayout(const v1::JobSpec& spec, int world_size,
                                           int64_t train_len) {
  const v1::ParallelSpec& p = spec.parallel();
  comm::Layout layout;
  layout.sp = p.has_sp() ? p.sp() : 1;
  if (p.has_dp()) {
    layout.dp = p.dp();
  } else if (world_size % layout.sp != 0) {
    return Invalid("parallel.sp", absl::StrCat("must divide the number of ranks (", world_size,
                                               ") when parallel.dp is unset, got ", layout.sp));
  } else {
    layout.dp = world_size / layout.sp;
  }
  if (layout.world() != world_size) {
    return Invalid("parallel",
                   absl::StrCat("dp x sp (", layout.dp, " x ", layout.sp, " = ", layout.world(),
                                ") must equal the number of ranks (", world_size, ")"));
  }
  if (spec.batch_size() % layout.dp != 0) {
    return Invalid("batch_size", absl::StrCat("must be a multiple of parallel.dp (", layout.dp,
                                              "), got ", spec.batch_size()));
  }
  const int64_t halo = spec.model().d_conv() - 1;
  const auto check_len = [&](const std::string& field, int64_t len) -> absl::Status {
    if (len % layout.sp != 0) {
      return Invalid(field, absl::StrCat("the length ", len, " must be divisible by parallel.sp (",
                                         layout.sp, ")"));
    }
    if (layout.sp > 1 && len / layout.sp < halo) {
      return Invalid(
          field,
          absl::StrCat("each rank's slice (", len, " / ", layout.sp, " = ", len / layout.sp,
                       " positions) must hold at least model.d_conv - 1 (", halo, ") positions"));
    }
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(check_len("parallel.sp", train_len));
  const v1::EvalSpec& e = spec.eval();
  if (e.batches() > 0) {
    for (int i = 0; i < e.seq_lens_size(); ++i) {
      RETURN_IF_ERROR(check_len(absl::StrCat("eval.seq_lens[", i, "]"), e.seq_lens(i)));
    }
  }
  return layout;
}

ModelConfig ModelConfigFromSpec(const v1::JobSpec& spec, int64_t dataset_vocab) {
  const v1::ModelSpec& m = spec.model();
  ModelConfig c;
  c.d_model = m.d_model();
  c.n_layer = m.n_layer();
  c.d_state = m.d_state();
  c.d_conv = m.d_conv();
  c.expand = m.expand();
  c.dt_rank = m.dt_rank();
  c.vocab_size = ModelConfig::PadVocab(m.has_vocab_size() ? m.vocab_size() : dataset_vocab);
  return c;
}

OptimizerConfig OptimizerConfigFromSpec(const v1::JobSpec& spec) {
  OptimizerConfig c;
  const v1::OptimizerSpec& o = spec.optimizer();
  c.lr = o.lr();
  c.beta1 = o.beta1();
  c.beta2 = o.beta2();
  c.eps = o.eps();
  c.weight_decay = o.weight_decay();
  c.grad_clip = o.grad_clip();
  c.warmup_steps = spec.schedule().warmup_steps();
  c.total_steps = spec.steps();
  c.cosine = spec.schedule().kind() == v1::ScheduleSpec::COSINE;
  c.min_lr_ratio = spec.schedule().min_lr_ratio();
  return c;
}

ModelOptions ModelOptionsFromSpec(const v1::JobSpec& spec) {
  ModelOptions o;
  o.state_chain = spec.parallel().state_exchange() == v1::ParallelSpec::CHAIN;
  switch (spec.memory().recompute()) {
    case v1::MemorySpec::NONE:
      o.recompute = Recompute::kNone;
      break;
    case v1::MemorySpec::LAYER:
      o.recompute = Recompute::kLayer;
      break;
    default:
      o.recompute = Recompute::kConvAndDelta;
      break;
  }
  return o;
}

}  // namespace mamba
