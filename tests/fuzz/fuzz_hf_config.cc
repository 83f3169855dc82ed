// libFuzzer harness: config.json (transformers' MambaConfig or mamba_ssm's config).
#include <cstddef>
#include <cstdint>
#include <string>

#include "checkpoints/hf_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)mamba::ckpt::ParseModelConfigJson(std::string(reinterpret_cast<const char*>(data), size),
                                          "config.json");
  return 0;
}
