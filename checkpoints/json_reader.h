// Reading JSON that comes from outside (config.json, trainer_state.json, safetensors headers):
// nesting is bounded before anything walks the document, since copying, comparing or printing a
// deeply nested value recurses once a level and could overflow the stack.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace mamba::ckpt {

// Deeper than any file the project reads or writes (config.json: 3 levels).
inline constexpr int kMaxJsonDepth = 64;

// The document, or DATA_LOSS naming `label`: not valid JSON, or nested deeper than max_depth.
absl::StatusOr<nlohmann::json> ParseJsonBounded(std::string_view text, const std::string& label,
                                                int max_depth = kMaxJsonDepth);

// A value for an error message: its JSON, cut to about 60 characters.
std::string ShortJson(const nlohmann::json& value);

}  // namespace mamba::ckpt
