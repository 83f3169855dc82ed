#include "checkpoints/trainer_state.h"

#include <cmath>
#include <limits>
#include <optional>

#include "absl/strings/str_cat.h"
#include "checkpoints/json_reader.h"
#include "worker/status_macros.h"

namespace mamba::ckpt {

using json = nlohmann::json;

json TrainerStateJson(const TrainerState& s) {
  return json{{"format_version", kFormatVersion},
              {"step", s.step},
              {"next_lr", s.next_lr},
              {"data_cursor", {{"split", "train"}, {"step", s.step}}},
              {"rng", {{"seed", s.seed}, {"stateful", false}}},
              {"losses", s.losses},
              {"job_spec", s.job_spec}};
}

absl::StatusOr<TrainerState> ParseTrainerState(const std::string& text, const std::string& path) {
  ASSIGN_OR_RETURN(const json j, ParseJsonBounded(text, path));
  if (!j.is_object()) return absl::DataLossError(absl::StrCat(path, ": not a JSON object"));
  auto bad = [&](const std::string& field) {
    return absl::DataLossError(absl::StrCat(path, ": ", field, ": missing or of the wrong type"));
  };
  if (!j.contains("format_version") || j["format_version"] != kFormatVersion) {
    return absl::DataLossError(absl::StrCat(path, ": format_version must be ", kFormatVersion));
  }
  TrainerState s;
  // Every value's type is checked before it is read: a wrong one is an error, never a throw.
  const auto step_of = [](const json& v) -> std::optional<int64_t> {
    if (!v.is_number_unsigned()) return std::nullopt;
    const uint64_t u = v.get<uint64_t>();
    if (u > uint64_t(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return static_cast<int64_t>(u);
  };
  const std::optional<int64_t> step = j.contains("step") ? step_of(j["step"]) : std::nullopt;
  if (!step) return bad("step");
  s.step = *step;
  if (!j.contains("next_lr") || !j["next_lr"].is_number() ||
      !std::isfinite(j["next_lr"].get<double>())) {
    return bad("next_lr");
  }
  s.next_lr = j["next_lr"].get<double>();
  if (!j.contains("rng") || !j["rng"].is_object() || !j["rng"].contains("seed") ||
      !j["rng"]["seed"].is_number_unsigned()) {
    return bad("rng.seed");
  }
  s.seed = j["rng"]["seed"].get<uint64_t>();
  if (!j.contains("losses") || !j["losses"].is_array()) return bad("losses");
  for (const json& l : j["losses"]) {
    if (!l.is_number()) return bad("losses");
    s.losses.push_back(l.get<double>());
  }
  if (!j.contains("job_spec") || !j["job_spec"].is_object()) return bad("job_spec");
  s.job_spec = j["job_spec"];
  if (j.contains("data_cursor")) {
    const json& cursor = j["data_cursor"];
    if (!cursor.is_object() || !cursor.contains("step")) return bad("data_cursor.step");
    const std::optional<int64_t> cursor_step = step_of(cursor["step"]);
    if (!cursor_step) return bad("data_cursor.step");
    if (*cursor_step != s.step) {
      return absl::DataLossError(absl::StrCat(path, ": data_cursor.step differs from step"));
    }
  }
  return s;
}

}  // namespace mamba::ckpt
