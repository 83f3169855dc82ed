// mamba-logits: the worker's forward on a checkpoint, for parity checks against transformers.
//   mamba-logits --checkpoint DIR --tokens IN.safetensors [--out OUT.safetensors]
//                [--reference REF.safetensors --tolerance 1e-4]
//   mamba-logits --random_tokens B,L --seed S --vocab V --tokens OUT.safetensors
// DIR holds config.json + model.safetensors (this worker's, transformers' or mamba_ssm's).
// Token files hold "input_ids" (B, L) as I64 or I32; logits files hold "logits" (B, L, V) F32.
#include <cmath>
#include <cstring>
#include <iostream>
#include <random>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "checkpoints/durable_io.h"
#include "checkpoints/hf_config.h"
#include "checkpoints/model_io.h"
#include "checkpoints/safetensors.h"
#include "worker/backend.h"
#include "worker/model.h"

ABSL_FLAG(std::string, checkpoint, "", "Directory with config.json and model.safetensors.");
ABSL_FLAG(std::string, tokens, "", "safetensors file with input_ids (B, L).");
ABSL_FLAG(std::string, out, "", "Where to write the logits (safetensors, \"logits\").");
ABSL_FLAG(std::string, reference, "", "Logits to compare with (safetensors, \"logits\").");
ABSL_FLAG(double, tolerance, 1e-4, "Largest accepted max|a-b| / max|b| against --reference.");
ABSL_FLAG(std::string, random_tokens, "", "B,L: write random tokens to --tokens and exit.");
ABSL_FLAG(int64_t, vocab, 16, "Vocabulary of --random_tokens.");
ABSL_FLAG(uint64_t, seed, 1, "Seed of --random_tokens.");

namespace {

using namespace mamba;

int Fail(const absl::Status& s) {
  std::cerr << "mamba-logits: error: " << s.message() << "\n";
  return 2;
}

absl::StatusOr<Tensor> ReadTokens(const std::string& path) {
  auto file = ckpt::SafetensorsReader::Open(path);
  if (!file.ok()) return file.status();
  const ckpt::TensorEntry* e = file->Find("input_ids");
  if (e == nullptr || e->shape.size() != 2 || (e->dtype != "I64" && e->dtype != "I32")) {
    return absl::InvalidArgumentError(path + ": needs input_ids, I64 or I32, shape (B, L)");
  }
  Tensor t = Tensor::Empty(e->shape, DType::kI32);
  const char* src = file->Bytes(*e).data();
  for (int64_t i = 0; i < t.numel(); ++i) {
    int64_t v = 0;
    if (e->dtype == "I64") {
      std::memcpy(&v, src + 8 * i, 8);
    } else {
      int32_t w;
      std::memcpy(&w, src + 4 * i, 4);
      v = w;
    }
    t.data<int32_t>()[i] = static_cast<int32_t>(v);
  }
  return t;
}

int WriteRandomTokens() {
  std::vector<std::string> parts = absl::StrSplit(absl::GetFlag(FLAGS_random_tokens), ',');
  int64_t B, L;
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &B) || !absl::SimpleAtoi(parts[1], &L)) {
    return Fail(absl::InvalidArgumentError("--random_tokens: expected B,L"));
  }
  Tensor t = Tensor::Empty({B, L}, DType::kI32);
  std::mt19937_64 rng(absl::GetFlag(FLAGS_seed));
  std::uniform_int_distribution<int32_t> dist(0, absl::GetFlag(FLAGS_vocab) - 1);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<int32_t>()[i] = dist(rng);
  ckpt::SafetensorsWriter w;
  w.Add("input_ids", t);
  absl::Status s = ckpt::WriteFileDurably(absl::GetFlag(FLAGS_tokens), w.Serialize());
  return s.ok() ? 0 : Fail(s);
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (!absl::GetFlag(FLAGS_random_tokens).empty()) return WriteRandomTokens();
  const std::string dir = absl::GetFlag(FLAGS_checkpoint);
  auto config = ckpt::ReadModelConfig(dir);
  if (!config.ok()) return Fail(config.status());
  auto backend = MakeCpuBackend();
  MambaModel model(*config, backend.get());
  if (absl::Status s = ckpt::ImportModel(dir, model); !s.ok()) return Fail(s);
  auto tokens = ReadTokens(absl::GetFlag(FLAGS_tokens));
  if (!tokens.ok()) return Fail(tokens.status());
  for (int64_t i = 0; i < tokens->numel(); ++i) {
    const int32_t v = tokens->data<int32_t>()[i];
    if (v < 0 || v >= config->vocab_size) {
      return Fail(absl::InvalidArgumentError(absl::StrCat("token ", v, " outside the vocabulary")));
    }
  }
  const int64_t B = tokens->dim(0), L = tokens->dim(1);
  Tensor logits = backend->ToHost(model.Logits(*tokens)).Reshape({B, L, config->vocab_size});
  if (const std::string out = absl::GetFlag(FLAGS_out); !out.empty()) {
    ckpt::SafetensorsWriter w;
    w.Add("logits", logits);
    if (absl::Status s = ckpt::WriteFileDurably(out, w.Serialize()); !s.ok()) return Fail(s);
  }
  if (const std::string ref_path = absl::GetFlag(FLAGS_reference); !ref_path.empty()) {
    auto ref_file = ckpt::SafetensorsReader::Open(ref_path);
    if (!ref_file.ok()) return Fail(ref_file.status());
    auto ref = ref_file->Load("logits", DType::kF32);
    if (!ref.ok()) return Fail(ref.status());
    if (ref->shape() != logits.shape()) {
      return Fail(absl::InvalidArgumentError(absl::StrCat(
          "reference shape ", ShapeString(ref->shape()), " vs ", ShapeString(logits.shape()))));
    }
    double max_diff = 0, max_ref = 0;
    for (int64_t i = 0; i < logits.numel(); ++i) {
      const double a = logits.data<float>()[i], b = ref->data<float>()[i];
      max_diff = std::max(max_diff, std::abs(a - b));
      max_ref = std::max(max_ref, std::abs(b));
    }
    const double rel = max_diff / std::max(max_ref, 1e-30);
    const bool ok = rel <= absl::GetFlag(FLAGS_tolerance);
    std::cout << "logits (" << B << ", " << L << ", " << config->vocab_size << "): max abs diff "
              << max_diff << ", max |ref| " << max_ref << ", relative error " << rel
              << (ok ? " PASS" : " FAIL") << "\n";
    return ok ? 0 : 1;
  }
  return 0;
}
