#include "checkpoints/checkpoint.h"

#include <fcntl.h>  // AT_FDCWD
#include <stdio.h>  // renameat2
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "checkpoints/durable_io.h"
#include "checkpoints/hf_config.h"
#include "checkpoints/model_io.h"
#include "checkpoints/safetensors.h"
#include "worker/check.h"
#include "worker/status_macros.h"

namespace mamba::ckpt {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr char kStepPrefix[] = "step_";
constexpr char kTempPrefix[] = ".tmp-step_";

// The step of a directory named step_<digits>, or -1.
int64_t ParseStepDir(const std::string& name) {
  if (!absl::StartsWith(name, kStepPrefix)) return -1;
  const std::string digits = name.substr(sizeof(kStepPrefix) - 1);
  int64_t step;
  if (digits.empty() || !std::all_of(digits.begin(), digits.end(), ::isdigit) ||
      !absl::SimpleAtoi(digits, &step)) {
    return -1;
  }
  return step;
}

std::string OptimizerBytes(MambaModel& model, AdamWOptimizer& opt, Backend& backend, bool bf16) {
  SafetensorsWriter w;
  const auto& params = model.parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    w.Add("exp_avg." + params[i].name, backend.ToHost(opt.first_moments()[i]));
    w.Add("exp_avg_sq." + params[i].name, backend.ToHost(opt.second_moments()[i]));
    if (bf16) w.Add("master." + params[i].name, backend.ToHost(params[i].value));
  }
  const int64_t step = opt.step();
  w.AddRaw("step", "I64", {}, std::string(reinterpret_cast<const char*>(&step), 8));
  w.SetMetadata("format", "mamba-adamw");
  return w.Serialize();
}

absl::Status Hook(const SaveOptions& o, std::string_view stage) {
  return o.fault ? o.fault(stage) : absl::OkStatus();
}

// Removes what a crashed save left behind (only hidden temporaries, never a step_ directory).
void RemoveStaleTemporaries(const std::string& root) {
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    if (absl::StartsWith(entry.path().filename().string(), kTempPrefix)) {
      fs::remove_all(entry.path(), ec);
    }
  }
}

absl::Status Prune(const std::string& root, const std::string& keep, const SaveOptions& o) {
  if (o.keep_last <= 0) return absl::OkStatus();
  auto list = ListCheckpoints(root);
  if (!list.ok()) return list.status();
  std::error_code ec;
  const fs::path protect = o.protect.empty() ? fs::path() : fs::weakly_canonical(o.protect, ec);
  auto is_protected = [&](const std::string& path) {
    return !protect.empty() && fs::weakly_canonical(path, ec) == protect;
  };
  // The protected checkpoint is kept on top of the newest K.
  int64_t excess = static_cast<int64_t>(list->size()) - o.keep_last;
  for (const auto& [step, path] : *list) excess -= is_protected(path);
  for (const auto& [step, path] : *list) {  // oldest first
    if (excess <= 0) break;
    if (path == keep || is_protected(path)) continue;
    fs::remove_all(path, ec);
    if (ec) return absl::InternalError(absl::StrCat(path, ": cannot delete: ", ec.message()));
    --excess;
  }
  return SyncDirectory(root);
}

}  // namespace

std::string StepDirName(int64_t step) { return absl::StrFormat("%s%08d", kStepPrefix, step); }

absl::StatusOr<std::string> SaveCheckpoint(const std::string& root, const TrainerState& state,
                                           MambaModel& model, AdamWOptimizer& optimizer,
                                           Backend& backend, const SaveOptions& o) {
  MAMBA_CHECK(state.step == optimizer.step()) << state.step << " vs " << optimizer.step();
  std::error_code ec;
  fs::create_directories(root, ec);
  if (ec) return absl::InternalError(absl::StrCat(root, ": cannot create: ", ec.message()));
  RemoveStaleTemporaries(root);
  const std::string final_dir = (fs::path(root) / StepDirName(state.step)).string();
  const std::string tmp =
      (fs::path(root) / absl::StrCat(kTempPrefix, state.step, "-", ::getpid())).string();
  fs::create_directory(tmp, ec);
  if (ec) return absl::InternalError(absl::StrCat(tmp, ": cannot create: ", ec.message()));

  // Ordinary I/O errors clean up the temporary; an injected fault leaves it, as a crash would.
  auto fail = [&](absl::Status s) {
    fs::remove_all(tmp, ec);
    return s;
  };
  {
    SafetensorsWriter w;
    AddModelWeights(model, backend, o.bf16, w);
    absl::Status s = WriteFileDurably(tmp + "/model.safetensors", w.Serialize());
    if (!s.ok()) return fail(s);
  }
  RETURN_IF_ERROR(Hook(o, "model"));
  if (absl::Status s = WriteFileDurably(tmp + "/optimizer.safetensors",
                                        OptimizerBytes(model, optimizer, backend, o.bf16));
      !s.ok()) {
    return fail(s);
  }
  RETURN_IF_ERROR(Hook(o, "optimizer"));
  if (absl::Status s =
          WriteFileDurably(tmp + "/trainer_state.json", TrainerStateJson(state).dump(1));
      !s.ok()) {
    return fail(s);
  }
  RETURN_IF_ERROR(Hook(o, "state"));
  const json config = HfConfigJson(model.config(), o.bf16 ? "bfloat16" : "float32");
  if (absl::Status s = WriteFileDurably(tmp + "/config.json", config.dump(2) + "\n"); !s.ok()) {
    return fail(s);
  }
  if (absl::Status s = SyncDirectory(tmp); !s.ok()) return fail(s);
  RETURN_IF_ERROR(Hook(o, "config"));

  if (fs::exists(final_dir)) {
    // Swap atomically with the old one of the same step, then delete the old one.
    if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) != 0) {
      return fail(
          absl::InternalError(absl::StrCat(final_dir, ": cannot replace: ", std::strerror(errno))));
    }
    fs::remove_all(tmp, ec);
  } else if (::rename(tmp.c_str(), final_dir.c_str()) != 0) {
    return fail(
        absl::InternalError(absl::StrCat(final_dir, ": rename failed: ", std::strerror(errno))));
  }
  RETURN_IF_ERROR(SyncDirectory(root));
  RETURN_IF_ERROR(Hook(o, "rename"));
  RETURN_IF_ERROR(Prune(root, final_dir, o));
  return final_dir;
}

absl::StatusOr<std::vector<std::pair<int64_t, std::string>>> ListCheckpoints(
    const std::string& root) {
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  if (!fs::exists(root, ec)) return out;
  if (!fs::is_directory(root, ec)) {
    return absl::InvalidArgumentError(absl::StrCat(root, ": not a directory"));
  }
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    const int64_t step = ParseStepDir(entry.path().filename().string());
    if (step >= 0 && entry.is_directory()) out.emplace_back(step, entry.path().string());
  }
  if (ec) return absl::InternalError(absl::StrCat(root, ": cannot list: ", ec.message()));
  std::sort(out.begin(), out.end());
  return out;
}

absl::StatusOr<std::string> ResolveCheckpointDir(const std::string& path) {
  std::error_code ec;
  if (!fs::is_directory(path, ec)) {
    return absl::NotFoundError(absl::StrCat(path, ": checkpoint directory not found"));
  }
  if (ParseStepDir(fs::path(path).lexically_normal().filename().string()) >= 0 ||
      fs::exists(fs::path(path) / "trainer_state.json", ec)) {
    return path;
  }
  auto list = ListCheckpoints(path);
  if (!list.ok()) return list.status();
  if (list->empty()) {
    return absl::NotFoundError(absl::StrCat(path, ": no step_ checkpoint directories in it"));
  }
  return list->back().second;
}

absl::StatusOr<TrainerState> LoadCheckpoint(const std::string& dir, MambaModel& model,
                                            AdamWOptimizer& optimizer, Backend& backend) {
  // Read and check everything before touching the model or the optimizer.
  auto config = ReadModelConfig(dir);
  if (!config.ok()) return config.status();
  RETURN_IF_ERROR(CheckSameShape(*config, model.config(), dir + "/config.json"));
  auto state_text = ReadWholeFile(dir + "/trainer_state.json");
  if (!state_text.ok()) return state_text.status();
  auto state = ParseTrainerState(*state_text, dir + "/trainer_state.json");
  if (!state.ok()) return state.status();
  auto weights = SafetensorsReader::Open(dir + "/model.safetensors");
  if (!weights.ok()) return weights.status();
  auto opt = SafetensorsReader::Open(dir + "/optimizer.safetensors");
  if (!opt.ok()) return opt.status();

  const std::string& label = opt->label();
  const auto& params = model.parameters();
  std::vector<Tensor> m, v, master;
  const std::pair<std::string, std::vector<Tensor>*> kinds[] = {
      {"exp_avg.", &m}, {"exp_avg_sq.", &v}, {"master.", &master}};
  for (const Parameter& p : params) {
    for (const auto& [prefix, out] : kinds) {
      const std::string name = prefix + p.name;
      const TensorEntry* e = opt->Find(name);
      if (e == nullptr) {
        if (out == &master) continue;  // only present for bf16 models
        return absl::DataLossError(absl::StrCat(label, ": missing tensor \"", name, "\""));
      }
      if (e->shape != p.value.shape() || e->dtype != SafetensorsDTypeName(p.value.dtype())) {
        return absl::DataLossError(absl::StrCat(label, ": tensor \"", name, "\" is ", e->dtype, " ",
                                                ShapeString(e->shape), "; expected ",
                                                SafetensorsDTypeName(p.value.dtype()), " ",
                                                ShapeString(p.value.shape())));
      }
      auto t = opt->Load(name, p.value.dtype());
      if (!t.ok()) return t.status();
      out->push_back(std::move(*t));
    }
  }
  if (!master.empty() && master.size() != params.size()) {
    return absl::DataLossError(absl::StrCat(label, ": master weights for only some parameters"));
  }
  const TensorEntry* step = opt->Find("step");
  if (step == nullptr || step->dtype != "I64" || !step->shape.empty()) {
    return absl::DataLossError(absl::StrCat(label, ": missing or malformed I64 scalar \"step\""));
  }
  int64_t opt_step;
  std::memcpy(&opt_step, opt->Bytes(*step).data(), 8);
  if (opt_step != state->step) {
    return absl::DataLossError(absl::StrCat(label, ": optimizer step ", opt_step,
                                            " differs from trainer_state.json's step ",
                                            state->step));
  }
  if (opt->tensors().size() != 1 + m.size() + v.size() + master.size()) {
    return absl::DataLossError(absl::StrCat(label, ": holds tensors the model does not have"));
  }
  // Weights last: LoadModelWeights validates all of them before copying any.
  RETURN_IF_ERROR(LoadModelWeights(*weights, model));
  for (size_t i = 0; i < params.size(); ++i) {
    Tensor m_dst = optimizer.first_moments()[i], v_dst = optimizer.second_moments()[i];
    backend.CopyFromHost(m[i], m_dst);
    backend.CopyFromHost(v[i], v_dst);
    if (!master.empty()) model.parameter_store().CopyFromHost(params[i], master[i]);
  }
  optimizer.set_step(opt_step);
  return *state;
}

}  // namespace mamba::ckpt
