// Checkpoints: save/load round trips, import of transformers/mamba_ssm files, clear errors that
// leave the model untouched, atomic saves under injected crashes, and keep-last-K.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "checkpoints/checkpoint.h"
#include "checkpoints/durable_io.h"
#include "checkpoints/hf_config.h"
#include "checkpoints/model_io.h"
#include "checkpoints/safetensors.h"
#include "tests/test_util.h"

namespace mamba::ckpt {
namespace {

namespace fs = std::filesystem;

ModelConfig TinyConfig() {
  ModelConfig c;
  c.d_model = 16;
  c.n_layer = 2;
  c.vocab_size = 16;
  c.d_state = 4;
  c.dt_rank = 1;
  return c;
}

struct Fixture {
  std::unique_ptr<Backend> backend = MakeCpuBackend();
  MambaModel model{TinyConfig(), backend.get()};
  AdamWOptimizer opt{OptimizerConfig(), backend.get(), &model.parameter_store()};

  explicit Fixture(uint64_t seed) {
    model.Initialize(seed);
    // Moments and step as after some training.
    for (size_t i = 0; i < opt.first_moments().size(); ++i) {
      for (const Tensor* t : {&opt.first_moments()[i], &opt.second_moments()[i]}) {
        const auto v = testing::RandomVector(t->numel(), seed + 17 * i, 0, 1);
        std::copy(v.begin(), v.end(), t->data<float>());
      }
    }
    opt.set_step(7);
  }
  std::vector<std::vector<float>> Params() {
    std::vector<std::vector<float>> out;
    for (const Parameter& p : model.parameters()) {
      out.emplace_back(p.value.data<float>(), p.value.data<float>() + p.value.numel());
    }
    return out;
  }
};

// The trainer state at `step`; the fixture's optimizer is moved to the same step.
TrainerState State(int64_t step, Fixture& f) {
  f.opt.set_step(step);
  TrainerState s;
  s.step = step;
  s.next_lr = 1e-3;
  s.seed = 5;
  s.losses = {3.5, 3.25};
  s.job_spec = {{"name", "t"}};
  return s;
}

std::string TempRoot(const std::string& name) {
  const fs::path p =
      fs::temp_directory_path() / ("mamba_ckpt_test_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(p);
  return p.string();
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

TEST(Checkpoint, SaveLoadRoundTripIsExact) {
  const std::string root = TempRoot("roundtrip");
  Fixture a(1);
  auto dir = SaveCheckpoint(root, State(12, a), a.model, a.opt, *a.backend, {});
  ASSERT_TRUE(dir.ok()) << dir.status();
  EXPECT_EQ(fs::path(*dir).filename(), "step_00000012");
  for (const char* f :
       {"model.safetensors", "config.json", "optimizer.safetensors", "trainer_state.json"}) {
    EXPECT_TRUE(fs::exists(fs::path(*dir) / f)) << f;
  }
  // The tied lm_head is stored once; the config reads back as the same shape.
  auto weights = SafetensorsReader::Open(*dir + "/model.safetensors");
  ASSERT_TRUE(weights.ok());
  EXPECT_EQ(weights->Find("lm_head.weight"), nullptr);
  EXPECT_EQ(weights->tensors().size(), a.model.parameters().size());
  auto config = ReadModelConfig(*dir);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(CheckSameShape(*config, TinyConfig(), "c").ok());

  Fixture b(2);
  ASSERT_NE(a.Params(), b.Params());
  auto state = LoadCheckpoint(*dir, b.model, b.opt, *b.backend);
  ASSERT_TRUE(state.ok()) << state.status();
  EXPECT_EQ(state->step, 12);
  EXPECT_EQ(state->losses, (std::vector<double>{3.5, 3.25}));
  EXPECT_EQ(state->job_spec["name"], "t");
  EXPECT_EQ(a.Params(), b.Params());
  EXPECT_EQ(b.opt.step(), 12);
  for (size_t i = 0; i < a.opt.first_moments().size(); ++i) {
    const Tensor &ma = a.opt.first_moments()[i], &mb = b.opt.first_moments()[i];
    const Tensor &va = a.opt.second_moments()[i], &vb = b.opt.second_moments()[i];
    EXPECT_EQ(std::memcmp(ma.raw(), mb.raw(), ma.nbytes()), 0);
    EXPECT_EQ(std::memcmp(va.raw(), vb.raw(), va.nbytes()), 0);
  }
}

TEST(Checkpoint, Bf16WeightsKeepExactFp32MastersForResume) {
  const std::string root = TempRoot("bf16");
  Fixture a(3);
  SaveOptions o;
  o.bf16 = true;
  auto dir = SaveCheckpoint(root, State(7, a), a.model, a.opt, *a.backend, o);
  ASSERT_TRUE(dir.ok()) << dir.status();
  auto weights = SafetensorsReader::Open(*dir + "/model.safetensors");
  ASSERT_TRUE(weights.ok());
  EXPECT_EQ(weights->Find("backbone.embeddings.weight")->dtype, "BF16");
  auto config = ReadWholeFile(*dir + "/config.json");
  EXPECT_NE(config->find("\"bfloat16\""), std::string::npos);

  Fixture b(4);  // imported as bf16-rounded values ...
  ASSERT_TRUE(ImportModel(*dir, b.model).ok());
  EXPECT_NE(a.Params(), b.Params());
  Fixture c(5);  // ... resumed with the exact fp32 masters
  ASSERT_TRUE(LoadCheckpoint(*dir, c.model, c.opt, *c.backend).ok());
  EXPECT_EQ(a.Params(), c.Params());
}

// Writes dir/config.json and dir/model.safetensors from `a`'s weights as `edit` changes them.
void WriteImport(const std::string& dir, Fixture& a, const std::string& config_json,
                 const std::function<void(const std::string&, Tensor&, SafetensorsWriter&)>& add) {
  fs::create_directories(dir);
  WriteText(dir + "/config.json", config_json);
  SafetensorsWriter w;
  for (const Parameter& p : a.model.parameters()) {
    Tensor value = p.value;
    add(p.name, value, w);
  }
  WriteText(dir + "/model.safetensors", w.Serialize());
}

std::string HfConfigText() { return HfConfigJson(TinyConfig()).dump(); }

TEST(Import, MambaSsmNamesAndConfig) {
  const std::string dir = TempRoot("mamba_ssm");
  Fixture a(6);
  const std::string config = R"({"d_model": 16, "n_layer": 2, "vocab_size": 13,
      "ssm_cfg": {"d_state": 4, "dt_rank": 1}, "rms_norm": true, "residual_in_fp32": true,
      "fused_add_norm": true, "pad_vocab_size_multiple": 8, "tie_embeddings": true})";
  WriteImport(dir, a, config, [](const std::string& name, Tensor& t, SafetensorsWriter& w) {
    if (name == "backbone.embeddings.weight") {
      w.Add("backbone.embedding.weight", t);
      w.Add("lm_head.weight", t);  // mamba_ssm's state dict holds the tied head too
    } else {
      w.Add(name, t);
    }
  });
  Fixture b(7);
  const absl::Status s = ImportModel(dir, b.model);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(a.Params(), b.Params());
}

TEST(Import, TransformersF16AndBf16Weights) {
  const std::string dir = TempRoot("f16");
  Fixture a(8);
  WriteImport(dir, a, HfConfigText(), [](const std::string& name, Tensor& t, SafetensorsWriter& w) {
    if (name.find("layers.0") != std::string::npos) {
      std::string bytes(t.numel() * 2, '\0');  // F16 1.0 everywhere
      for (int64_t i = 0; i < t.numel(); ++i) {
        const uint16_t h = 0x3c00;  // 1.0
        std::memcpy(&bytes[2 * i], &h, 2);
      }
      w.AddRaw(name, "F16", t.shape(), bytes);
    } else {
      w.Add(name, t, /*as_bf16=*/true);
    }
  });
  Fixture b(9);
  ASSERT_TRUE(ImportModel(dir, b.model).ok());
  EXPECT_EQ(b.model.parameter("backbone.layers.0.mixer.D").value.data<float>()[0], 1.0f);
  const float x = a.model.parameter("backbone.norm_f.weight").value.data<float>()[0];
  EXPECT_EQ(b.model.parameter("backbone.norm_f.weight").value.data<float>()[0],
            Bf16ToFloat(FloatToBf16(x)));
}

// Each bad import names the file and the problem, and leaves the model as it was.
void ExpectImportError(
    const std::string& name, const std::string& config,
    const std::function<void(const std::string&, Tensor&, SafetensorsWriter&)>& add,
    const std::string& needle) {
  const std::string dir = TempRoot("bad_" + name);
  Fixture a(10);
  WriteImport(dir, a, config, add);
  Fixture b(11);
  const auto before = b.Params();
  const absl::Status s = ImportModel(dir, b.model);
  EXPECT_FALSE(s.ok()) << name;
  EXPECT_NE(s.message().find(needle), std::string::npos) << name << ": " << s;
  EXPECT_NE(s.message().find(dir), std::string::npos) << name << ": " << s;
  EXPECT_EQ(b.Params(), before) << name << ": model changed by a failed import";
}

TEST(Import, MismatchesAreClearErrorsAndChangeNothing) {
  auto plain = [](const std::string& n, Tensor& t, SafetensorsWriter& w) { w.Add(n, t); };
  const std::string cfg = HfConfigText();
  ExpectImportError(
      "shape", cfg,
      [](const std::string& n, Tensor& t, SafetensorsWriter& w) {
        w.Add(n, n == "backbone.layers.1.mixer.A_log" ? t.Reshape({t.numel()}) : t);
      },
      "model.safetensors: tensor \"backbone.layers.1.mixer.A_log\" has shape (128) but the "
      "model's");
  ExpectImportError(
      "missing", cfg,
      [](const std::string& n, Tensor& t, SafetensorsWriter& w) {
        if (n != "backbone.norm_f.weight") w.Add(n, t);
      },
      "missing tensor \"backbone.norm_f.weight\"");
  ExpectImportError(
      "extra", cfg,
      [](const std::string& n, Tensor& t, SafetensorsWriter& w) {
        w.Add(n, t);
        if (n == "backbone.norm_f.weight") w.Add("backbone.layers.0.mixer.in_proj.bias", t);
      },
      "unexpected tensor \"backbone.layers.0.mixer.in_proj.bias\"");
  ExpectImportError(
      "dtype", cfg,
      [](const std::string& n, Tensor& t, SafetensorsWriter& w) {
        if (n != "backbone.norm_f.weight") return w.Add(n, t);
        w.AddRaw(n, "I32", t.shape(), std::string(t.nbytes(), '\0'));
      },
      "tensor \"backbone.norm_f.weight\" has dtype I32");
  ExpectImportError(
      "untied", cfg,
      [](const std::string& n, Tensor& t, SafetensorsWriter& w) {
        w.Add(n, t);
        if (n == "backbone.norm_f.weight") {
          w.Add("lm_head.weight", Tensor::Zeros({16, 16}, DType::kF32));
        }
      },
      "lm_head.weight differs from the embeddings");
  ModelConfig wide = TinyConfig();
  wide.d_model = 32;
  ExpectImportError("config", HfConfigJson(wide).dump(), plain,
                    "config.json: hidden_size is 32 but the model has 16");
  ExpectImportError("bias", R"({"model_type":"mamba","hidden_size":16,"num_hidden_layers":2,
      "vocab_size":16,"state_size":4,"time_step_rank":1})",
                    plain, "use_bias: true is not supported");
  ExpectImportError("badjson", "{\"model_type\": ", plain, "config.json: not valid JSON");
}

TEST(Import, MissingConfigOrWeightsIsNotFound) {
  const std::string dir = TempRoot("missing_files");
  Fixture a(12);
  WriteImport(dir, a, HfConfigText(),
              [](const std::string& n, Tensor& t, SafetensorsWriter& w) { w.Add(n, t); });
  fs::remove(dir + "/config.json");
  absl::Status s = ImportModel(dir, a.model);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(s.message().find(dir + "/config.json: file not found"), std::string::npos) << s;
  WriteText(dir + "/config.json", HfConfigText());
  fs::remove(dir + "/model.safetensors");
  s = ImportModel(dir, a.model);
  EXPECT_NE(s.message().find(dir + "/model.safetensors: file not found"), std::string::npos) << s;
}

TEST(Checkpoint, CorruptCheckpointFilesAreClearErrors) {
  const std::string root = TempRoot("corrupt");
  Fixture a(13);
  auto dir = SaveCheckpoint(root, State(7, a), a.model, a.opt, *a.backend, {});
  ASSERT_TRUE(dir.ok());
  auto expect_error = [&](const std::string& file, const std::string& needle) {
    Fixture b(14);
    const auto before = b.Params();
    const absl::Status s = LoadCheckpoint(*dir, b.model, b.opt, *b.backend).status();
    EXPECT_NE(s.message().find(*dir + "/" + file), std::string::npos) << s;
    EXPECT_NE(s.message().find(needle), std::string::npos) << s;
    EXPECT_EQ(b.Params(), before);
    EXPECT_EQ(b.opt.step(), 7);  // the fixture's, not overwritten by the failed load
  };
  // Truncated weights.
  const std::string model_bytes = *ReadWholeFile(*dir + "/model.safetensors");
  WriteText(*dir + "/model.safetensors", model_bytes.substr(0, model_bytes.size() - 100));
  expect_error("model.safetensors", "out of range");
  WriteText(*dir + "/model.safetensors", model_bytes);
  // Bad JSON in the trainer state.
  const std::string state = *ReadWholeFile(*dir + "/trainer_state.json");
  WriteText(*dir + "/trainer_state.json", state.substr(0, state.size() / 2));
  expect_error("trainer_state.json", "not valid JSON");
  WriteText(*dir + "/trainer_state.json", state);
  // Optimizer without its step.
  const std::string opt_bytes = *ReadWholeFile(*dir + "/optimizer.safetensors");
  SafetensorsWriter w;
  auto reader = SafetensorsReader::Open(*dir + "/optimizer.safetensors");
  for (const TensorEntry& e : reader->tensors()) {
    if (e.name != "step") w.AddRaw(e.name, e.dtype, e.shape, std::string(reader->Bytes(e)));
  }
  WriteText(*dir + "/optimizer.safetensors", w.Serialize());
  expect_error("optimizer.safetensors", "\"step\"");
  WriteText(*dir + "/optimizer.safetensors", opt_bytes);
  Fixture ok(15);
  EXPECT_TRUE(LoadCheckpoint(*dir, ok.model, ok.opt, *ok.backend).ok());
}

// Files crafted by a hostile hand (issue 19's cases): each is answered with the file, the field
// and the rule, never a crash or an exception, and nothing is loaded.
std::string Nested(int depth, const std::string& inner) {
  return std::string(depth, '[') + inner + std::string(depth, ']');
}

TEST(Checkpoint, CraftedTrainerStatesAreClearErrors) {
  const std::string root = TempRoot("crafted");
  Fixture a(21);
  auto dir = SaveCheckpoint(root, State(7, a), a.model, a.opt, *a.backend, {});
  ASSERT_TRUE(dir.ok());
  const std::string good = *ReadWholeFile(*dir + "/trainer_state.json");
  const nlohmann::json base = nlohmann::json::parse(good);
  const auto with = [&](const std::string& key, const std::string& value_json) {
    nlohmann::json j = base;
    j.erase(key);
    std::string text = j.dump();
    text.insert(text.size() - 1, ",\"" + key + "\":" + value_json);
    return text;
  };
  const struct {
    std::string text, needle;
  } cases[] = {
      {with("data_cursor", "5"), "data_cursor.step: missing or of the wrong type"},
      {with("data_cursor", R"({"step": "x"})"), "data_cursor.step: missing or of the wrong type"},
      {with("step", "1e300"), "step: missing or of the wrong type"},
      {with("step", "18446744073709551615"), "step: missing or of the wrong type"},
      {with("step", "-3"), "step: missing or of the wrong type"},
      {with("next_lr", "\"fast\""), "next_lr: missing or of the wrong type"},
      {with("rng", "7"), "rng.seed: missing or of the wrong type"},
      {with("job_spec", "{\"x\":" + Nested(80000, "1") + "}"), "nested deeper than 64 levels"},
      {Nested(80000, ""), "nested deeper than 64 levels"},
  };
  for (const auto& c : cases) {
    WriteText(*dir + "/trainer_state.json", c.text);
    Fixture b(22);
    const auto before = b.Params();
    const absl::Status s = LoadCheckpoint(*dir, b.model, b.opt, *b.backend).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << c.needle << ": " << s;
    EXPECT_NE(s.message().find(*dir + "/trainer_state.json"), std::string::npos) << s;
    EXPECT_NE(s.message().find(c.needle), std::string::npos) << s;
    EXPECT_EQ(b.Params(), before);
  }
  WriteText(*dir + "/trainer_state.json", good);
  Fixture ok(23);
  EXPECT_TRUE(LoadCheckpoint(*dir, ok.model, ok.opt, *ok.backend).ok());
}

TEST(Import, CraftedConfigsAreClearErrors) {
  for (const std::string& text :
       {R"({"d_model":1,"n_layer":1,"vocab_size":1,"ssm_cfg":{"x":)" + Nested(80000, "") + "}}",
        R"({"model_type":)" + Nested(80000, "") + "}"}) {
    auto c = ParseModelConfigJson(text, "config.json");
    EXPECT_EQ(c.status().code(), absl::StatusCode::kDataLoss) << c.status();
    EXPECT_NE(c.status().message().find("config.json: JSON nested deeper than 64 levels"),
              std::string::npos)
        << c.status();
  }
  // A long wrong value is quoted short.
  auto c = ParseModelConfigJson(R"({"model_type":")" + std::string(100000, 'x') + R"("})",
                                "config.json");
  EXPECT_LT(c.status().message().size(), 200u) << c.status();
}

TEST(Safetensors, ElementCountsThatOverflowAreRefused) {
  // 2^62 x 2 x 0 bytes: zero bytes, but a count that leaves int64 on the way.
  SafetensorsWriter w;
  const std::string header = R"({"t":{"dtype":"U8","shape":[4611686018427387904,2,0],)"
                             R"("data_offsets":[0,0]}})";
  std::string bytes(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(bytes.data(), &n, 8);
  bytes += header;
  auto r = SafetensorsReader::Parse(bytes, "crafted.safetensors");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
  EXPECT_NE(r.status().message().find("tensor \"t\""), std::string::npos) << r.status();
  // And a header nested too deep.
  const std::string deep = R"({"__metadata__":)" + Nested(80000, "") + "}";
  std::string deep_bytes(8, '\0');
  const uint64_t m = deep.size();
  std::memcpy(deep_bytes.data(), &m, 8);
  deep_bytes += deep;
  r = SafetensorsReader::Parse(deep_bytes, "deep.safetensors");
  EXPECT_NE(r.status().message().find("nested deeper than 64 levels"), std::string::npos)
      << r.status();
}

TEST(Checkpoint, CrashAtAnyStageLeavesTheOldOrTheNewCheckpoint) {
  for (const std::string stage : {"model", "optimizer", "state", "config", "rename"}) {
    const std::string root = TempRoot("crash_" + stage);
    Fixture a(20);
    ASSERT_TRUE(SaveCheckpoint(root, State(1, a), a.model, a.opt, *a.backend, {}).ok());
    const auto old_params = a.Params();
    Fixture b(21);  // different weights for step 2
    SaveOptions o;
    o.fault = [&](std::string_view s) {
      return s == stage ? absl::AbortedError("injected crash") : absl::OkStatus();
    };
    EXPECT_FALSE(SaveCheckpoint(root, State(2, b), b.model, b.opt, *b.backend, o).ok()) << stage;

    auto latest = ResolveCheckpointDir(root);
    ASSERT_TRUE(latest.ok()) << latest.status();
    const bool renamed = stage == "rename";  // the crash came after the atomic rename
    EXPECT_EQ(fs::path(*latest).filename(), renamed ? "step_00000002" : "step_00000001") << stage;
    Fixture c(22);
    ASSERT_TRUE(LoadCheckpoint(*latest, c.model, c.opt, *c.backend).ok()) << stage;
    EXPECT_EQ(c.Params(), renamed ? b.Params() : old_params) << stage;
    auto list = ListCheckpoints(root);
    EXPECT_EQ(list->size(), renamed ? 2u : 1u) << stage;

    // The next save clears the crashed temporary.
    ASSERT_TRUE(SaveCheckpoint(root, State(3, b), b.model, b.opt, *b.backend, {}).ok());
    for (const auto& e : fs::directory_iterator(root)) {
      EXPECT_EQ(e.path().filename().string().rfind(".tmp", 0), std::string::npos)
          << "stale temporary " << e.path();
    }
  }
}

TEST(Checkpoint, KeepsTheLastKAndNeverTheProtectedOne) {
  const std::string root = TempRoot("keep");
  Fixture a(30);
  SaveOptions o;
  o.keep_last = 2;
  o.protect = root + "/step_00000001";
  for (int64_t step = 1; step <= 5; ++step) {
    ASSERT_TRUE(SaveCheckpoint(root, State(step, a), a.model, a.opt, *a.backend, o).ok());
  }
  auto list = ListCheckpoints(root);
  ASSERT_TRUE(list.ok());
  std::vector<int64_t> steps;
  for (const auto& [step, path] : *list) steps.push_back(step);
  EXPECT_EQ(steps, (std::vector<int64_t>{1, 4, 5}));

  o.protect.clear();
  ASSERT_TRUE(SaveCheckpoint(root, State(6, a), a.model, a.opt, *a.backend, o).ok());
  steps.clear();
  list = ListCheckpoints(root);
  for (const auto& [step, path] : *list) steps.push_back(step);
  EXPECT_EQ(steps, (std::vector<int64_t>{5, 6}));
}

TEST(Checkpoint, ResavingAStepReplacesIt) {
  const std::string root = TempRoot("resave");
  Fixture a(40), b(41);
  ASSERT_TRUE(SaveCheckpoint(root, State(3, a), a.model, a.opt, *a.backend, {}).ok());
  auto dir = SaveCheckpoint(root, State(3, b), b.model, b.opt, *b.backend, {});
  ASSERT_TRUE(dir.ok()) << dir.status();
  Fixture c(42);
  ASSERT_TRUE(LoadCheckpoint(*dir, c.model, c.opt, *c.backend).ok());
  EXPECT_EQ(c.Params(), b.Params());
  EXPECT_EQ(std::distance(fs::directory_iterator(root), fs::directory_iterator()), 1);
}

TEST(Checkpoint, ResolvesRootsAndStepDirs) {
  const std::string root = TempRoot("resolve");
  EXPECT_EQ(ResolveCheckpointDir(root).status().code(), absl::StatusCode::kNotFound);
  fs::create_directories(root + "/step_0000000x");  // not a step directory
  fs::create_directories(root + "/.tmp-step_9-1");  // a crashed save
  const absl::Status s = ResolveCheckpointDir(root).status();
  EXPECT_NE(s.message().find("no step_ checkpoint directories"), std::string::npos) << s;
  Fixture a(50);
  ASSERT_TRUE(SaveCheckpoint(root, State(10, a), a.model, a.opt, *a.backend, {}).ok());
  ASSERT_TRUE(SaveCheckpoint(root, State(9, a), a.model, a.opt, *a.backend, {}).ok());
  EXPECT_EQ(*ResolveCheckpointDir(root), root + "/step_00000010");
  EXPECT_EQ(*ResolveCheckpointDir(root + "/step_00000009"), root + "/step_00000009");
}

}  // namespace
}  // namespace mamba::ckpt
