// trainer_state.json: where a run stands (step, schedule, data cursor, seed, loss history, the job
// spec it came from), written beside each checkpoint and read on resume. Reading takes text from
// outside: every value is type-checked before it is read, nesting is bounded, and any fault is
// DATA_LOSS naming the file and the field.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace mamba::ckpt {

// The file's format version.
inline constexpr int kFormatVersion = 1;

struct TrainerState {
  int64_t step = 0;    // optimizer steps done = the data cursor (data is a function of step)
  double next_lr = 0;  // the schedule's learning rate for the next step
  uint64_t seed = 0;   // data and initialization are pure functions of (seed, step)
  std::vector<double> losses;  // mean training loss of every step so far
  nlohmann::json job_spec;     // the JobSpec (protobuf JSON mapping) the run came from
};

nlohmann::json TrainerStateJson(const TrainerState& state);
// `path` names the file in errors.
absl::StatusOr<TrainerState> ParseTrainerState(const std::string& text, const std::string& path);

}  // namespace mamba::ckpt
