// Training data for the worker: the paper's synthetic tasks and file-backed token streams.
//
// Every sample is a pure function of (seed, split, step, sample index, seq_len), drawn from a
// counter-based RNG (rng.h) rather than a stateful stream, so any split of a global batch over
// ranks, and any resume from a checkpoint, sees exactly the same samples.
//
// Sample layouts (targets use next-token-prediction alignment: targets[i] is what the model must
// output after reading inputs[0..i]):
//
// Selective copying (vocab V, length L, K data tokens). Token 0 is noise, token 1 the marker
// ("copy now"), data tokens are drawn uniformly from [2, V). Positions [0, L - K) are the context:
// noise with K data tokens at random distinct positions. Positions [L - K, L) hold K markers. The
// target at the j-th marker position (L - K + j) is the j-th data token in order of position; all
// other targets are kIgnoreIndex. The first answer is due at the first marker, when the model has
// read the whole context; the answers are never fed back as inputs.
//
// Induction heads (vocab V, length L). Token V - 1 is the trigger; every other token is uniform in
// [0, V - 1). The trigger appears at a random position p in [0, L - 3], followed by a random
// target token at p + 1, and again at L - 1; nowhere else. The only target is at L - 1: the token
// at p + 1.
//
// Text file (vocab 256) and token file (vocab from the spec): inputs are a window of seq_len tokens
// at an RNG-drawn start, targets the same window shifted by one. Train windows lie in the first
// (1 - val_fraction) of the file, validation windows in the rest; the two never overlap.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/job.pb.h"

namespace mamba::data {

inline constexpr int32_t kIgnoreIndex = -100;

enum class Split { kTrain, kValidation };

// One batch of next-token-prediction samples, row-major (count, seq_len). targets[i] is the token
// the model must predict at position i, or kIgnoreIndex where no loss is taken.
struct Batch {
  int64_t count = 0, seq_len = 0;
  std::vector<int32_t> inputs, targets;
};

class Dataset {
 public:
  virtual ~Dataset() = default;
  virtual std::string name() const = 0;
  virtual int32_t vocab_size() const = 0;
  virtual int64_t seq_len() const = 0;  // the training length
  // True for the synthetic tasks: accuracy over answer positions is meaningful.
  virtual bool has_accuracy() const = 0;
  // Samples [first, first + count) of the global batch of `step`, at length seq_len. A pure
  // function of (seed, split, step, sample index, seq_len): any split of a global batch over
  // ranks, and any resume, sees the same samples. Returns an error if seq_len is impossible for
  // this dataset (or step, first, count are negative, or the batch is unreasonably large).
  virtual absl::StatusOr<Batch> GetBatch(Split split, int64_t step, int64_t first, int64_t count,
                                         int64_t seq_len) const = 0;
};

// Validates the spec (errors name the field and the rule, e.g.
// "data.induction_heads.seq_len: must be at least 4, got 2"; a missing file is NOT_FOUND naming
// data.text_file.path and the path) and builds the dataset. File-backed datasets are read into
// memory here, once.
absl::StatusOr<std::unique_ptr<Dataset>> MakeDataset(const mamba::v1::DataSpec& spec,
                                                     uint64_t seed);

}  // namespace mamba::data
