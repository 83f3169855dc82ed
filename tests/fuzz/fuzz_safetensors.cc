// libFuzzer harness: safetensors files (a checkpoint or pretrained weights from elsewhere).
#include <cstddef>
#include <cstdint>
#include <string>

#include "checkpoints/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto reader = mamba::ckpt::SafetensorsReader::Parse(
      std::string(reinterpret_cast<const char*>(data), size), "fuzz.safetensors");
  if (!reader.ok()) return 0;
  // Every tensor that parsed also loads (converted to float32) or is refused with a status.
  for (const auto& entry : reader->tensors()) {
    (void)reader->Load(entry.name, mamba::DType::kF32);
  }
  return 0;
}
