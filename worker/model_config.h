// Shape of a Mamba language model, in HF MambaConfig terms.
#pragma once

#include <cstdint>

namespace mamba {

struct ModelConfig {
  int64_t d_model = 64;
  int64_t n_layer = 2;
  int64_t vocab_size = 16;  // padded to a multiple of 8 (PadVocab)
  int64_t d_state = 16;
  int64_t d_conv = 4;
  int64_t expand = 2;
  int64_t dt_rank = 4;  // ceil(d_model / 16) by default
  double norm_eps = 1e-5;

  int64_t d_inner() const { return expand * d_model; }
  static int64_t PadVocab(int64_t vocab) { return (vocab + 7) / 8 * 8; }
  static int64_t DefaultDtRank(int64_t d_model) { return (d_model + 15) / 16; }
};

}  // namespace mamba
