// The traffic model of one training step of the Mamba LM, op by op under the backends' op names
// (linear_fwd, selective_scan_bwd, ...): how many calls a step makes and what they move and
// compute together, for the profiling report to join with the measured op times.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "profiling/traffic_model.h"
#include "worker/model_config.h"

namespace mamba::profiling {

struct OpModel {
  int64_t calls = 0;
  Traffic traffic;
  double sram_bytes = 0;  // through shared memory, where the kernel stages data there
};

struct StepShape {
  int64_t batch = 0, len = 0;    // this rank's batch and positions
  int act_bytes = 4;             // activations: 4 (fp32) or 2 (bf16)
  bool recompute_layer = false;  // memory.recompute LAYER (else the conv and delta)
  int64_t parameters = 0;
};

std::map<std::string, OpModel> StepModel(const ModelConfig& c, const StepShape& s);

// The names the backends time and count ops under (profile.kernels picks among them).
const std::vector<std::string>& OpNames();

// The phase of the step an op counts toward: gemm, scan, conv, norm, loss, optimizer,
// embedding, or other.
std::string PhaseOf(const std::string& op);

}  // namespace mamba::profiling
