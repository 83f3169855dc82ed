// config.json in the form transformers' MambaConfig reads (model_type "mamba"), and reading it
// back from transformers' save_pretrained or from mamba_ssm's own config.json.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "worker/model_config.h"

namespace mamba::ckpt {

// Every MambaConfig field, so MambaForCausalLM.from_pretrained(dir) needs nothing else.
// `dtype`: "float32" or "bfloat16", the dtype model.safetensors is stored in.
nlohmann::json HfConfigJson(const ModelConfig& config, const std::string& dtype = "float32");

// Parses transformers' form (model_type "mamba") or mamba_ssm's (d_model, n_layer, ssm_cfg).
// Features the model lacks (in/out_proj biases, untied lm_head, MLP blocks) are errors naming
// the field. `label` (the file) prefixes every error.
absl::StatusOr<ModelConfig> ParseModelConfigJson(const std::string& text, const std::string& label);
// dir/config.json.
absl::StatusOr<ModelConfig> ReadModelConfig(const std::string& dir);

// OK when `found` (read from `label`) has the same shape as `expected`; else an error naming
// the first field that differs.
absl::Status CheckSameShape(const ModelConfig& found, const ModelConfig& expected,
                            const std::string& label);

}  // namespace mamba::ckpt
