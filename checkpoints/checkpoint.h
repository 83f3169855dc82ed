// Training checkpoints: a directory root/step_00001234/ holding
//   model.safetensors      HF names (fp32, or bf16 on request); loads in MambaForCausalLM
//   config.json            transformers' MambaConfig
//   optimizer.safetensors  AdamW moments ("exp_avg.<name>", "exp_avg_sq.<name>"), the step
//                          ("step", I64), and fp32 masters ("master.<name>") when the model is bf16
//   trainer_state.json     step, schedule position, data cursor, RNG, loss history, job spec
// Saves are atomic: everything is written and fsynced in a hidden temporary directory beside
// the final one, which is then renamed into place. Only complete directories carry the
// step_ name, so a crash leaves the previous checkpoint or the new one, never a torn one.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "checkpoints/trainer_state.h"
#include "nlohmann/json.hpp"
#include "worker/backend.h"
#include "worker/model.h"
#include "worker/optimizer.h"

namespace mamba::ckpt {

struct SaveOptions {
  bool bf16 = false;    // model.safetensors in bf16 (the optimizer keeps fp32 masters)
  int keep_last = 0;    // after saving, delete all but the newest K checkpoints; 0 keeps all
  std::string protect;  // a checkpoint directory never deleted (the one resumed from)
  // Test hook, called at each stage of a save ("model", "optimizer", "state", "config",
  // "rename"): a non-OK status stops the save there as a crash would, leaving whatever was
  // written so far in place.
  std::function<absl::Status(std::string_view stage)> fault;
};

// "step_00001234".
std::string StepDirName(int64_t step);

// Writes root/step_<step>/ atomically (replacing an existing one with the same step) and applies
// keep_last. Returns the new directory.
absl::StatusOr<std::string> SaveCheckpoint(const std::string& root, const TrainerState& state,
                                           MambaModel& model, AdamWOptimizer& optimizer,
                                           Backend& backend, const SaveOptions& options);

// Complete checkpoints under root, (step, path) in increasing step order. A missing root is
// an empty list.
absl::StatusOr<std::vector<std::pair<int64_t, std::string>>> ListCheckpoints(
    const std::string& root);

// A step_ directory as given, or a checkpoint root meaning its latest checkpoint.
absl::StatusOr<std::string> ResolveCheckpointDir(const std::string& path);

// Reads a checkpoint into the model and optimizer, after validating all of it against them (so
// on error nothing was changed), and returns the trainer state.
absl::StatusOr<TrainerState> LoadCheckpoint(const std::string& dir, MambaModel& model,
                                            AdamWOptimizer& optimizer, Backend& backend);

}  // namespace mamba::ckpt
