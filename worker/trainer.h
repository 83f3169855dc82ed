// The training loop of one rank: data -> forward/backward -> gradient sum over the ranks -> clip
// -> AdamW, with progress lines (step, loss, accuracy, tokens/s, ETA), periodic held-out
// evaluation and a summary. Alone, or as one rank of an mpirun worker pool (comm/): each dp group
// trains its share of the global batch, each sp rank one slice of its sequences; losses, token
// counts and gradients are summed over the world, so every rank applies the same update. Rank 0
// alone prints and writes checkpoints.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/job.pb.h"
#include "worker/backend.h"
#include "worker/comm/process_groups.h"
#include "worker/data/dataset.h"
#include "worker/gradient_sync.h"
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
  bool stopped = false;  // ended early at the observer's request, after `steps` steps
};

// Follows a run from outside (the coordinator's pool in service mode), on every rank. Rank 0's
// answer to ShouldStop decides for all: the run then checkpoints (when it has a directory) and
// ends, its summary marked stopped.
class TrainObserver {
 public:
  virtual ~TrainObserver() = default;
  // After each step, with the global batch's mean loss.
  virtual void OnStep(int64_t /*step*/, double /*loss*/, double /*tokens_per_second*/) {}
  virtual void OnCheckpoint(const std::string& /*dir*/) {}
  virtual bool ShouldStop() { return false; }
};

// How this process takes part in a job.
struct RankOptions {
  comm::Transport transport = comm::Transport::kAuto;
  // How long an exchange waits for the other ranks before the job fails.
  absl::Duration comm_timeout = absl::Minutes(5);
  // Train alone in this process even where MPI is up (a one-rank reference beside a pool).
  bool solo = false;
  TrainObserver* observer = nullptr;
};

class Trainer {
 public:
  // The spec must be resolved (ResolveJobSpec). Fails with a named field for anything the
  // dataset or model cannot do, or a grid that does not fit the world (comm::MpiRuntime::Get(): a
  // world of one unless MPI was initialized). On CUDA, a rank takes the GPU of its rank on the
  // node (modulo the GPUs it sees).
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const v1::JobSpec& spec,
                                                         const RankOptions& rank = {});

  // Trains spec.steps steps, printing progress to `log`. On a GPU, first sizes and reserves the
  // workspace with probe passes over the first batch (nothing is updated); a batch that does not
  // fit fails with RESOURCE_EXHAUSTED, before any step or checkpoint.
  absl::StatusOr<TrainSummary> Run(std::ostream& log);
  // Held-out loss and accuracy at one length (eval.batches batches of batch_size).
  absl::StatusOr<EvalResult> Evaluate(int64_t seq_len);

  // This rank's place in the job.
  const comm::ProcessGroups& groups() const { return groups_; }
  Backend& backend() { return *backend_; }
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
  // A training step's batch as the model takes it, drawn ahead of its step.
  struct PreparedBatch {
    Tensor inputs, targets;  // int32 host tensors (count, seq_len)
    int64_t targets_counted = 0;
  };
  // This rank's part of batch `index` of a split: its dp share of the samples, its sp slice of
  // the positions.
  absl::StatusOr<data::Batch> LocalBatch(data::Split split, int64_t index, int64_t seq_len) const;
  // The loss statistics of held-out batch `index` at one length, summed over the ranks.
  absl::StatusOr<LossStats> EvaluateBatch(int64_t seq_len, int32_t index);
  // Sums loss statistics over the world.
  absl::StatusOr<LossStats> SumOverRanks(const LossStats& local);
  // Writes checkpoint.dir/step_<step>/ atomically; returns its path.
  absl::StatusOr<std::string> SaveCheckpoint(int64_t step, const std::vector<double>& losses);
  absl::StatusOr<TrainSummary> RunSteps(std::ostream& log);
  // Probe passes (a training step's forward/backward without the update, an evaluation forward
  // at each length), then Backend::ReserveWorkspace; logs the workspace's size.
  absl::Status ReserveWorkspace(const std::vector<int64_t>& eval_lens, std::ostream& log);

  v1::JobSpec spec_;
  std::unique_ptr<Backend> backend_;
  comm::ProcessGroups groups_;
  std::unique_ptr<data::Dataset> dataset_;
  std::unique_ptr<MambaModel> model_;
  std::unique_ptr<AdamWOptimizer> optimizer_;
  std::unique_ptr<GradientSync> sync_;
  int64_t start_step_ = 0;
  std::vector<double> loss_history_;  // of the run resumed from
  std::string resumed_from_;          // never deleted by keep_last
  std::string activity_;              // what runs now, for an out-of-memory message
  TrainObserver* observer_ = nullptr;
  // The profiled steps' op times (profiling), summed.
  struct ProfiledSteps {
    std::map<std::string, double> op_ms;
    double seconds = 0;
    int64_t steps = 0;
    // The counted steps' hardware counters per op, or why there are none.
    std::map<std::string, profiling::KernelCounters> counters;
    std::string counters_note;
    int64_t counted_steps = 0;
    double counted_seconds = 0;  // the counted steps and the counters' set-up
  };
  ProfiledSteps profile_;
  // Writes the profiling report of the profiled steps (rank 0).
  absl::Status WriteProfile(std::ostream& log);
};

// "1h02m", "3m05s", "12s".
std::string FormatDuration(double seconds);

}  // namespace mamba
