#include "worker/kernels/embedding_cpu.h"

#include <algorithm>

#include "worker/check.h"

namespace mamba::kernels {
namespace {

// Below this much work an OpenMP fork/join costs more than it saves on a few cores (and
// stalls badly when the cores are shared).
constexpr int64_t kMinParallelWork = 1 << 14;

// Columns per backward work item: a fixed split, so the summation order never depends on threads.
constexpr int64_t kColumnChunk = 64;

void CheckIds(const int32_t* ids, int64_t num_tokens, int64_t vocab) {
  for (int64_t t = 0; t < num_tokens; ++t) {
    MAMBA_CHECK(ids[t] >= 0 && ids[t] < vocab)
        << "embedding id " << ids[t] << " at token " << t << " outside [0, " << vocab << ")";
  }
}

}  // namespace

template <typename T>
void EmbeddingForwardCpu(const int32_t* ids, int64_t num_tokens, const T* weight, int64_t vocab,
                         int64_t dim, T* out) {
  CheckIds(ids, num_tokens, vocab);
#pragma omp parallel for schedule(static) if (num_tokens * dim >= kMinParallelWork)
  for (int64_t t = 0; t < num_tokens; ++t) {
    std::copy(weight + ids[t] * dim, weight + (ids[t] + 1) * dim, out + t * dim);
  }
}

template <typename T>
void EmbeddingBackwardCpu(const int32_t* ids, int64_t num_tokens, const T* dout, int64_t vocab,
                          int64_t dim, T* dweight) {
  CheckIds(ids, num_tokens, vocab);
  // Parallel over column chunks rather than tokens: repeated ids never race, and each entry sees
  // its contributions in token order.
  const int64_t chunks = (dim + kColumnChunk - 1) / kColumnChunk;
#pragma omp parallel for schedule(static) if (num_tokens * dim >= kMinParallelWork)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t j0 = ch * kColumnChunk, j1 = std::min(dim, j0 + kColumnChunk);
    for (int64_t t = 0; t < num_tokens; ++t) {
      T* row = dweight + ids[t] * dim;
      const T* g = dout + t * dim;
      for (int64_t j = j0; j < j1; ++j) row[j] += g[j];
    }
  }
}

template void EmbeddingForwardCpu<float>(const int32_t*, int64_t, const float*, int64_t, int64_t,
                                         float*);
template void EmbeddingForwardCpu<double>(const int32_t*, int64_t, const double*, int64_t, int64_t,
                                          double*);
template void EmbeddingBackwardCpu<float>(const int32_t*, int64_t, const float*, int64_t, int64_t,
                                          float*);
template void EmbeddingBackwardCpu<double>(const int32_t*, int64_t, const double*, int64_t, int64_t,
                                           double*);

}  // namespace mamba::kernels
