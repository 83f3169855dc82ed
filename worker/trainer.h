// The single-process training loop: data -> forward/backward -> clip -> AdamW, with progress
// lines (step, loss, accuracy, tokens/s, ETA), periodic held-out evaluation and a summary.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/job.pb.h"
#include "worker/backend.h"
#include "worker/data/dataset.h"
#include "worker/model.h"
#include "worker/optimizer.h"

namespace mamba {

struct EvalResult {
  int64_t seq_len = 0;
  double loss = 0;
  double accuracy = 0;  // over answer positions (synthetic tasks)
  int64_t tokens = 0;   // counted targets
};

struct TrainSummary {
  int64_t steps = 0;
  std::vector<double> losses;             // mean training loss of every step
  double first_loss = 0, final_loss = 0;  // means over the first and last log windows
  double final_accuracy = 0;
  double seconds = 0;
  double tokens_per_second = 0;   // input tokens processed per second of training
  std::vector<EvalResult> evals;  // the final evaluation
  // Device memory (zeros on the CPU backend): the workspace reserved before the first step, the
  // peak held by tensors during the steps, and the device allocations the steps and their
  // evaluations made (0 when every buffer came from the workspace).
  size_t workspace_bytes = 0;
  size_t peak_memory_bytes = 0;
  int64_t step_device_allocations = 0;
};

class Trainer {
 public:
  // The spec must be resolved (ResolveJobSpec). Fails with a named field for anything the
  // dataset or model cannot do.
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const v1::JobSpec& spec);

  // Trains spec.steps steps, printing progress to `log`. On a GPU, first sizes and reserves the
  // workspace with probe passes over the first batch (nothing is updated); a batch that does not
  // fit fails with RESOURCE_EXHAUSTED, before any step or checkpoint.
  absl::StatusOr<TrainSummary> Run(std::ostream& log);
  // Held-out loss and accuracy at one length (eval.batches batches of batch_size).
  absl::StatusOr<EvalResult> Evaluate(int64_t seq_len);

  MambaModel& model() { return *model_; }
  AdamWOptimizer& optimizer() { return *optimizer_; }
  const data::Dataset& dataset() const { return *dataset_; }
  // The step training starts from: 0, or the step of the checkpoint resumed from.
  int64_t start_step() const { return start_step_; }

 private:
  Trainer() = default;
  // Loads checkpoint.resume_from (a step_ directory or a root) after checking that the saved job
  // spec trains the same model on the same data.
  absl::Status Resume(const std::string& path);
  // The loss statistics of held-out batch `index` at one length.
  absl::StatusOr<LossStats> EvaluateBatch(int64_t seq_len, int32_t index);
  // Writes checkpoint.dir/step_<step>/ atomically; returns its path.
  absl::StatusOr<std::string> SaveCheckpoint(int64_t step, const std::vector<double>& losses);
  absl::StatusOr<TrainSummary> RunSteps(std::ostream& log);
  // Probe passes (a training step's forward/backward without the update, an evaluation forward
  // at each length), then Backend::ReserveWorkspace; logs the workspace's size.
  absl::Status ReserveWorkspace(const std::vector<int64_t>& eval_lens, std::ostream& log);

  v1::JobSpec spec_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<data::Dataset> dataset_;
  std::unique_ptr<MambaModel> model_;
  std::unique_ptr<AdamWOptimizer> optimizer_;
  int64_t start_step_ = 0;
  std::vector<double> loss_history_;  // of the run resumed from
  std::string resumed_from_;          // never deleted by keep_last
  std::string activity_;              // what runs now, for an out-of-memory message
};

// "1h02m", "3m05s", "12s".
std::string FormatDuration(double seconds);

}  // namespace mamba
