// Model weights <-> safetensors in HF MambaForCausalLM names, and import of checkpoints written
// by transformers (save_pretrained) or mamba_ssm.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "checkpoints/safetensors.h"
#include "worker/backend.h"
#include "worker/model.h"

namespace mamba::ckpt {

// Adds every parameter under its HF name (fp32, or bf16 when `bf16`); the tied lm_head is not
// stored twice (transformers re-ties it on load).
void AddModelWeights(MambaModel& model, Backend& backend, bool bf16, SafetensorsWriter& writer);

// Checks every tensor in `file` against the model (names, with mamba_ssm's
// "backbone.embedding.weight" accepted for the embeddings and an "lm_head.weight" equal to them;
// shapes; floating dtypes F32/BF16/F16/F64), then copies them in. On any error the model is left
// as it was.
absl::Status LoadModelWeights(const SafetensorsReader& file, MambaModel& model);

// dir/config.json (checked against the model's shape) and dir/model.safetensors.
absl::Status ImportModel(const std::string& dir, MambaModel& model);

}  // namespace mamba::ckpt
