// libFuzzer harness: trainer_state.json (read on --resume).
#include <cstddef>
#include <cstdint>
#include <string>

#include "checkpoints/trainer_state.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto state = mamba::ckpt::ParseTrainerState(
      std::string(reinterpret_cast<const char*>(data), size), "trainer_state.json");
  if (state.ok()) (void)state->job_spec.dump();  // the resume path prints it for the spec check
  return 0;
}
