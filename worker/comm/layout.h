// How the ranks of one job split the work: dp data-parallel groups of sp sequence-parallel ranks.
#pragma once

namespace mamba::comm {

struct Layout {
  int dp = 1, sp = 1;
  int world() const { return dp * sp; }
};

}  // namespace mamba::comm
