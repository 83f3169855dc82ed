// Induction heads (Mamba paper, section 4.1.2); the layout is documented in dataset.h.
#include <cstdint>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "worker/data/rng.h"
#include "worker/data/sources.h"

namespace mamba::data {
namespace {

// The shortest sequence that leaves the first trigger's position random: [0, L - 3] needs
// L >= 4 to hold two choices.
constexpr int64_t kMinSeqLen = 4;

class InductionHeads : public Dataset {
 public:
  InductionHeads(int64_t seq_len, int32_t vocab_size, uint64_t seed)
      : seq_len_(seq_len), vocab_size_(vocab_size), seed_(seed) {}

  std::string name() const override { return "induction_heads"; }
  int32_t vocab_size() const override { return vocab_size_; }
  int64_t seq_len() const override { return seq_len_; }
  bool has_accuracy() const override { return true; }

  absl::StatusOr<Batch> GetBatch(Split split, int64_t step, int64_t first, int64_t count,
                                 int64_t seq_len) const override {
    if (seq_len < kMinSeqLen) {
      return absl::InvalidArgumentError(absl::StrCat("induction_heads: seq_len must be at least ",
                                                     kMinSeqLen, ", got ", seq_len));
    }
    absl::StatusOr<Batch> batch = NewBatch(name(), step, first, count, seq_len);
    if (!batch.ok()) return batch.status();
    const int32_t trigger = vocab_size_ - 1;
    const uint64_t plain_vocab = static_cast<uint64_t>(vocab_size_ - 1);  // all but the trigger
    for (int64_t s = 0; s < count; ++s) {
      SampleRng rng(seed_, split, step, first + s, seq_len);
      int32_t* in = batch->inputs.data() + s * seq_len;
      int32_t* tgt = batch->targets.data() + s * seq_len;
      // p + 1 (the target token) must come before the final trigger at L - 1.
      const int64_t p = static_cast<int64_t>(rng.Uniform(seq_len - 2));
      for (int64_t i = 0; i < seq_len; ++i) in[i] = static_cast<int32_t>(rng.Uniform(plain_vocab));
      in[p] = trigger;
      in[seq_len - 1] = trigger;
      tgt[seq_len - 1] = in[p + 1];
    }
    return batch;
  }

 private:
  int64_t seq_len_;
  int32_t vocab_size_;
  uint64_t seed_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Dataset>> MakeInductionHeads(
    const mamba::v1::InductionHeadsSpec& spec, uint64_t seed) {
  const int64_t seq_len = spec.has_seq_len() ? spec.seq_len() : 256;
  const int64_t vocab = spec.has_vocab_size() ? spec.vocab_size() : 16;
  if (vocab < 3) {
    // With 2 tokens the target would always be token 0: nothing to learn.
    return absl::InvalidArgumentError(absl::StrCat(
        "data.induction_heads.vocab_size: must be at least 3 (the trigger and at least two "
        "other tokens), got ",
        vocab));
  }
  if (seq_len < kMinSeqLen) {
    return absl::InvalidArgumentError(absl::StrCat(
        "data.induction_heads.seq_len: must be at least ", kMinSeqLen, ", got ", seq_len));
  }
  return std::make_unique<InductionHeads>(seq_len, static_cast<int32_t>(vocab), seed);
}

}  // namespace mamba::data
