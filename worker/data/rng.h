// Counter-based randomness: every draw is a hash of (seed, split, step, sample index, seq_len,
// draw number), so a sample never depends on which other samples were generated before it.
#pragma once

#include <cstdint>

#include "worker/data/dataset.h"

namespace mamba::data {

// The splitmix64 finalizer: a bijective 64-bit mix with full avalanche.
inline uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// The random stream of one sample.
class SampleRng {
 public:
  SampleRng(uint64_t seed, Split split, int64_t step, int64_t index, int64_t seq_len) {
    // Absorb each coordinate through a full mix so that nearby tuples give unrelated keys.
    uint64_t h = SplitMix64(seed);
    h = SplitMix64(h ^ (split == Split::kTrain ? 0x7472616eULL : 0x76616cULL));
    h = SplitMix64(h ^ static_cast<uint64_t>(step));
    h = SplitMix64(h ^ static_cast<uint64_t>(index));
    key_ = SplitMix64(h ^ static_cast<uint64_t>(seq_len));
  }

  // The next 64 random bits: hash of (key, draw number).
  uint64_t Next() { return SplitMix64(key_ ^ SplitMix64(draw_++)); }

  // Uniform in [0, n) for n >= 1 (multiply-shift; the bias, below n / 2^64, is irrelevant here).
  uint64_t Uniform(uint64_t n) {
    return static_cast<uint64_t>((static_cast<unsigned __int128>(Next()) * n) >> 64);
  }

 private:
  uint64_t key_ = 0;
  uint64_t draw_ = 0;
};

}  // namespace mamba::data
