#include "checkpoints/hf_config.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "checkpoints/durable_io.h"
#include "checkpoints/json_reader.h"
#include "worker/status_macros.h"

namespace mamba::ckpt {
namespace {

using nlohmann::json;

absl::Status Bad(const std::string& label, const std::string& field, const std::string& rule) {
  return absl::InvalidArgumentError(absl::StrCat(label, ": ", field, ": ", rule));
}

// An integer field in [1, 2^30]; `fallback` when absent (-1: required).
absl::StatusOr<int64_t> Int(const json& j, const std::string& field, int64_t fallback,
                            const std::string& label) {
  if (!j.contains(field) || j[field].is_null()) {
    if (fallback < 0) return Bad(label, field, "required");
    return fallback;
  }
  const json& v = j[field];
  if (!v.is_number_integer() || v.get<int64_t>() < 1 || v.get<int64_t>() > (int64_t{1} << 30)) {
    return Bad(label, field, absl::StrCat("must be an integer in [1, 2^30], got ", ShortJson(v)));
  }
  return v.get<int64_t>();
}

// A boolean field that the model supports only with value `required`.
absl::Status RequireBool(const json& j, const std::string& field, bool fallback, bool required,
                         const std::string& why, const std::string& label) {
  bool value = fallback;
  if (j.contains(field) && !j[field].is_null()) {
    if (!j[field].is_boolean()) return Bad(label, field, "must be true or false");
    value = j[field].get<bool>();
  }
  if (value != required) {
    return Bad(label, field, absl::StrCat(value ? "true" : "false", " is not supported: ", why));
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> ParseTransformers(const json& j, const std::string& label) {
  ModelConfig c;
  ASSIGN_OR_RETURN(c.d_model, Int(j, "hidden_size", -1, label));
  ASSIGN_OR_RETURN(c.n_layer, Int(j, "num_hidden_layers", -1, label));
  ASSIGN_OR_RETURN(c.vocab_size, Int(j, "vocab_size", -1, label));
  ASSIGN_OR_RETURN(c.d_state, Int(j, "state_size", 16, label));
  ASSIGN_OR_RETURN(c.d_conv, Int(j, "conv_kernel", 4, label));
  ASSIGN_OR_RETURN(c.expand, Int(j, "expand", 2, label));
  c.dt_rank = ModelConfig::DefaultDtRank(c.d_model);
  if (j.contains("time_step_rank") && !(j["time_step_rank"] == "auto")) {
    ASSIGN_OR_RETURN(c.dt_rank, Int(j, "time_step_rank", -1, label));
  }
  if (j.contains("intermediate_size")) {
    int64_t inner;
    ASSIGN_OR_RETURN(inner, Int(j, "intermediate_size", -1, label));
    if (inner != c.d_inner()) {
      return Bad(label, "intermediate_size",
                 absl::StrCat("must be expand * hidden_size = ", c.d_inner(), ", got ", inner));
    }
  }
  if (j.contains("layer_norm_epsilon")) {
    const json& e = j["layer_norm_epsilon"];
    if (!e.is_number() || !(e.get<double>() > 0 && e.get<double>() < 1)) {
      return Bad(label, "layer_norm_epsilon", "must be a number in (0, 1)");
    }
    c.norm_eps = e.get<double>();
  }
  if (j.contains("hidden_act") && j["hidden_act"] != "silu") {
    return Bad(label, "hidden_act",
               absl::StrCat("only \"silu\" is supported, got ", ShortJson(j["hidden_act"])));
  }
  // MambaConfig's defaults: use_bias true, use_conv_bias true, tie_word_embeddings true.
  RETURN_IF_ERROR(
      RequireBool(j, "use_bias", true, false, "the model's in_proj/out_proj have no bias", label));
  RETURN_IF_ERROR(
      RequireBool(j, "use_conv_bias", true, true, "the model's conv1d has a bias", label));
  RETURN_IF_ERROR(RequireBool(j, "tie_word_embeddings", true, true,
                              "the model's lm_head is tied to the embeddings", label));
  return c;
}

absl::StatusOr<ModelConfig> ParseMambaSsm(const json& j, const std::string& label) {
  ModelConfig c;
  ASSIGN_OR_RETURN(c.d_model, Int(j, "d_model", -1, label));
  ASSIGN_OR_RETURN(c.n_layer, Int(j, "n_layer", -1, label));
  int64_t vocab, multiple;
  ASSIGN_OR_RETURN(vocab, Int(j, "vocab_size", -1, label));
  ASSIGN_OR_RETURN(multiple, Int(j, "pad_vocab_size_multiple", 8, label));
  c.vocab_size = (vocab + multiple - 1) / multiple * multiple;  // as MambaLMHeadModel pads it
  const json ssm =
      j.contains("ssm_cfg") && j["ssm_cfg"].is_object() ? j["ssm_cfg"] : json::object();
  const std::string ssm_label = label + ": ssm_cfg";
  if (ssm.contains("layer") && ssm["layer"] != "Mamba1") {
    return Bad(ssm_label, "layer",
               absl::StrCat("only Mamba1 is supported, got ", ShortJson(ssm["layer"])));
  }
  ASSIGN_OR_RETURN(c.d_state, Int(ssm, "d_state", 16, ssm_label));
  ASSIGN_OR_RETURN(c.d_conv, Int(ssm, "d_conv", 4, ssm_label));
  ASSIGN_OR_RETURN(c.expand, Int(ssm, "expand", 2, ssm_label));
  c.dt_rank = ModelConfig::DefaultDtRank(c.d_model);
  if (ssm.contains("dt_rank") && !(ssm["dt_rank"] == "auto")) {
    ASSIGN_OR_RETURN(c.dt_rank, Int(ssm, "dt_rank", -1, ssm_label));
  }
  RETURN_IF_ERROR(
      RequireBool(ssm, "bias", false, false, "in_proj/out_proj have no bias", ssm_label));
  RETURN_IF_ERROR(RequireBool(ssm, "conv_bias", true, true, "conv1d has a bias", ssm_label));
  RETURN_IF_ERROR(RequireBool(j, "rms_norm", true, true, "the model uses RMSNorm", label));
  RETURN_IF_ERROR(RequireBool(j, "tie_embeddings", true, true, "lm_head is tied", label));
  if (j.contains("d_intermediate") && j["d_intermediate"] != 0) {
    return Bad(label, "d_intermediate", "MLP blocks are not supported; must be 0");
  }
  return c;
}

}  // namespace

json HfConfigJson(const ModelConfig& c, const std::string& dtype) {
  return json{
      {"architectures", {"MambaForCausalLM"}},
      {"model_type", "mamba"},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.d_model},
      {"state_size", c.d_state},
      {"num_hidden_layers", c.n_layer},
      {"layer_norm_epsilon", c.norm_eps},
      {"pad_token_id", 0},
      {"bos_token_id", 0},
      {"eos_token_id", 0},
      {"expand", c.expand},
      {"conv_kernel", c.d_conv},
      {"intermediate_size", c.d_inner()},
      {"use_bias", false},
      {"use_conv_bias", true},
      {"hidden_act", "silu"},
      {"initializer_range", 0.1},
      {"residual_in_fp32", true},
      {"time_step_rank", c.dt_rank},
      {"time_step_scale", 1.0},
      {"time_step_min", 0.001},
      {"time_step_max", 0.1},
      {"time_step_init_scheme", "random"},
      {"time_step_floor", 1e-4},
      // Only HF's own init reads it, but transformers 5.17 also applies it to out_proj weights it
      // has just loaded (dividing them by sqrt(n_layer)), so it must stay false here.
      {"rescale_prenorm_residual", false},
      {"use_cache", true},
      {"use_mambapy", false},
      {"tie_word_embeddings", true},
      {"dtype", dtype},        // transformers >= 4.56
      {"torch_dtype", dtype},  // older transformers
  };
}

absl::StatusOr<ModelConfig> ParseModelConfigJson(const std::string& text,
                                                 const std::string& label) {
  ASSIGN_OR_RETURN(const json j, ParseJsonBounded(text, label));
  if (!j.is_object()) return absl::DataLossError(absl::StrCat(label, ": not a JSON object"));
  if (j.contains("model_type")) {
    if (j["model_type"] != "mamba") {
      return Bad(label, "model_type",
                 absl::StrCat("must be \"mamba\", got ", ShortJson(j["model_type"])));
    }
    return ParseTransformers(j, label);
  }
  if (j.contains("d_model")) return ParseMambaSsm(j, label);
  return Bad(label, "model_type",
             "missing: neither a transformers MambaConfig nor a mamba_ssm config");
}

absl::StatusOr<ModelConfig> ReadModelConfig(const std::string& dir) {
  const std::string path = dir + "/config.json";
  auto text = ReadWholeFile(path);
  if (!text.ok()) return text.status();
  return ParseModelConfigJson(*text, path);
}

absl::Status CheckSameShape(const ModelConfig& found, const ModelConfig& expected,
                            const std::string& label) {
  const struct {
    const char* field;
    int64_t found, expected;
  } fields[] = {{"hidden_size", found.d_model, expected.d_model},
                {"num_hidden_layers", found.n_layer, expected.n_layer},
                {"vocab_size", found.vocab_size, expected.vocab_size},
                {"state_size", found.d_state, expected.d_state},
                {"conv_kernel", found.d_conv, expected.d_conv},
                {"expand", found.expand, expected.expand},
                {"time_step_rank", found.dt_rank, expected.dt_rank}};
  for (const auto& f : fields) {
    if (f.found != f.expected) {
      return absl::FailedPreconditionError(
          absl::StrCat(label, ": ", f.field, " is ", f.found, " but the model has ", f.expected));
    }
  }
  return absl::OkStatus();
}

}  // namespace mamba::ckpt
