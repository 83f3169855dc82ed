// Training-step benchmark: a Mamba LM of a given size on one device, random tokens, AdamW. Prints
// tokens/s and step time (median of the timed steps, run without instrumentation), peak device
// memory and a per-phase breakdown (per-op CUDA events in --profile_steps extra steps), and
// writes JSON. Defaults: Mamba-130M (d_model 768, 24 layers, vocab 50280 padded to 50280,
// N 16) at batch 8, seqlen 2048. --batch 0 finds the largest batch (a multiple of 8) whose step
// fits in device memory, by probe steps, and times that; --seq_len 0 likewise finds the longest
// sequence (a multiple of 16384) whose step fits at the given batch: with --recompute layer, the
// longest single sequence that trains on one GPU. After the first warm-up step the step's buffers
// become one workspace (Backend::ReserveWorkspace), as in training jobs.
// --job SPEC.json first runs that job's real training loop (data, logging, evaluation and all,
// through the Trainer) and then the bare step at the job's shapes, and prints both: the gap is
// what the job loop loses outside the step.
//   train_bench [--d_model 768 --n_layer 24 --batch 8 --seq_len 2048 --steps 10]
//               [--precision fp32|tf32|bf16] [--recompute conv|layer|none] [--json out.json]
//   train_bench --job spec.json [--steps 10]
// --report DIR writes the profiling report (profile.json/.md/.svg) of the --profile_steps steps:
// with --count_ops OPS one more step collects those ops' hardware counters in process (CUPTI),
// or --ncu_csv OP=FILE,... takes them from Nsight Compute's raw CSV of this same step
// (scripts/profile.sh: the cross-check).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "nlohmann/json.hpp"
#include "profiling/ncu_csv.h"
#include "profiling/report.h"
#include "profiling/step_model.h"
#include "worker/device_peaks.h"
#include "worker/job_spec.h"
#include "worker/model.h"
#include "worker/optimizer.h"
#include "worker/trainer.h"

ABSL_FLAG(int64_t, d_model, 768, "model width");
ABSL_FLAG(int64_t, n_layer, 24, "layers");
ABSL_FLAG(int64_t, vocab, 50280, "vocabulary (padded to a multiple of 8)");
ABSL_FLAG(int64_t, d_state, 16, "SSM state size N");
ABSL_FLAG(int64_t, batch, 8, "sequences per step; 0: the largest multiple of 8 that fits");
ABSL_FLAG(int64_t, seq_len, 2048,
          "tokens per sequence; 0: the longest multiple of 16384 that fits (at --batch, not 0)");
ABSL_FLAG(std::string, recompute, "conv",
          "what the backward recomputes: conv (conv output and delta), layer (whole layers) or "
          "none");
ABSL_FLAG(int64_t, steps, 10, "timed steps");
ABSL_FLAG(int64_t, warmup, 3, "untimed steps first");
ABSL_FLAG(int64_t, profile_steps, 2,
          "steps after the timed ones with per-op CUDA events, for the phase table (the timed "
          "steps run without them: recording ~2 events per op costs host time); 0: none (one "
          "step exactly with --steps 1 --warmup 0, as scripts/profile.sh runs it under ncu)");
ABSL_FLAG(std::string, backend, "cuda", "cuda or cpu");
ABSL_FLAG(std::string, precision, "fp32",
          "GEMM precision on cuda: fp32 (exact), tf32 (TF32 tensor cores) or bf16 (bf16 operands, "
          "fp32 accumulation)");
ABSL_FLAG(std::string, json, "", "write results here");
ABSL_FLAG(std::string, report, "", "write the profiling report (profile.json, .md, .svg) here");
ABSL_FLAG(std::vector<std::string>, count_ops, {},
          "with --report: ops whose kernels' hardware counters one more step collects (CUPTI), "
          "e.g. selective_scan_fwd,selective_scan_bwd (\"*\": every op)");
ABSL_FLAG(std::vector<std::string>, ncu_csv, {},
          "with --report: OP=FILE pairs, each Nsight Compute's raw CSV (ncu --csv --page raw) of "
          "that op's kernels over one step at these shapes, taken as the op's counters");
ABSL_FLAG(std::string, job, "",
          "a job spec: run its training loop first, then the step alone at its shapes (the model, "
          "batch, length, backend and precision come from the spec)");

namespace {

using mamba::Tensor;

// Whether training steps of `batch` sequences fit in device memory as a job runs them: a probe
// forward/backward and gradient norm (no update), the workspace reserved from its buffers, and a
// second probe served by that workspace. Gives every buffer back afterwards.
template <typename RandomBatch>
bool Fits(mamba::MambaModel& model, mamba::AdamWOptimizer& opt, mamba::Backend& backend,
          int64_t batch, int64_t seq_len, RandomBatch& random_batch) {
  Tensor inputs, targets;
  random_batch(batch, seq_len, inputs, targets);
  bool fits = true;
  try {
    for (int pass = 0; pass < 2; ++pass) {
      if (pass == 1) backend.ReserveWorkspace();
      model.ZeroGrad();
      model.ForwardBackward(inputs, targets, -100, 1.0, true);
      opt.GradNorm();
    }
  } catch (const mamba::DeviceOutOfMemory&) {
    fits = false;
  }
  model.ZeroGrad();
  backend.ReleaseCachedMemory();  // the probes' buffers and workspace, the ops' scratch among them
  return fits;
}

// The largest multiple of 8 sequences whose step fits: doubling, then bisection.
template <typename RandomBatch>
int64_t LargestBatch(mamba::MambaModel& model, mamba::AdamWOptimizer& opt, mamba::Backend& backend,
                     int64_t seq_len, RandomBatch& random_batch) {
  int64_t fits = 0, fails = 8;
  while (Fits(model, opt, backend, fails, seq_len, random_batch)) {
    std::printf("  batch %ld x %ld fits\n", long(fails), long(seq_len));
    fits = fails;
    fails *= 2;
  }
  std::printf("  batch %ld x %ld does not fit\n", long(fails), long(seq_len));
  while (fails - fits > 8) {
    const int64_t mid = (fits + fails) / 16 * 8;
    const bool ok = Fits(model, opt, backend, mid, seq_len, random_batch);
    std::printf("  batch %ld x %ld %s\n", long(mid), long(seq_len), ok ? "fits" : "does not fit");
    (ok ? fits : fails) = mid;
  }
  if (fits == 0) {
    std::fprintf(stderr, "train_bench: not even batch 8 fits\n");
    std::exit(3);
  }
  return fits;
}

// The longest multiple of 16384 tokens whose step at `batch` fits: doubling, then bisection.
template <typename RandomBatch>
int64_t LongestSequence(mamba::MambaModel& model, mamba::AdamWOptimizer& opt,
                        mamba::Backend& backend, int64_t batch, RandomBatch& random_batch) {
  constexpr int64_t kUnit = 16384;
  int64_t fits = 0, fails = kUnit;
  while (Fits(model, opt, backend, batch, fails, random_batch)) {
    std::printf("  batch %ld x %ld fits\n", long(batch), long(fails));
    fits = fails;
    fails *= 2;
  }
  std::printf("  batch %ld x %ld does not fit\n", long(batch), long(fails));
  while (fails - fits > kUnit) {
    const int64_t mid = (fits + fails) / (2 * kUnit) * kUnit;
    const bool ok = Fits(model, opt, backend, batch, mid, random_batch);
    std::printf("  batch %ld x %ld %s\n", long(batch), long(mid), ok ? "fits" : "does not fit");
    (ok ? fits : fails) = mid;
  }
  if (fits == 0) {
    std::fprintf(stderr, "train_bench: not even %ld tokens fit\n", long(kUnit));
    std::exit(3);
  }
  return fits;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  mamba::ModelConfig c;
  c.d_model = absl::GetFlag(FLAGS_d_model);
  c.n_layer = absl::GetFlag(FLAGS_n_layer);
  c.vocab_size = mamba::ModelConfig::PadVocab(absl::GetFlag(FLAGS_vocab));
  c.d_state = absl::GetFlag(FLAGS_d_state);
  c.dt_rank = mamba::ModelConfig::DefaultDtRank(c.d_model);
  int64_t B = absl::GetFlag(FLAGS_batch);
  int64_t L = absl::GetFlag(FLAGS_seq_len);
  const int64_t steps = absl::GetFlag(FLAGS_steps), warmup = absl::GetFlag(FLAGS_warmup);
  const int64_t profile_steps = std::max<int64_t>(0, absl::GetFlag(FLAGS_profile_steps));
  if (steps < 1) {
    std::fprintf(stderr, "train_bench: --steps must be at least 1\n");
    return 2;
  }
  if (!absl::GetFlag(FLAGS_report).empty() && profile_steps == 0) {
    std::fprintf(stderr, "train_bench: --report needs --profile_steps of at least 1\n");
    return 2;
  }
  // Nsight Compute's tables, read before any work so that a bad one stops the run at once.
  std::map<std::string, mamba::profiling::Measured> ncu_measured;
  for (const std::string& pair : absl::GetFlag(FLAGS_ncu_csv)) {
    const size_t eq = pair.find('=');
    std::ifstream in(eq == std::string::npos ? "" : pair.substr(eq + 1));
    if (eq == std::string::npos || !in) {
      std::fprintf(stderr, "train_bench: --ncu_csv %s: want OP=FILE, a readable file\n",
                   pair.c_str());
      return 2;
    }
    std::stringstream text;
    text << in.rdbuf();
    auto kernels = mamba::profiling::ParseNcuCsv(text.str());
    absl::StatusOr<mamba::profiling::Measured> m =
        kernels.ok() ? mamba::profiling::SumNcuKernels(*kernels) : kernels.status();
    if (!m.ok()) {
      std::fprintf(stderr, "train_bench: --ncu_csv %s: %s\n", pair.c_str(),
                   m.status().ToString().c_str());
      return 2;
    }
    ncu_measured[pair.substr(0, eq)] = *m;
    std::printf("ncu: %s: %zu kernels\n", pair.c_str(), kernels->size());
  }
  std::string backend_name = absl::GetFlag(FLAGS_backend);
  std::string precision = absl::GetFlag(FLAGS_precision);
  double job_tokens_per_s = 0;
  if (const std::string path = absl::GetFlag(FLAGS_job); !path.empty()) {
    auto spec = mamba::LoadJobSpecFile(path);
    if (!spec.ok()) {
      std::fprintf(stderr, "train_bench: %s\n", std::string(spec.status().message()).c_str());
      return 2;
    }
    auto trainer = mamba::Trainer::Create(*spec);
    if (!trainer.ok()) {
      std::fprintf(stderr, "train_bench: %s\n", std::string(trainer.status().message()).c_str());
      return 2;
    }
    std::printf("the job's loop (%s):\n", path.c_str());
    auto summary = (*trainer)->Run(std::cout);
    if (!summary.ok()) {
      std::fprintf(stderr, "train_bench: %s\n", std::string(summary.status().message()).c_str());
      return 2;
    }
    job_tokens_per_s = summary->tokens_per_second;
    c = (*trainer)->model().config();
    B = spec->batch_size();
    L = (*trainer)->dataset().seq_len();
    backend_name = spec->backend();
    precision = spec->precision();
    std::printf("\nthe step alone at its shapes:\n");
  }

  std::unique_ptr<mamba::Backend> backend;
#ifdef MAMBA_HAS_CUDA
  if (backend_name == "cuda") {
    if (mamba::CudaDeviceCount() == 0) {
      std::fprintf(stderr, "train_bench: no CUDA device\n");
      return 2;
    }
    mamba::CudaBackendOptions options;
    if (precision == "tf32") {
      options.gemm_precision = mamba::GemmPrecision::kTf32;
    } else if (precision == "bf16") {
      options.gemm_precision = mamba::GemmPrecision::kBf16;
    } else if (precision != "fp32") {
      std::fprintf(stderr, "train_bench: --precision must be fp32, tf32 or bf16\n");
      return 2;
    }
    backend = mamba::MakeCudaBackend(options);
  }
#endif
  if (!backend) {
    if (backend_name != "cpu" || precision != "fp32") {
      std::fprintf(stderr, "train_bench: backend %s with %s GEMMs not available\n",
                   backend_name.c_str(), precision.c_str());
      return 2;
    }
    backend = mamba::MakeCpuBackend();
  }

  mamba::ModelOptions model_options;
  const std::string recompute = absl::GetFlag(FLAGS_recompute);
  if (recompute == "layer") {
    model_options.recompute = mamba::Recompute::kLayer;
  } else if (recompute == "none") {
    model_options.recompute = mamba::Recompute::kNone;
  } else if (recompute != "conv") {
    std::fprintf(stderr, "train_bench: --recompute must be conv, layer or none\n");
    return 2;
  }
  mamba::MambaModel model(c, backend.get(), mamba::DType::kF32, model_options);
  model.Initialize(1);
  mamba::OptimizerConfig oc;
  mamba::AdamWOptimizer opt(oc, backend.get(), &model.parameter_store());
  std::printf(
      "train_bench: %s backend, %s GEMMs, d_model %ld x %ld layers, vocab %ld, N %ld: %.1fM "
      "parameters; "
      "batch %ld x %ld tokens\n",
      backend->name().c_str(), precision.c_str(), long(c.d_model), long(c.n_layer),
      long(c.vocab_size), long(c.d_state), model.num_parameters() / 1e6, long(B), long(L));

  std::mt19937 rng(7);
  const auto random_batch = [&](int64_t batch, int64_t len, Tensor& inputs, Tensor& targets) {
    inputs = Tensor::Empty({batch, len}, mamba::DType::kI32);
    targets = Tensor::Empty({batch, len}, mamba::DType::kI32);
    for (int64_t i = 0; i < batch * len; ++i) {
      inputs.data<int32_t>()[i] = int32_t(rng() % c.vocab_size);
      targets.data<int32_t>()[i] = int32_t(rng() % c.vocab_size);
    }
  };
  if (L == 0) {
    if (B == 0) {
      std::fprintf(stderr, "train_bench: --seq_len 0 needs a --batch\n");
      return 2;
    }
    L = LongestSequence(model, opt, *backend, B, random_batch);
  }
  if (B == 0) B = LargestBatch(model, opt, *backend, L, random_batch);
  Tensor inputs, targets;
  std::vector<double> step_ms;
  std::map<std::string, double> phase_ms, op_ms;
  double loss = 0, profiled_seconds = 0;
  size_t workspace = 0;
  for (int64_t s = 0; s < warmup + steps + profile_steps; ++s) {
    random_batch(B, L, inputs, targets);
    const bool timed = s >= warmup && s < warmup + steps;
    const bool profiled = s >= warmup + steps;
    if (s == warmup) backend->ResetPeakMemory();
    if (s == warmup + steps) {
      backend->EnableOpTiming(true);
      backend->TakeOpTimes();
    }
    const auto t0 = std::chrono::steady_clock::now();
    model.ZeroGrad();
    mamba::LossStats st;
    try {
      if (s == 1) workspace = backend->ReserveWorkspace();  // the first step's buffers
      st = model.ForwardBackward(inputs, targets, -100, 1.0 / (B * L), true);
    } catch (const mamba::DeviceOutOfMemory& e) {
      std::fprintf(stderr, "train_bench: batch %ld does not fit: %s\n", long(B), e.what());
      return 3;
    }
    opt.Step();
    backend->Synchronize();  // the step has finished on the device
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    loss = st.mean_loss();
    if (timed) step_ms.push_back(ms);
    if (profiled) {
      profiled_seconds += ms / 1e3;
      for (const auto& [op, t] : backend->TakeOpTimes()) {
        phase_ms[mamba::profiling::PhaseOf(op)] += t;
        op_ms[op] += t;
      }
    }
    std::printf("  step %ld%s: %.1f ms, loss %.4f\n", long(s + 1),
                timed      ? ""
                : profiled ? " (per-op events)"
                           : " (warm-up)",
                ms, loss);
  }
  std::vector<double> sorted = step_ms;
  std::sort(sorted.begin(), sorted.end());
  const double median = sorted[sorted.size() / 2];
  const double tokens_per_s = double(B * L) / (median / 1e3);
  if (job_tokens_per_s > 0) {
    std::printf(
        "\njob loop %.0f tokens/s vs the step alone %.0f tokens/s: the loop reaches %.1f %%\n",
        job_tokens_per_s, tokens_per_s, 100 * job_tokens_per_s / tokens_per_s);
  }
  const mamba::DeviceMemoryStats mem = backend->MemoryStats();
  const double peak_gib = double(mem.peak_in_use) / (1 << 30);
  std::printf(
      "\nbatch %ld: median step %.1f ms | %.0f tokens/s | peak tensor memory %.2f GiB | "
      "workspace %.2f GiB, reserved %.2f GiB\n",
      long(B), median, tokens_per_s, peak_gib, double(workspace) / (1 << 30),
      double(mem.reserved) / (1 << 30));
  double phase_total = 0;
  for (const auto& [p, t] : phase_ms) phase_total += t;
  std::printf("%-10s %10s %7s\n", "phase", "ms/step", "share");
  for (const auto& [p, t] : phase_ms) {
    std::printf("%-10s %10.2f %6.1f%%\n", p.c_str(), t / profile_steps, 100.0 * t / phase_total);
  }
  std::printf("\n%-20s %10s\n", "op", "ms/step");
  for (const auto& [op, t] : op_ms) std::printf("%-20s %10.2f\n", op.c_str(), t / profile_steps);
  if (const std::string dir = absl::GetFlag(FLAGS_report); !dir.empty()) {
    mamba::profiling::ProfiledRun run;
    mamba::profiling::StepShape shape;
    shape.batch = B;
    shape.len = L;
    shape.act_bytes = precision == "bf16" ? 2 : 4;
    shape.recompute_layer = recompute == "layer";
    shape.parameters = model.num_parameters();
    run.model = mamba::profiling::StepModel(c, shape);
    run.op_ms = op_ms;
    run.steps = profile_steps;
    run.seconds = profiled_seconds;
    run.tokens_per_step = double(B * L);
    if (!ncu_measured.empty()) {
      run.counters_note = "Nsight Compute (ncu --csv), one step";
      run.measured_per_step = ncu_measured;
    } else if (const auto ops = absl::GetFlag(FLAGS_count_ops); !ops.empty()) {
      std::string why = backend->EnableOpCounters(ops);
      if (why.empty()) {
        random_batch(B, L, inputs, targets);
        model.ZeroGrad();
        model.ForwardBackward(inputs, targets, -100, 1.0 / (B * L), true);
        opt.Step();
        backend->Synchronize();
        for (const auto& [op, k] : backend->TakeOpCounters(&why)) {
          run.measured_per_step[op] = mamba::profiling::MeasuredOf(k);
          std::printf("counters: %s: %ld kernels\n", op.c_str(), long(k.kernels));
        }
        backend->DisableOpCounters();
      }
      run.counters_note = why.empty() ? "CUPTI range profiler, one step" : "not collected: " + why;
    } else {
      run.counters_note = "not collected (no --count_ops or --ncu_csv)";
    }
    const mamba::profiling::Report report =
        mamba::profiling::AssembleReport(run, mamba::MeasurePeaks(*backend));
    if (absl::Status st = mamba::profiling::WriteReport(report, dir); !st.ok()) {
      std::fprintf(stderr, "train_bench: %s\n", st.ToString().c_str());
      return 2;
    }
    std::printf("\n%s", mamba::profiling::ReportMarkdown(report).c_str());
  }
  const std::string out = absl::GetFlag(FLAGS_json);
  if (!out.empty()) {
    nlohmann::json j;
    j["backend"] = backend->name();
    j["precision"] = precision;
    if (job_tokens_per_s > 0) {
      j["job"] = absl::GetFlag(FLAGS_job);
      j["job_loop_tokens_per_second"] = job_tokens_per_s;
    }
    j["d_model"] = c.d_model;
    j["n_layer"] = c.n_layer;
    j["vocab"] = c.vocab_size;
    j["parameters"] = model.num_parameters();
    j["batch"] = B;
    j["seq_len"] = L;
    j["recompute"] = recompute;
    j["median_step_ms"] = median;
    j["tokens_per_second"] = tokens_per_s;
    j["peak_tensor_gib"] = peak_gib;
    j["workspace_gib"] = double(workspace) / (1 << 30);
    j["reserved_gib"] = double(mem.reserved) / (1 << 30);
    j["step_ms"] = step_ms;
    for (const auto& [p, t] : phase_ms) j["phase_ms_per_step"][p] = t / profile_steps;
    for (const auto& [op, t] : op_ms) j["op_ms_per_step"][op] = t / profile_steps;
    std::ofstream(out) << j.dump(2) << "\n";
  }
  return 0;
}
