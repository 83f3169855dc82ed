#include "worker/trainer.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <ostream>
#include <random>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "checkpoints/checkpoint.h"
#include "checkpoints/model_io.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/message_differencer.h"
#include "nlohmann/json.hpp"
#include "profiling/nvtx.h"
#include "profiling/report.h"
#include "profiling/step_model.h"
#include "worker/device_peaks.h"
#include "worker/job_spec.h"
#include "worker/status_macros.h"

namespace mamba {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Host int32 tensors (count, seq_len) of a batch's inputs and targets.
std::pair<Tensor, Tensor> BatchTensors(const data::Batch& b) {
  Tensor inputs = Tensor::Empty({b.count, b.seq_len}, DType::kI32);
  Tensor targets = Tensor::Empty({b.count, b.seq_len}, DType::kI32);
  std::copy(b.inputs.begin(), b.inputs.end(), inputs.data<int32_t>());
  std::copy(b.targets.begin(), b.targets.end(), targets.data<int32_t>());
  return {inputs, targets};
}

// The first field that must match for a resumed run to continue the saved one exactly, or "".
// The rank layout may change: any layout trains the same steps on the same data.
std::string FirstDifference(const v1::JobSpec& saved, const v1::JobSpec& now) {
  using google::protobuf::util::MessageDifferencer;
  if (!MessageDifferencer::Equals(saved.model(), now.model())) return "model";
  if (!MessageDifferencer::Equals(saved.data(), now.data())) return "data";
  // Sharding the optimizer's state changes where it is kept, not the update.
  v1::OptimizerSpec saved_opt = saved.optimizer(), now_opt = now.optimizer();
  saved_opt.clear_shard_state();
  now_opt.clear_shard_state();
  if (!MessageDifferencer::Equals(saved_opt, now_opt)) return "optimizer";
  if (!MessageDifferencer::Equals(saved.schedule(), now.schedule())) return "schedule";
  if (saved.seed() != now.seed()) return "seed";
  if (saved.batch_size() != now.batch_size()) return "batch_size";
  if (saved.precision() != now.precision()) return "precision";
  return "";
}

int64_t CountTargets(const data::Batch& b) {
  int64_t n = 0;
  for (int32_t t : b.targets) n += (t != data::kIgnoreIndex);
  return n;
}

// Discards what is written to it: the log of ranks other than 0.
class NullBuffer : public std::streambuf {
 protected:
  int overflow(int c) override { return c; }
};

// The backend the spec names, or why it cannot be had here. CUDA ranks take the GPU of their
// rank on the node.
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const v1::JobSpec& spec, int local_rank) {
  if (spec.backend() == "cpu") return MakeCpuBackend();
  if (spec.backend() != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("backend: must be \"cpu\" or \"cuda\", got \"", spec.backend(), "\""));
  }
#ifdef MAMBA_HAS_CUDA
  if (CudaDeviceCount() == 0) {
    return absl::FailedPreconditionError(
        "backend: \"cuda\" needs a CUDA device and none is visible (no GPU, no driver, or "
        "CUDA_VISIBLE_DEVICES hides them); use \"cpu\"");
  }
  // job_spec.cc admits "fp32" and "bf16" only. bf16 is mamba_ssm's AMP for the linears: bf16
  // GEMM operands, fp32 accumulation, fp32 master weights, scan state and residual stream.
  CudaBackendOptions options;
  options.device = local_rank % CudaDeviceCount();
  if (spec.precision() == "bf16") {
    options.gemm_precision = GemmPrecision::kBf16;
  } else if (spec.precision() != "fp32") {
    return absl::InvalidArgumentError(
        absl::StrCat("precision: must be \"fp32\" or \"bf16\", got \"", spec.precision(), "\""));
  }
  return MakeCudaBackend(options);
#else
  (void)local_rank;
  return absl::FailedPreconditionError(
      "backend: \"cuda\" is not available in this build (CUDA was not found when it was "
      "configured); use \"cpu\"");
#endif
}

}  // namespace

std::string FormatDuration(double seconds) {
  const int64_t s = static_cast<int64_t>(std::llround(std::max(0.0, seconds)));
  if (s >= 3600) return absl::StrFormat("%dh%02dm", s / 3600, (s % 3600) / 60);
  if (s >= 60) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  return absl::StrFormat("%ds", s);
}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const v1::JobSpec& spec,
                                                         const RankOptions& rank) {
  std::unique_ptr<Trainer> t(new Trainer());
  t->spec_ = spec;
  const comm::MpiRuntime& mpi = rank.solo ? comm::MpiRuntime::Solo() : comm::MpiRuntime::Get();
  auto dataset = data::MakeDataset(spec.data(), spec.seed());
  if (!dataset.ok()) return dataset.status();
  t->dataset_ = std::move(*dataset);
  ASSIGN_OR_RETURN(const comm::Layout layout,
                   ResolveLayout(spec, mpi.world_size(), t->dataset_->seq_len()));
  auto backend = MakeBackend(spec, mpi.local_rank());
  if (!backend.ok()) return backend.status();
  if (spec.model().has_vocab_size() && spec.model().vocab_size() < t->dataset_->vocab_size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("model.vocab_size: must be at least the dataset's vocabulary (",
                     t->dataset_->vocab_size(), "), got ", spec.model().vocab_size()));
  }
  t->backend_ = std::move(*backend);
  ASSIGN_OR_RETURN(t->groups_, comm::MakeProcessGroups(mpi, layout, rank.transport,
                                                       t->backend_.get(), rank.comm_timeout));
  t->model_ =
      std::make_unique<MambaModel>(ModelConfigFromSpec(spec, t->dataset_->vocab_size()),
                                   t->backend_.get(), DType::kF32, ModelOptionsFromSpec(spec));
  t->model_->SetSequenceParallel(t->groups_.sp.get());
  t->observer_ = rank.observer;
  t->model_->Initialize(spec.seed());
  t->optimizer_ = std::make_unique<AdamWOptimizer>(
      OptimizerConfigFromSpec(spec), t->backend_.get(), &t->model_->parameter_store(),
      spec.optimizer().shard_state() ? t->groups_.world.get() : nullptr);
  t->sync_ = std::make_unique<GradientSync>(
      t->model_.get(), t->groups_.world.get(), spec.optimizer().shard_state(),
      static_cast<size_t>(spec.parallel().grad_bucket_mb() * (1 << 20)));
  const v1::CheckpointSpec& c = spec.checkpoint();
  if (!c.init_from().empty()) {
    absl::Status s = ckpt::ImportModel(c.init_from(), *t->model_);
    if (!s.ok()) return absl::Status(s.code(), absl::StrCat("checkpoint.init_from: ", s.message()));
  }
  if (!c.resume_from().empty()) {
    absl::Status s = t->Resume(c.resume_from());
    if (!s.ok()) return absl::Status(s.code(), absl::StrCat("resume: ", s.message()));
  }
  return t;
}

absl::Status Trainer::Resume(const std::string& path) {
  auto dir = ckpt::ResolveCheckpointDir(path);
  if (!dir.ok()) return dir.status();
  optimizer_->MaterializeMoments(/*gather=*/false);  // sharded: the whole moments to load into
  auto state = ckpt::LoadCheckpoint(*dir, *model_, *optimizer_, *backend_);
  optimizer_->KeepShard();
  if (!state.ok()) return state.status();
  v1::JobSpec saved;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;  // a newer worker's spec may have more fields
  if (!google::protobuf::util::JsonStringToMessage(state->job_spec.dump(), &saved, options).ok()) {
    return absl::DataLossError(
        absl::StrCat(*dir, "/trainer_state.json: job_spec is not a JobSpec"));
  }
  if (const std::string field = FirstDifference(saved, spec_); !field.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        *dir, ": the job's ", field, " differs from the checkpoint's (", *dir,
        "/trainer_state.json); a resumed run must train the same model on the same data"));
  }
  start_step_ = state->step;
  loss_history_ = state->losses;
  resumed_from_ = *dir;
  return absl::OkStatus();
}

absl::StatusOr<std::string> Trainer::SaveCheckpoint(int64_t step,
                                                    const std::vector<double>& losses) {
  ckpt::TrainerState state;
  state.step = step;
  state.next_lr = LearningRate(OptimizerConfigFromSpec(spec_), step);
  state.seed = spec_.seed();
  state.losses = losses;
  std::string spec_json;
  if (!google::protobuf::util::MessageToJsonString(spec_, &spec_json).ok()) {
    return absl::InternalError("cannot convert the job spec to JSON");
  }
  state.job_spec = nlohmann::json::parse(spec_json);
  ckpt::SaveOptions options;
  options.bf16 = spec_.checkpoint().dtype() == "bf16";
  options.keep_last = spec_.checkpoint().keep_last();
  options.protect = resumed_from_;
  return ckpt::SaveCheckpoint(spec_.checkpoint().dir(), state, *model_, *optimizer_, *backend_,
                              options);
}

absl::StatusOr<data::Batch> Trainer::LocalBatch(data::Split split, int64_t index,
                                                int64_t seq_len) const {
  const comm::Layout& layout = groups_.layout;
  const int64_t count = spec_.batch_size() / layout.dp;
  ASSIGN_OR_RETURN(data::Batch batch,
                   dataset_->GetBatch(split, index, groups_.dp_rank * count, count, seq_len));
  if (layout.sp == 1) return batch;
  const int64_t len = seq_len / layout.sp, first = groups_.sp_rank * len;
  data::Batch slice;
  slice.count = count;
  slice.seq_len = len;
  for (int64_t b = 0; b < count; ++b) {
    const auto from = [&](const std::vector<int32_t>& v) {
      return v.begin() + b * seq_len + first;
    };
    slice.inputs.insert(slice.inputs.end(), from(batch.inputs), from(batch.inputs) + len);
    slice.targets.insert(slice.targets.end(), from(batch.targets), from(batch.targets) + len);
  }
  return slice;
}

absl::Status Trainer::WriteProfile(std::ostream& log) {
  const comm::Layout& layout = groups_.layout;
  const int64_t B = spec_.batch_size() / layout.dp, L = dataset_->seq_len() / layout.sp;
  profiling::StepShape shape;
  shape.batch = B;
  shape.len = L;
  shape.act_bytes = spec_.precision() == "bf16" ? 2 : 4;
  shape.recompute_layer = spec_.memory().recompute() == v1::MemorySpec::LAYER;
  shape.parameters = model_->num_parameters();
  profiling::ProfiledRun run;
  run.model = profiling::StepModel(model_->config(), shape);
  run.op_ms = profile_.op_ms;
  run.steps = profile_.steps;
  run.seconds = profile_.seconds;
  run.tokens_per_step = double(spec_.batch_size() * dataset_->seq_len());
  if (spec_.profile().counter_steps() == 0) {
    run.counters_note = "not collected (profile.counter_steps is 0)";
  } else if (!profile_.counters_note.empty()) {
    run.counters_note = "not collected: " + profile_.counters_note;
  } else {
    run.counters_note = absl::StrFormat(
        "CUPTI range profiler over %d step(s) after the timed ones, scaled to the %d timed "
        "step(s); shared bytes are wavefronts x 128 B",
        profile_.counted_steps, profile_.steps);
    for (const auto& [op, k] : profile_.counters) {
      run.measured_per_step[op] = profiling::MeasuredOf(k, 1.0 / double(profile_.counted_steps));
    }
  }
  const profiling::Report report = profiling::AssembleReport(run, MeasurePeaks(*backend_));
  const std::string dir =
      spec_.checkpoint().dir().empty()
          ? "profile-" + (spec_.name().empty() ? std::string("job") : spec_.name())
          : spec_.checkpoint().dir() + "/profile";
  RETURN_IF_ERROR(profiling::WriteReport(report, dir));
  log << absl::StrFormat("profile: %s/profile.md (%d steps timed, %d counted)\n", dir,
                         profile_.steps, profile_.counted_steps);
  return absl::OkStatus();
}

absl::StatusOr<LossStats> Trainer::SumOverRanks(const LossStats& local) {
  Tensor t = Tensor::Empty({3}, DType::kF64);
  double* v = t.data<double>();
  v[0] = local.loss_sum;
  v[1] = double(local.count);
  v[2] = double(local.correct);
  RETURN_IF_ERROR(groups_.world->AllReduceSum(t));
  LossStats total;
  total.loss_sum = v[0];
  total.count = static_cast<int64_t>(v[1]);
  total.correct = static_cast<int64_t>(v[2]);
  return total;
}

absl::StatusOr<LossStats> Trainer::EvaluateBatch(int64_t seq_len, int32_t index) {
  activity_ = absl::StrCat("evaluation at length ", seq_len);
  ASSIGN_OR_RETURN(data::Batch batch, LocalBatch(data::Split::kValidation, index, seq_len));
  auto [inputs, targets] = BatchTensors(batch);
  return SumOverRanks(model_->ForwardBackward(inputs, targets, data::kIgnoreIndex, 0, false));
}

absl::StatusOr<EvalResult> Trainer::Evaluate(int64_t seq_len) {
  EvalResult r;
  r.seq_len = seq_len;
  LossStats total;
  for (int32_t i = 0; i < spec_.eval().batches(); ++i) {
    auto s = EvaluateBatch(seq_len, i);
    if (!s.ok()) return s.status();
    total.loss_sum += s->loss_sum;
    total.count += s->count;
    total.correct += s->correct;
  }
  r.loss = total.mean_loss();
  r.accuracy = total.accuracy();
  r.tokens = total.count;
  return r;
}

absl::StatusOr<TrainSummary> Trainer::Run(std::ostream& log) {
  NullBuffer null_buffer;
  std::ostream null_log(&null_buffer);
  try {
    return RunSteps(groups_.is_root() ? log : null_log);
  } catch (const comm::CommunicationError& e) {
    return e.status();
  } catch (const DeviceOutOfMemory& e) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "batch_size: %s of batch %d x %d tokens does not fit in device memory (%s); use a smaller "
        "batch_size, or memory.recompute: LAYER",
        activity_, spec_.batch_size(), dataset_->seq_len(), e.what()));
  }
}

absl::Status Trainer::ReserveWorkspace(const std::vector<int64_t>& eval_lens, std::ostream& log) {
  ASSIGN_OR_RETURN(data::Batch batch,
                   LocalBatch(data::Split::kTrain, start_step_, dataset_->seq_len()));
  auto [inputs, targets] = BatchTensors(batch);
  {
    profiling::ScopedRange range("workspace_probe");
    activity_ = "the probe step";
    model_->ZeroGrad();
    model_->ForwardBackward(inputs, targets, data::kIgnoreIndex, 1.0, true);
    optimizer_->GradNorm();  // the optimizer's reduction scratch
    model_->ZeroGrad();
    if (spec_.eval().batches() > 0) {
      for (int64_t len : eval_lens) {
        if (auto s = EvaluateBatch(len, 0); !s.ok()) return s.status();
      }
    }
  }
  const size_t held = backend_->MemoryStats().in_use;
  activity_ = "reserving the workspace";
  const size_t workspace = backend_->ReserveWorkspace();
  log << absl::StrFormat(
      "memory: %.2f GiB workspace in one allocation (sized by probe passes); %.2f GiB of "
      "parameters, gradients and optimizer state\n",
      double(workspace) / (1 << 30), double(held) / (1 << 30));
  return absl::OkStatus();
}

absl::StatusOr<TrainSummary> Trainer::RunSteps(std::ostream& log) {
  const int64_t steps = spec_.steps(), B = spec_.batch_size(), L = dataset_->seq_len();
  const bool acc = dataset_->has_accuracy();
  TrainSummary summary;
  summary.losses = loss_history_;
  log << absl::StrFormat(
      "job %s: %s, model d_model %d x %d layers (d_state %d, vocab %d, %d parameters), "
      "batch %d x %d tokens, %d steps, backend %s\n",
      spec_.name().empty() ? "(unnamed)" : spec_.name(), dataset_->name(), model_->config().d_model,
      model_->config().n_layer, model_->config().d_state, model_->config().vocab_size,
      model_->num_parameters(), B, L, steps, backend_->name());
  const comm::Layout& layout = groups_.layout;
  if (layout.world() > 1) {
    log << absl::StrFormat(
        "ranks: %d (dp %d x sp %d over %s): each trains %d sequences x %d positions a step\n",
        layout.world(), layout.dp, layout.sp, groups_.transport, B / layout.dp, L / layout.sp);
  }
  std::vector<int64_t> eval_lens(spec_.eval().seq_lens().begin(), spec_.eval().seq_lens().end());
  if (eval_lens.empty()) eval_lens.push_back(L);
  if (!resumed_from_.empty()) {
    log << absl::StrFormat("resumed from %s at step %d\n", resumed_from_, start_step_);
  }
  if (optimizer_->shard_group() != nullptr) {
    log << absl::StrFormat(
        "optimizer state: %.1f MiB on each rank (AdamW moments sharded over %d ranks)\n",
        double(optimizer_->state_bytes()) / (1 << 20), layout.world());
  }

  const bool device = backend_->device() != Device::kCPU;
  if (device && start_step_ < steps) {
    if (absl::Status st = ReserveWorkspace(eval_lens, log); !st.ok()) return st;
  }
  const DeviceMemoryStats before = backend_->MemoryStats();
  backend_->ResetPeakMemory();

  const auto t0 = Clock::now();
  auto window_start = t0;
  LossStats window;
  int64_t window_steps = 0;
  // Counting hardware counters (set-up, replayed kernels) is left out of the speeds shown.
  double window_counted_seconds = 0;
  int64_t window_counted_steps = 0;
  // The next step's batch is drawn on another thread while this one trains: batches are pure
  // functions of the step, so drawing them ahead changes nothing but the wait.
  const auto draw = [this, L](int64_t step) -> absl::StatusOr<PreparedBatch> {
    ASSIGN_OR_RETURN(data::Batch batch, LocalBatch(data::Split::kTrain, step, L));
    PreparedBatch p;
    p.targets_counted = CountTargets(batch);
    std::tie(p.inputs, p.targets) = BatchTensors(batch);
    return p;
  };
  std::future<absl::StatusOr<PreparedBatch>> next;
  if (start_step_ < steps) next = std::async(std::launch::async, draw, start_step_);
  for (int64_t step = start_step_; step < steps; ++step) {
    // Profiling: profile.steps steps with every op timed, then profile.counter_steps steps with
    // the chosen ops' hardware counters collected, at the end of the run.
    const int64_t counted_from = steps - spec_.profile().counter_steps();
    const bool profiled = spec_.has_profile() && step >= counted_from - spec_.profile().steps() &&
                          step < counted_from;
    const bool counters_on = spec_.has_profile() && step >= counted_from;
    if (profiled && profile_.steps == 0) backend_->TakeOpTimes();  // none from before
    backend_->EnableOpTiming(profiled);
    if (counters_on && step == counted_from) {
      const auto setup_start = Clock::now();  // set-up counts as counting, not as training
      const auto& k = spec_.profile().kernels();
      // Kernel replay serialises the context's kernels, the communication's among them: with
      // peers waiting on each other inside a step, a rank's replays could stall the job.
      profile_.counters_note =
          groups_.layout.world() > 1
              ? "hardware counters are collected on one-rank jobs only (kernel replay would "
                "serialise with the ranks' communication)"
              : backend_->EnableOpCounters({k.begin(), k.end()});
      profile_.counted_seconds += SecondsSince(setup_start);
    }
    const auto step_start = Clock::now();
    ASSIGN_OR_RETURN(PreparedBatch batch, next.get());
    if (step + 1 < steps) next = std::async(std::launch::async, draw, step + 1);
    // The loss is the mean over every target of the global batch: the count is summed first.
    LossStats local_count;
    local_count.count = batch.targets_counted;
    ASSIGN_OR_RETURN(const LossStats global_count, SumOverRanks(local_count));
    const int64_t counted = global_count.count;
    if (counted == 0) {
      return absl::FailedPreconditionError(absl::StrCat("step ", step, ": batch has no targets"));
    }
    const Tensor& inputs = batch.inputs;
    const Tensor& targets = batch.targets;
    activity_ = absl::StrCat("step ", step + 1);
    profiling::ScopedRange step_range("step");
    model_->ZeroGrad();
    sync_->Begin();
    const LossStats local =
        model_->ForwardBackward(inputs, targets, data::kIgnoreIndex, 1.0 / counted, true);
    RETURN_IF_ERROR(sync_->Finish());
    ASSIGN_OR_RETURN(const LossStats s, SumOverRanks(local));
    if (!std::isfinite(s.loss_sum)) {
      return absl::InternalError(
          absl::StrCat("step ", step, ": loss is not finite (", s.loss_sum, "); stopping"));
    }
    AdamWOptimizer::StepInfo info;
    {
      profiling::ScopedRange range("optimizer");
      info = optimizer_->Step();
    }
    if (!info.applied) {
      // Nothing was updated: the parameters and the last checkpoint are the last good state.
      return absl::InternalError(absl::StrCat("step ", step, ": gradient norm is not finite (",
                                              info.grad_norm, "); stopping before the update"));
    }
    if (profiled) {
      for (const auto& [op, ms] : backend_->TakeOpTimes()) profile_.op_ms[op] += ms;
      profile_.seconds += SecondsSince(step_start);
      ++profile_.steps;
    }
    if (counters_on && profile_.counters_note.empty()) {  // counting: this step is slower
      std::string why;
      for (const auto& [op, k] : backend_->TakeOpCounters(&why)) profile_.counters[op] += k;
      profile_.counters_note = why;
      ++profile_.counted_steps;
      ++window_counted_steps;
      profile_.counted_seconds += SecondsSince(step_start);
    }
    summary.losses.push_back(s.mean_loss());
    window.loss_sum += s.loss_sum;
    window.count += s.count;
    window.correct += s.correct;
    ++window_steps;

    const bool last = step + 1 == steps;
    if ((step + 1) % spec_.log_every() == 0 || last) {
      const double elapsed = SecondsSince(t0);
      const int64_t timed_steps = window_steps - window_counted_steps;
      const double window_tps =
          timed_steps > 0 ? double(timed_steps * B * L) /
                                std::max(SecondsSince(window_start) -
                                             (profile_.counted_seconds - window_counted_seconds),
                                         1e-9)
                          : double(window_steps * B * L) / SecondsSince(window_start);
      const double eta = elapsed / double(step + 1 - start_step_) * double(steps - step - 1);
      if (summary.first_loss == 0) summary.first_loss = window.mean_loss();
      summary.final_loss = window.mean_loss();
      summary.final_accuracy = window.accuracy();
      log << absl::StrFormat("step %*d/%d | loss %.4f", int(std::to_string(steps).size()), step + 1,
                             steps, window.mean_loss());
      if (acc) log << absl::StrFormat(" | acc %5.1f%%", 100.0 * window.accuracy());
      log << absl::StrFormat(" | lr %.2e | grad %.3f | %.0f tok/s | ETA %s\n", info.lr,
                             info.grad_norm, window_tps, FormatDuration(eta));
      log.flush();
      window = LossStats();
      window_steps = 0;
      window_counted_steps = 0;
      window_counted_seconds = profile_.counted_seconds;
      window_start = Clock::now();
    }
    const int64_t every = spec_.eval().every_steps();
    if (every > 0 && (step + 1) % every == 0 && !last) {
      for (int64_t len : eval_lens) {
        auto r = Evaluate(len);
        if (!r.ok()) return r.status();
        log << absl::StrFormat("  eval @ step %d, length %d: loss %.4f", step + 1, len, r->loss);
        if (acc) log << absl::StrFormat(", acc %.1f%%", 100.0 * r->accuracy);
        log << "\n";
      }
    }
    // An observer may stop the run here; rank 0 decides for every rank.
    bool stop = false;
    if (observer_ != nullptr) {
      observer_->OnStep(step + 1, s.mean_loss(), double(B * L) / SecondsSince(step_start));
      Tensor flag = Tensor::Zeros({1}, DType::kF64);
      flag.data<double>()[0] = observer_->ShouldStop() ? 1 : 0;
      RETURN_IF_ERROR(groups_.world->Broadcast(flag, 0));
      stop = flag.data<double>()[0] != 0 && !last;
    }
    const v1::CheckpointSpec& c = spec_.checkpoint();
    if (!c.dir().empty() &&
        (last || stop || (c.every_steps() > 0 && (step + 1) % c.every_steps() == 0))) {
      // Rank 0 writes (the parameters are the same everywhere); the others learn whether it could.
      absl::StatusOr<std::string> dir = std::string();
      optimizer_->MaterializeMoments(/*gather=*/true);  // sharded: every rank's chunk, whole
      if (groups_.is_root()) dir = SaveCheckpoint(step + 1, summary.losses);
      optimizer_->KeepShard();
      Tensor failed = Tensor::Zeros({1}, DType::kF64);
      failed.data<double>()[0] = dir.ok() ? 0 : 1;
      RETURN_IF_ERROR(groups_.world->AllReduceSum(failed));
      if (!dir.ok()) return dir.status();
      if (failed.data<double>()[0] != 0) {
        return absl::AbortedError(
            absl::StrCat("step ", step + 1, ": rank 0 could not save the checkpoint"));
      }
      log << "  checkpoint: " << *dir << "\n";
      if (observer_ != nullptr) observer_->OnCheckpoint(*dir);
    }
    if (stop) {
      log << absl::StrFormat("stopped after step %d, as asked\n", step + 1);
      summary.stopped = true;
      summary.steps = step + 1;
      return summary;
    }
  }
  backend_->EnableOpTiming(false);
  backend_->DisableOpCounters();
  const double train_seconds = SecondsSince(t0) - profile_.counted_seconds;
  if (profile_.steps > 0 && groups_.is_root()) {
    if (absl::Status st = WriteProfile(log); !st.ok()) return st;
  }
  summary.steps = steps;
  summary.seconds = SecondsSince(t0);
  const DeviceMemoryStats after = backend_->MemoryStats();
  summary.workspace_bytes = after.workspace;
  summary.peak_memory_bytes = after.peak_in_use;
  summary.step_device_allocations = after.device_allocations - before.device_allocations;
  // The steps' speed: the counted steps (replayed kernels) and the report are left out.
  summary.tokens_per_second =
      double(std::max<int64_t>(0, steps - start_step_ - profile_.counted_steps) * B * L) /
      std::max(train_seconds, 1e-9);

  if (spec_.eval().batches() > 0) {
    log << "held-out evaluation:\n";
    for (int64_t len : eval_lens) {
      auto r = Evaluate(len);
      if (!r.ok()) return r.status();
      summary.evals.push_back(*r);
      log << absl::StrFormat("  length %7d: loss %.4f", len, r->loss);
      if (acc) log << absl::StrFormat(", accuracy %.1f%%", 100.0 * r->accuracy);
      log << absl::StrFormat(" (%d answer tokens)\n", r->tokens);
    }
  }
  log << absl::StrFormat("done: %d steps in %s, loss %.4f -> %.4f, %.0f tokens/s\n", steps,
                         FormatDuration(summary.seconds), summary.first_loss, summary.final_loss,
                         summary.tokens_per_second);
  if (device) {
    log << absl::StrFormat(
        "memory: peak %.2f GiB held by tensors during the steps; %d device allocations in them\n",
        double(summary.peak_memory_bytes) / (1 << 30), summary.step_device_allocations);
  }
  return summary;
}

}  // namespace mamba
