// Selective copying (Mamba paper, section 4.1.1); the layout is documented in dataset.h.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "worker/data/rng.h"
#include "worker/data/sources.h"

namespace mamba::data {
namespace {

constexpr int32_t kNoise = 0;
constexpr int32_t kMarker = 1;
constexpr int32_t kFirstDataToken = 2;

class SelectiveCopying : public Dataset {
 public:
  SelectiveCopying(int64_t seq_len, int32_t vocab_size, int64_t num_data_tokens, uint64_t seed)
      : seq_len_(seq_len), vocab_size_(vocab_size), num_data_(num_data_tokens), seed_(seed) {}

  std::string name() const override { return "selective_copying"; }
  int32_t vocab_size() const override { return vocab_size_; }
  int64_t seq_len() const override { return seq_len_; }
  bool has_accuracy() const override { return true; }

  absl::StatusOr<Batch> GetBatch(Split split, int64_t step, int64_t first, int64_t count,
                                 int64_t seq_len) const override {
    // Evaluation lengths may differ from the training length; the context must still hold the
    // data tokens at distinct positions.
    if (seq_len < 2 * num_data_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "selective_copying: seq_len must be at least 2 * num_data_tokens = ", 2 * num_data_,
          ", got ", seq_len));
    }
    absl::StatusOr<Batch> batch = NewBatch(name(), step, first, count, seq_len);
    if (!batch.ok()) return batch.status();
    const int64_t context = seq_len - num_data_;
    std::vector<char> is_data(context);
    for (int64_t s = 0; s < count; ++s) {
      SampleRng rng(seed_, split, step, first + s, seq_len);
      // Floyd's algorithm: num_data_ distinct positions in [0, context) with exactly num_data_
      // draws, whatever collisions happen.
      std::fill(is_data.begin(), is_data.end(), 0);
      for (int64_t j = context - num_data_; j < context; ++j) {
        const int64_t t = static_cast<int64_t>(rng.Uniform(j + 1));
        is_data[is_data[t] ? j : t] = 1;
      }
      int32_t* in = batch->inputs.data() + s * seq_len;
      int32_t* tgt = batch->targets.data() + s * seq_len;
      const uint64_t data_vocab = static_cast<uint64_t>(vocab_size_ - kFirstDataToken);
      int64_t k = 0;  // data tokens placed so far, in order of position
      for (int64_t i = 0; i < context; ++i) {
        if (!is_data[i]) {
          in[i] = kNoise;
          continue;
        }
        in[i] = kFirstDataToken + static_cast<int32_t>(rng.Uniform(data_vocab));
        // The k-th marker answers with the k-th data token.
        tgt[context + k] = in[i];
        ++k;
      }
      for (int64_t i = context; i < seq_len; ++i) in[i] = kMarker;
    }
    return batch;
  }

 private:
  int64_t seq_len_;
  int32_t vocab_size_;
  int64_t num_data_;
  uint64_t seed_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Dataset>> MakeSelectiveCopying(
    const mamba::v1::SelectiveCopyingSpec& spec, uint64_t seed) {
  const int64_t seq_len = spec.has_seq_len() ? spec.seq_len() : 4096;
  const int64_t vocab = spec.has_vocab_size() ? spec.vocab_size() : 16;
  const int64_t num_data = spec.has_num_data_tokens() ? spec.num_data_tokens() : 16;
  if (vocab < 3) {
    return absl::InvalidArgumentError(absl::StrCat(
        "data.selective_copying.vocab_size: must be at least 3 (noise, marker and at least one "
        "data token), got ",
        vocab));
  }
  if (num_data < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("data.selective_copying.num_data_tokens: must be at least 1, got ", num_data));
  }
  if (seq_len < 2 * num_data) {
    return absl::InvalidArgumentError(absl::StrCat(
        "data.selective_copying.seq_len: must be at least 2 * num_data_tokens = ", 2 * num_data,
        " (a context holding the data tokens, then one marker per data token), got ", seq_len));
  }
  return std::make_unique<SelectiveCopying>(seq_len, static_cast<int32_t>(vocab), num_data, seed);
}

}  // namespace mamba::data
