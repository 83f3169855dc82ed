#include "checkpoints/model_io.h"

#include <cstring>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "checkpoints/hf_config.h"

namespace mamba::ckpt {
namespace {

constexpr char kEmbeddings[] = "backbone.embeddings.weight";
constexpr char kMambaSsmEmbedding[] = "backbone.embedding.weight";
constexpr char kLmHead[] = "lm_head.weight";

}  // namespace

void AddModelWeights(MambaModel& model, Backend& backend, bool bf16, SafetensorsWriter& writer) {
  for (const Parameter& p : model.parameters()) {
    writer.Add(p.name, backend.ToHost(p.value), bf16 && p.value.dtype() == DType::kF32);
  }
  writer.SetMetadata("format", "pt");  // transformers refuses files without a known format
}

absl::Status LoadModelWeights(const SafetensorsReader& file, MambaModel& model) {
  const std::string& label = file.label();
  std::map<std::string, const Parameter*> by_name;
  for (const Parameter& p : model.parameters()) by_name[p.name] = &p;

  std::map<std::string, Tensor> staged;  // parameter name -> host value
  Tensor lm_head;
  for (const TensorEntry& e : file.tensors()) {
    std::string name = e.name == kMambaSsmEmbedding ? kEmbeddings : e.name;
    const bool is_lm_head = name == kLmHead;
    const Parameter* p = is_lm_head ? by_name[kEmbeddings] : nullptr;
    if (!is_lm_head) {
      auto it = by_name.find(name);
      if (it == by_name.end()) {
        return absl::InvalidArgumentError(absl::StrCat(label, ": unexpected tensor \"", e.name,
                                                       "\": the model has no such parameter"));
      }
      p = it->second;
    }
    if (e.dtype != "F32" && e.dtype != "BF16" && e.dtype != "F16" && e.dtype != "F64") {
      return absl::InvalidArgumentError(absl::StrCat(label, ": tensor \"", e.name, "\" has dtype ",
                                                     e.dtype, "; expected F32, BF16, F16 or F64"));
    }
    if (e.shape != p->value.shape()) {
      return absl::InvalidArgumentError(
          absl::StrCat(label, ": tensor \"", e.name, "\" has shape ", ShapeString(e.shape),
                       " but the model's ", p->name, " is ", ShapeString(p->value.shape())));
    }
    if (!is_lm_head && staged.count(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat(label, ": both ", kEmbeddings, " and ", kMambaSsmEmbedding, " present"));
    }
    auto t = file.Load(e.name, p->value.dtype());
    if (!t.ok()) return t.status();
    (is_lm_head ? lm_head : staged[name]) = std::move(*t);
  }
  for (const Parameter& p : model.parameters()) {
    if (!staged.count(p.name)) {
      return absl::InvalidArgumentError(absl::StrCat(label, ": missing tensor \"", p.name, "\""));
    }
  }
  if (lm_head.defined()) {  // must be the tied embeddings; an untied head cannot be represented
    const Tensor& emb = staged[kEmbeddings];
    if (std::memcmp(lm_head.raw(), emb.raw(), emb.nbytes()) != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          label, ": lm_head.weight differs from the embeddings; the model's lm_head is tied"));
    }
  }
  for (const Parameter& p : model.parameters()) {
    model.parameter_store().CopyFromHost(p, staged[p.name]);
  }
  return absl::OkStatus();
}

absl::Status ImportModel(const std::string& dir, MambaModel& model) {
  auto config = ReadModelConfig(dir);
  if (!config.ok()) return config.status();
  absl::Status same = CheckSameShape(*config, model.config(), dir + "/config.json");
  if (!same.ok()) return same;
  auto file = SafetensorsReader::Open(dir + "/model.safetensors");
  if (!file.ok()) return file.status();
  return LoadModelWeights(*file, model);
}

}  // namespace mamba::ckpt
