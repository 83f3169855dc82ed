// Tests of the worker's datasets (worker/data): determinism, the synthetic tasks' structure, file
// windowing, and every validation error.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "proto/job.pb.h"
#include "worker/data/dataset.h"

namespace mamba::data {
namespace {

using mamba::v1::DataSpec;

// ---- helpers ------------------------------------------------------------------------------------

// Per process: ctest runs the tests of this binary as parallel processes, which must not write
// each other's files.
std::string TempPath(const std::string& name) {
  const std::string dir =
      ::testing::TempDir() + "mamba_test_data_" + std::to_string(::getpid()) + "/";
  std::filesystem::create_directories(dir);
  return dir + name;
}

std::string WriteFile(const std::string& name, const std::string& bytes) {
  const std::string path = TempPath(name);
  std::FILE* f = std::fopen(path.c_str(), "wb");
  EXPECT_NE(f, nullptr) << path;
  if (f == nullptr) return path;
  EXPECT_EQ(std::fwrite(bytes.data(), 1, bytes.size(), f), bytes.size());
  std::fclose(f);
  return path;
}

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(rng() & 0xff);
  return s;
}

std::string TokensToBytes(const std::vector<uint16_t>& tokens) {
  std::string s;
  for (uint16_t t : tokens) {
    s.push_back(static_cast<char>(t & 0xff));
    s.push_back(static_cast<char>(t >> 8));
  }
  return s;
}

DataSpec SelectiveCopying(int seq_len, int vocab, int num_data) {
  DataSpec spec;
  spec.mutable_selective_copying()->set_seq_len(seq_len);
  spec.mutable_selective_copying()->set_vocab_size(vocab);
  spec.mutable_selective_copying()->set_num_data_tokens(num_data);
  return spec;
}

DataSpec InductionHeads(int seq_len, int vocab) {
  DataSpec spec;
  spec.mutable_induction_heads()->set_seq_len(seq_len);
  spec.mutable_induction_heads()->set_vocab_size(vocab);
  return spec;
}

DataSpec TextFile(const std::string& path, int seq_len, double val_fraction) {
  DataSpec spec;
  spec.mutable_text_file()->set_path(path);
  spec.mutable_text_file()->set_seq_len(seq_len);
  spec.mutable_text_file()->set_val_fraction(val_fraction);
  return spec;
}

DataSpec TokenFile(const std::string& path, int seq_len, int vocab, double val_fraction) {
  DataSpec spec;
  spec.mutable_token_file()->set_path(path);
  spec.mutable_token_file()->set_seq_len(seq_len);
  spec.mutable_token_file()->set_vocab_size(vocab);
  spec.mutable_token_file()->set_val_fraction(val_fraction);
  return spec;
}

std::unique_ptr<Dataset> Make(const DataSpec& spec, uint64_t seed = 1234) {
  absl::StatusOr<std::unique_ptr<Dataset>> ds = MakeDataset(spec, seed);
  EXPECT_TRUE(ds.ok()) << ds.status();
  return ds.ok() ? std::move(*ds) : nullptr;
}

Batch Get(const Dataset& ds, Split split, int64_t step, int64_t first, int64_t count) {
  absl::StatusOr<Batch> b = ds.GetBatch(split, step, first, count, ds.seq_len());
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? *b : Batch{};
}

// The row `s` of a batch.
std::vector<int32_t> Row(const std::vector<int32_t>& v, int64_t seq_len, int64_t s) {
  return std::vector<int32_t>(v.begin() + s * seq_len, v.begin() + (s + 1) * seq_len);
}

void ExpectError(const absl::Status& status, absl::StatusCode code,
                 const std::vector<std::string>& substrings) {
  ASSERT_FALSE(status.ok());
  EXPECT_EQ(status.code(), code) << status;
  for (const std::string& s : substrings) {
    EXPECT_NE(std::string(status.message()).find(s), std::string::npos)
        << "'" << status.message() << "' lacks '" << s << "'";
  }
}

void ExpectSpecError(const DataSpec& spec, absl::StatusCode code,
                     const std::vector<std::string>& substrings) {
  absl::StatusOr<std::unique_ptr<Dataset>> ds = MakeDataset(spec, 1);
  ExpectError(ds.status(), code, substrings);
}

// Every kind of dataset, small, for the tests that apply to all of them.
std::vector<DataSpec> AllSpecs() {
  std::vector<uint16_t> tokens(3000);
  std::mt19937 rng(7);
  for (auto& t : tokens) t = static_cast<uint16_t>(rng() % 5000);
  return {SelectiveCopying(64, 10, 8), InductionHeads(64, 16),
          TextFile(WriteFile("all.txt", RandomBytes(4000, 3)), 32, 0.2),
          TokenFile(WriteFile("all.bin", TokensToBytes(tokens)), 32, 5000, 0.2)};
}

// ---- determinism --------------------------------------------------------------------------------

TEST(DataDeterminism, SameCallSameBatchAndSplitBatchesConcatenate) {
  for (const DataSpec& spec : AllSpecs()) {
    SCOPED_TRACE(spec.ShortDebugString());
    std::unique_ptr<Dataset> ds = Make(spec);
    ASSERT_NE(ds, nullptr);
    for (Split split : {Split::kTrain, Split::kValidation}) {
      const Batch a = Get(*ds, split, 5, 0, 8);
      const Batch b = Get(*ds, split, 5, 0, 8);
      ASSERT_EQ(a.count, 8);
      ASSERT_EQ(a.seq_len, ds->seq_len());
      ASSERT_EQ(a.inputs.size(), 8u * ds->seq_len());
      ASSERT_EQ(a.targets.size(), 8u * ds->seq_len());
      EXPECT_EQ(a.inputs, b.inputs);
      EXPECT_EQ(a.targets, b.targets);

      // Two ranks taking halves of the global batch see the same samples as one rank.
      const Batch lo = Get(*ds, split, 5, 0, 4);
      const Batch hi = Get(*ds, split, 5, 4, 4);
      std::vector<int32_t> inputs = lo.inputs, targets = lo.targets;
      inputs.insert(inputs.end(), hi.inputs.begin(), hi.inputs.end());
      targets.insert(targets.end(), hi.targets.begin(), hi.targets.end());
      EXPECT_EQ(inputs, a.inputs);
      EXPECT_EQ(targets, a.targets);

      // A rebuilt dataset (a resumed job) with the same seed gives the same batch.
      std::unique_ptr<Dataset> again = Make(spec);
      EXPECT_EQ(Get(*again, split, 5, 0, 8).inputs, a.inputs);
    }
  }
}

TEST(DataDeterminism, StepsSplitsSeedsAndSamplesDiffer) {
  for (const DataSpec& spec : AllSpecs()) {
    SCOPED_TRACE(spec.ShortDebugString());
    std::unique_ptr<Dataset> ds = Make(spec, 1234);
    std::unique_ptr<Dataset> other_seed = Make(spec, 1235);
    ASSERT_NE(ds, nullptr);
    ASSERT_NE(other_seed, nullptr);
    const Batch base = Get(*ds, Split::kTrain, 3, 0, 8);
    EXPECT_NE(Get(*ds, Split::kTrain, 4, 0, 8).inputs, base.inputs);
    EXPECT_NE(Get(*ds, Split::kValidation, 3, 0, 8).inputs, base.inputs);
    EXPECT_NE(Get(*other_seed, Split::kTrain, 3, 0, 8).inputs, base.inputs);
    // Samples within a batch are distinct too (not one sample repeated).
    EXPECT_NE(Row(base.inputs, base.seq_len, 0), Row(base.inputs, base.seq_len, 1));
  }
}

// ---- selective copying --------------------------------------------------------------------------

// Checks the layout documented in dataset.h for every sample; returns the first data positions.
std::vector<int64_t> CheckSelectiveCopying(const Batch& b, int vocab, int num_data) {
  std::vector<int64_t> first_positions;
  const int64_t context = b.seq_len - num_data;
  for (int64_t s = 0; s < b.count; ++s) {
    const std::vector<int32_t> in = Row(b.inputs, b.seq_len, s);
    const std::vector<int32_t> tgt = Row(b.targets, b.seq_len, s);
    std::vector<int32_t> data;
    for (int64_t i = 0; i < context; ++i) {
      EXPECT_NE(in[i], 1) << "marker in the context at " << i;
      EXPECT_EQ(tgt[i], kIgnoreIndex) << "target in the context at " << i;
      if (in[i] != 0) {
        EXPECT_GE(in[i], 2);
        EXPECT_LT(in[i], vocab);
        if (data.empty()) first_positions.push_back(i);
        data.push_back(in[i]);
      }
    }
    EXPECT_EQ(static_cast<int>(data.size()), num_data) << "sample " << s;
    if (static_cast<int>(data.size()) != num_data) continue;
    for (int j = 0; j < num_data; ++j) {
      EXPECT_EQ(in[context + j], 1) << "marker expected at " << context + j;
      EXPECT_EQ(tgt[context + j], data[j]) << "answer " << j;
    }
  }
  return first_positions;
}

TEST(SelectiveCopying, Structure) {
  std::unique_ptr<Dataset> ds = Make(SelectiveCopying(64, 10, 8));
  ASSERT_NE(ds, nullptr);
  EXPECT_EQ(ds->vocab_size(), 10);
  EXPECT_EQ(ds->seq_len(), 64);
  EXPECT_TRUE(ds->has_accuracy());
  const Batch b = Get(*ds, Split::kTrain, 0, 0, 64);
  const std::vector<int64_t> firsts = CheckSelectiveCopying(b, 10, 8);
  // Positions are random, not a fixed pattern, and every data token value occurs.
  EXPECT_GT(std::set<int64_t>(firsts.begin(), firsts.end()).size(), 5u);
  std::set<int32_t> values(b.inputs.begin(), b.inputs.end());
  for (int32_t v = 0; v < 10; ++v) EXPECT_TRUE(values.count(v)) << "token " << v << " never seen";
}

TEST(SelectiveCopying, DefaultsArePaperSettings) {
  DataSpec spec;
  spec.mutable_selective_copying();
  std::unique_ptr<Dataset> ds = Make(spec);
  ASSERT_NE(ds, nullptr);
  EXPECT_EQ(ds->seq_len(), 4096);
  EXPECT_EQ(ds->vocab_size(), 16);
  CheckSelectiveCopying(Get(*ds, Split::kTrain, 0, 0, 8), 16, 16);
}

TEST(SelectiveCopying, TightAndOtherLengths) {
  // seq_len == 2 * num_data_tokens: every context position holds a data token.
  std::unique_ptr<Dataset> tight = Make(SelectiveCopying(8, 3, 4));
  ASSERT_NE(tight, nullptr);
  const Batch b = Get(*tight, Split::kTrain, 0, 0, 4);
  CheckSelectiveCopying(b, 3, 4);
  for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(b.inputs[i], 2);

  std::unique_ptr<Dataset> ds = Make(SelectiveCopying(64, 10, 8));
  ASSERT_NE(ds, nullptr);
  absl::StatusOr<Batch> longer = ds->GetBatch(Split::kValidation, 0, 0, 4, 200);
  ASSERT_TRUE(longer.ok()) << longer.status();
  CheckSelectiveCopying(*longer, 10, 8);
  ExpectError(ds->GetBatch(Split::kValidation, 0, 0, 4, 15).status(),
              absl::StatusCode::kInvalidArgument, {"seq_len", "16", "15"});
}

// ---- induction heads ----------------------------------------------------------------------------

// Checks the layout documented in dataset.h; returns the first trigger positions.
std::vector<int64_t> CheckInductionHeads(const Batch& b, int vocab) {
  std::vector<int64_t> triggers_at;
  const int32_t trigger = vocab - 1;
  const int64_t L = b.seq_len;
  for (int64_t s = 0; s < b.count; ++s) {
    const std::vector<int32_t> in = Row(b.inputs, L, s);
    const std::vector<int32_t> tgt = Row(b.targets, L, s);
    EXPECT_EQ(std::count(in.begin(), in.end(), trigger), 2) << "sample " << s;
    EXPECT_EQ(in[L - 1], trigger);
    for (int32_t t : in) {
      EXPECT_GE(t, 0);
      EXPECT_LT(t, vocab);
    }
    const int64_t p = std::find(in.begin(), in.end(), trigger) - in.begin();
    EXPECT_LT(p + 1, L - 1);
    if (p + 1 >= L - 1) continue;
    triggers_at.push_back(p);
    EXPECT_EQ(tgt[L - 1], in[p + 1]);
    EXPECT_NE(tgt[L - 1], trigger);
    for (int64_t i = 0; i + 1 < L; ++i) EXPECT_EQ(tgt[i], kIgnoreIndex) << "position " << i;
  }
  return triggers_at;
}

TEST(InductionHeads, StructureAtSeveralLengths) {
  DataSpec spec;
  spec.mutable_induction_heads();  // paper defaults
  std::unique_ptr<Dataset> ds = Make(spec);
  ASSERT_NE(ds, nullptr);
  EXPECT_EQ(ds->seq_len(), 256);
  EXPECT_EQ(ds->vocab_size(), 16);
  EXPECT_TRUE(ds->has_accuracy());
  for (int64_t L : {4, 64, 256, 4096}) {
    SCOPED_TRACE(L);
    absl::StatusOr<Batch> b = ds->GetBatch(Split::kValidation, 2, 0, 32, L);
    ASSERT_TRUE(b.ok()) << b.status();
    const std::vector<int64_t> p = CheckInductionHeads(*b, 16);
    EXPECT_GT(std::set<int64_t>(p.begin(), p.end()).size(), 1u);
  }
  ExpectError(ds->GetBatch(Split::kTrain, 0, 0, 1, 3).status(), absl::StatusCode::kInvalidArgument,
              {"seq_len", "at least 4", "got 3"});
}

TEST(InductionHeads, AnswersCoverTheVocabulary) {
  std::unique_ptr<Dataset> ds = Make(InductionHeads(64, 6));
  ASSERT_NE(ds, nullptr);
  const Batch b = Get(*ds, Split::kTrain, 0, 0, 200);
  CheckInductionHeads(b, 6);
  std::set<int32_t> answers;
  for (int64_t s = 0; s < b.count; ++s) answers.insert(b.targets[s * 64 + 63]);
  EXPECT_EQ(answers, (std::set<int32_t>{0, 1, 2, 3, 4}));
}

// ---- file datasets ------------------------------------------------------------------------------

// Finds where `row` (inputs, then the last target) lies in `stream`; -1 if nowhere.
template <typename T>
int64_t FindWindow(const std::vector<T>& stream, const std::vector<int32_t>& inputs,
                   const std::vector<int32_t>& targets) {
  const int64_t L = static_cast<int64_t>(inputs.size());
  for (int64_t start = 0; start + L + 1 <= static_cast<int64_t>(stream.size()); ++start) {
    bool match = true;
    for (int64_t i = 0; i < L && match; ++i) match = stream[start + i] == inputs[i];
    if (match && stream[start + L] == targets[L - 1]) return start;
  }
  return -1;
}

// Checks shifted targets and that each window lies in [begin, end); returns the window starts.
template <typename T>
std::vector<int64_t> CheckWindows(const Batch& b, const std::vector<T>& stream, int64_t begin,
                                  int64_t end) {
  std::vector<int64_t> starts;
  for (int64_t s = 0; s < b.count; ++s) {
    const std::vector<int32_t> in = Row(b.inputs, b.seq_len, s);
    const std::vector<int32_t> tgt = Row(b.targets, b.seq_len, s);
    for (int64_t i = 0; i + 1 < b.seq_len; ++i) EXPECT_EQ(tgt[i], in[i + 1]) << "position " << i;
    const int64_t start = FindWindow(stream, in, tgt);
    EXPECT_GE(start, begin) << "sample " << s;
    EXPECT_LE(start + b.seq_len + 1, end) << "sample " << s;
    starts.push_back(start);
  }
  return starts;
}

TEST(TextFile, WindowsStayInTheirRegion) {
  // Random bytes: a 32-byte window occurs once, so its position is known.
  const std::string bytes = RandomBytes(1000, 11);
  const std::vector<uint8_t> stream(bytes.begin(), bytes.end());
  std::unique_ptr<Dataset> ds = Make(TextFile(WriteFile("text.txt", bytes), 32, 0.25));
  ASSERT_NE(ds, nullptr);
  EXPECT_EQ(ds->vocab_size(), 256);
  EXPECT_EQ(ds->seq_len(), 32);
  EXPECT_FALSE(ds->has_accuracy());
  std::set<int64_t> train_starts, val_starts;
  for (int64_t step = 0; step < 8; ++step) {
    for (int64_t s : CheckWindows(Get(*ds, Split::kTrain, step, 0, 16), stream, 0, 750)) {
      train_starts.insert(s);
    }
    for (int64_t s : CheckWindows(Get(*ds, Split::kValidation, step, 0, 16), stream, 750, 1000)) {
      val_starts.insert(s);
    }
  }
  // Starts are spread over each region, reaching near both ends.
  EXPECT_LT(*train_starts.begin(), 50);
  EXPECT_GT(*train_starts.rbegin(), 750 - 33 - 50);
  EXPECT_LT(*val_starts.begin(), 750 + 30);
  EXPECT_GT(*val_starts.rbegin(), 1000 - 33 - 30);
}

TEST(TextFile, DefaultsAndZeroValFraction) {
  const std::string bytes = RandomBytes(3000, 12);
  const std::vector<uint8_t> stream(bytes.begin(), bytes.end());
  DataSpec spec;
  spec.mutable_text_file()->set_path(WriteFile("defaults.txt", bytes));
  std::unique_ptr<Dataset> ds = Make(spec);  // seq_len 256, val_fraction 0.1
  ASSERT_NE(ds, nullptr);
  EXPECT_EQ(ds->seq_len(), 256);
  CheckWindows(Get(*ds, Split::kTrain, 0, 0, 4), stream, 0, 2700);
  CheckWindows(Get(*ds, Split::kValidation, 0, 0, 4), stream, 2700, 3000);

  // val_fraction 0: validation draws from the whole file, which is the train region.
  std::unique_ptr<Dataset> all = Make(TextFile(spec.text_file().path(), 64, 0.0));
  ASSERT_NE(all, nullptr);
  CheckWindows(Get(*all, Split::kValidation, 0, 0, 16), stream, 0, 3000);
}

TEST(TokenFile, WindowsStayInTheirRegion) {
  std::vector<uint16_t> tokens(2000);
  std::mt19937 rng(5);
  for (auto& t : tokens) t = static_cast<uint16_t>(rng() % 60000);
  tokens[0] = 59999;  // the largest allowed token
  std::unique_ptr<Dataset> ds =
      Make(TokenFile(WriteFile("tokens.bin", TokensToBytes(tokens)), 64, 60000, 0.1));
  ASSERT_NE(ds, nullptr);
  EXPECT_EQ(ds->vocab_size(), 60000);
  EXPECT_EQ(ds->seq_len(), 64);
  EXPECT_FALSE(ds->has_accuracy());
  const Batch train = Get(*ds, Split::kTrain, 1, 0, 32);
  CheckWindows(train, tokens, 0, 1800);
  CheckWindows(Get(*ds, Split::kValidation, 1, 0, 32), tokens, 1800, 2000);
  // Tokens above 255 came through: the file is read as little-endian uint16.
  EXPECT_GT(*std::max_element(train.inputs.begin(), train.inputs.end()), 255);
}

TEST(FileDatasets, ShorterEvalLengthWorksLongerFailsCleanly) {
  std::unique_ptr<Dataset> ds =
      Make(TextFile(WriteFile("eval.txt", RandomBytes(1000, 4)), 32, 0.25));
  ASSERT_NE(ds, nullptr);
  EXPECT_TRUE(ds->GetBatch(Split::kValidation, 0, 0, 2, 249).ok());
  ExpectError(ds->GetBatch(Split::kValidation, 0, 0, 2, 250).status(),
              absl::StatusCode::kInvalidArgument, {"seq_len", "validation", "250"});
  EXPECT_TRUE(ds->GetBatch(Split::kTrain, 0, 0, 2, 749).ok());
  ExpectError(ds->GetBatch(Split::kTrain, 0, 0, 2, 750).status(),
              absl::StatusCode::kInvalidArgument, {"seq_len", "train", "750"});
}

// ---- errors -------------------------------------------------------------------------------------

TEST(DataErrors, NoSource) {
  ExpectSpecError(DataSpec(), absl::StatusCode::kInvalidArgument, {"data", "selective_copying"});
}

TEST(DataErrors, SelectiveCopying) {
  using absl::StatusCode;
  ExpectSpecError(SelectiveCopying(64, 2, 8), StatusCode::kInvalidArgument,
                  {"data.selective_copying.vocab_size", "at least 3", "got 2"});
  ExpectSpecError(SelectiveCopying(64, 10, 0), StatusCode::kInvalidArgument,
                  {"data.selective_copying.num_data_tokens", "at least 1", "got 0"});
  // num_data_tokens too large for the length: the rule ties the two fields; both are named.
  ExpectSpecError(SelectiveCopying(64, 10, 33), StatusCode::kInvalidArgument,
                  {"data.selective_copying.seq_len", "2 * num_data_tokens = 66", "got 64"});
  ExpectSpecError(SelectiveCopying(-5, 10, 1), StatusCode::kInvalidArgument,
                  {"data.selective_copying.seq_len", "got -5"});
  DataSpec defaults_too_many;  // seq_len defaults to 4096
  defaults_too_many.mutable_selective_copying()->set_num_data_tokens(3000);
  ExpectSpecError(defaults_too_many, StatusCode::kInvalidArgument,
                  {"data.selective_copying.seq_len", "num_data_tokens", "got 4096"});
}

TEST(DataErrors, InductionHeads) {
  ExpectSpecError(InductionHeads(2, 16), absl::StatusCode::kInvalidArgument,
                  {"data.induction_heads.seq_len: must be at least 4, got 2"});
  ExpectSpecError(InductionHeads(64, 2), absl::StatusCode::kInvalidArgument,
                  {"data.induction_heads.vocab_size", "got 2"});
  ExpectSpecError(InductionHeads(64, -1), absl::StatusCode::kInvalidArgument,
                  {"data.induction_heads.vocab_size", "got -1"});
}

TEST(DataErrors, TextFile) {
  using absl::StatusCode;
  const std::string missing = TempPath("does_not_exist.txt");
  ExpectSpecError(TextFile(missing, 32, 0.1), StatusCode::kNotFound,
                  {"data.text_file.path", missing});
  ExpectSpecError(TextFile("", 32, 0.1), StatusCode::kInvalidArgument,
                  {"data.text_file.path", "required"});
  const std::string empty = WriteFile("empty.txt", "");
  ExpectSpecError(TextFile(empty, 32, 0.1), StatusCode::kInvalidArgument,
                  {"data.text_file.path", empty, "empty"});
  const std::string dir = TempPath("a_directory");
  std::filesystem::create_directories(dir);
  ExpectSpecError(TextFile(dir, 32, 0.1), StatusCode::kInvalidArgument,
                  {"data.text_file.path", "not a regular file"});

  const std::string path = WriteFile("small.txt", RandomBytes(1000, 1));
  ExpectSpecError(TextFile(path, 0, 0.1), StatusCode::kInvalidArgument,
                  {"data.text_file.seq_len", "got 0"});
  // At val_fraction 0.5 the train region holds 500 bytes: too short for windows of 900.
  EXPECT_TRUE(MakeDataset(TextFile(path, 99, 0.1), 1).ok());
  ExpectSpecError(TextFile(path, 900, 0.5), StatusCode::kInvalidArgument,
                  {"data.text_file.seq_len", "train region (500 of 1000"});
  // The validation region (10 bytes) is too short for windows of 32.
  ExpectSpecError(TextFile(path, 32, 0.01), StatusCode::kInvalidArgument,
                  {"data.text_file.val_fraction", "validation region (10 of 1000"});
  for (double bad : {-0.1, 1.0, 2.0, std::nan("")}) {
    ExpectSpecError(TextFile(path, 32, bad), StatusCode::kInvalidArgument,
                    {"data.text_file.val_fraction", "[0, 1)"});
  }
}

TEST(DataErrors, TokenFile) {
  using absl::StatusCode;
  const std::vector<uint16_t> tokens = {1, 2, 3, 9, 4, 12, 5};
  const std::string path = WriteFile("bad_token.bin", TokensToBytes(tokens));
  // Token 3 (byte offset 6) is the first one >= 9.
  ExpectSpecError(TokenFile(path, 2, 9, 0.0), StatusCode::kInvalidArgument,
                  {"data.token_file", "token 3", "byte offset 6", "is 9", "vocab_size = 9"});
  EXPECT_TRUE(MakeDataset(TokenFile(path, 2, 13, 0.0), 1).ok());

  const std::string odd = WriteFile("odd.bin", std::string(7, '\1'));
  ExpectSpecError(TokenFile(odd, 2, 1000, 0.0), StatusCode::kInvalidArgument,
                  {"data.token_file.path", "odd size", "7 bytes"});
  const std::string missing = TempPath("missing.bin");
  ExpectSpecError(TokenFile(missing, 2, 1000, 0.0), StatusCode::kNotFound,
                  {"data.token_file.path", missing});
  const std::string empty = WriteFile("empty.bin", "");
  ExpectSpecError(TokenFile(empty, 2, 1000, 0.0), StatusCode::kInvalidArgument,
                  {"data.token_file.path", "empty"});
  for (int bad_vocab : {0, -3, 65537}) {
    ExpectSpecError(TokenFile(path, 2, bad_vocab, 0.0), StatusCode::kInvalidArgument,
                    {"data.token_file.vocab_size", "[1, 65536]"});
  }
  ExpectSpecError(TokenFile(path, -1, 13, 0.0), StatusCode::kInvalidArgument,
                  {"data.token_file.seq_len", "got -1"});
  ExpectSpecError(TokenFile(path, 7, 13, 0.0), StatusCode::kInvalidArgument,
                  {"data.token_file.seq_len", "seq_len + 1 = 8"});
  ExpectSpecError(TokenFile(path, 2, 13, 1.5), StatusCode::kInvalidArgument,
                  {"data.token_file.val_fraction", "got 1.5"});
  ExpectSpecError(TokenFile(path, 2, 13, -0.5), StatusCode::kInvalidArgument,
                  {"data.token_file.val_fraction"});
}

TEST(DataErrors, BadBatchArguments) {
  for (const DataSpec& spec : AllSpecs()) {
    SCOPED_TRACE(spec.ShortDebugString());
    std::unique_ptr<Dataset> ds = Make(spec);
    ASSERT_NE(ds, nullptr);
    const int64_t L = ds->seq_len();
    ExpectError(ds->GetBatch(Split::kTrain, -1, 0, 1, L).status(),
                absl::StatusCode::kInvalidArgument, {"step"});
    ExpectError(ds->GetBatch(Split::kTrain, 0, -1, 1, L).status(),
                absl::StatusCode::kInvalidArgument, {"first"});
    ExpectError(ds->GetBatch(Split::kTrain, 0, 0, -1, L).status(),
                absl::StatusCode::kInvalidArgument, {"count"});
    ExpectError(ds->GetBatch(Split::kTrain, 0, 0, 1, 0).status(),
                absl::StatusCode::kInvalidArgument, {"seq_len"});
    ExpectError(ds->GetBatch(Split::kTrain, 0, std::numeric_limits<int64_t>::max(), 2, L).status(),
                absl::StatusCode::kInvalidArgument, {"first"});
    // Far too large to allocate: an error, not an abort.
    ExpectError(ds->GetBatch(Split::kTrain, 0, 0, int64_t{1} << 40, L).status(),
                absl::StatusCode::kInvalidArgument, {"count * seq_len"});
    absl::StatusOr<Batch> none = ds->GetBatch(Split::kTrain, 0, 0, 0, L);
    ASSERT_TRUE(none.ok()) << none.status();
    EXPECT_TRUE(none->inputs.empty());
  }
}

}  // namespace
}  // namespace mamba::data
