#include "worker/data/windowed.h"

#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "worker/data/rng.h"
#include "worker/data/sources.h"

namespace mamba::data {
namespace {

struct Region {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
};

class Windowed : public Dataset {
 public:
  Windowed(WindowedOptions options, std::vector<uint16_t> tokens, Region train, Region val)
      : options_(std::move(options)), tokens_(std::move(tokens)), train_(train), val_(val) {}

  std::string name() const override { return options_.name; }
  int32_t vocab_size() const override { return options_.vocab_size; }
  int64_t seq_len() const override { return options_.seq_len; }
  bool has_accuracy() const override { return false; }

  absl::StatusOr<Batch> GetBatch(Split split, int64_t step, int64_t first, int64_t count,
                                 int64_t seq_len) const override {
    const Region region = split == Split::kTrain ? train_ : val_;
    if (seq_len < 1 || seq_len + 1 > region.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(options_.name, ": seq_len must be in [1, ", region.size() - 1, "] (the ",
                       split == Split::kTrain ? "train" : "validation", " region holds ",
                       region.size(), " tokens and a window needs seq_len + 1), got ", seq_len));
    }
    absl::StatusOr<Batch> batch = NewBatch(options_.name, step, first, count, seq_len);
    if (!batch.ok()) return batch.status();
    // Window starts s with s + seq_len + 1 <= region.end.
    const uint64_t starts = static_cast<uint64_t>(region.size() - seq_len);
    for (int64_t s = 0; s < count; ++s) {
      SampleRng rng(options_.seed, split, step, first + s, seq_len);
      const uint16_t* w = tokens_.data() + region.begin + static_cast<int64_t>(rng.Uniform(starts));
      int32_t* in = batch->inputs.data() + s * seq_len;
      int32_t* tgt = batch->targets.data() + s * seq_len;
      for (int64_t i = 0; i < seq_len; ++i) {
        in[i] = w[i];
        tgt[i] = w[i + 1];
      }
    }
    return batch;
  }

 private:
  WindowedOptions options_;
  std::vector<uint16_t> tokens_;
  Region train_, val_;
};

}  // namespace

absl::Status CheckValFraction(const std::string& field, double val_fraction) {
  if (!std::isfinite(val_fraction) || val_fraction < 0 || val_fraction >= 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": must be in [0, 1), got ", val_fraction));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Dataset>> MakeWindowed(const WindowedOptions& options,
                                                      std::vector<uint16_t> tokens) {
  const std::string& p = options.name;
  if (absl::Status s = CheckValFraction(absl::StrCat(p, ".val_fraction"), options.val_fraction);
      !s.ok()) {
    return s;
  }
  if (options.seq_len < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(p, ".seq_len: must be at least 1, got ", options.seq_len));
  }
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t need = options.seq_len + 1;
  const int64_t train_end =
      static_cast<int64_t>(std::floor(static_cast<double>(n) * (1.0 - options.val_fraction)));
  const Region train{0, train_end};
  // val_fraction 0 holds nothing out: validation then reuses the train region (a loss on seen
  // data, but the job still runs; the user asked for no held-out set).
  const Region val = options.val_fraction > 0 ? Region{train_end, n} : train;
  if (train.size() < need) {
    return absl::InvalidArgumentError(
        absl::StrCat(p, ".seq_len: the train region (", train.size(), " of ", n,
                     " tokens) must hold at least seq_len + 1 = ", need, " tokens"));
  }
  if (val.size() < need) {
    return absl::InvalidArgumentError(absl::StrCat(p, ".val_fraction: the validation region (",
                                                   val.size(), " of ", n,
                                                   " tokens at val_fraction ", options.val_fraction,
                                                   ") must hold at least seq_len + 1 = ", need,
                                                   " tokens; raise val_fraction or lower seq_len"));
  }
  return std::make_unique<Windowed>(options, std::move(tokens), train, val);
}

}  // namespace mamba::data
