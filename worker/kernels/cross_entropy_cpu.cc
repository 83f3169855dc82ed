#include "worker/kernels/cross_entropy_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "worker/check.h"

namespace mamba::kernels {
namespace {

// Below this much work an OpenMP fork/join costs more than it saves on a few cores (and
// stalls badly when the cores are shared).
constexpr int64_t kMinParallelWork = 1 << 14;

}  // namespace

template <typename T>
CrossEntropyStats CrossEntropyCpu(int64_t rows, int64_t vocab, const T* logits,
                                  const int32_t* targets, int32_t ignore_index, double grad_scale,
                                  T* dlogits) {
  for (int64_t r = 0; r < rows; ++r) {
    MAMBA_CHECK(targets[r] == ignore_index || (targets[r] >= 0 && targets[r] < vocab))
        << "cross-entropy target " << targets[r] << " at row " << r << " outside [0, " << vocab
        << ") and not ignore_index " << ignore_index;
  }
  // Per-row results, summed serially afterwards so the total does not depend on the threads.
  std::vector<double> loss(rows, 0.0);
  std::vector<char> hit(rows, 0);
#pragma omp parallel for schedule(static) if (rows * vocab >= kMinParallelWork)
  for (int64_t r = 0; r < rows; ++r) {
    const T* z = logits + r * vocab;
    T* dz = dlogits ? dlogits + r * vocab : nullptr;
    if (targets[r] == ignore_index) {
      if (dz) std::fill(dz, dz + vocab, T(0));
      continue;
    }
    // Subtracting the maximum keeps every exp() argument <= 0.
    int64_t argmax = 0;
    for (int64_t v = 1; v < vocab; ++v) {
      if (z[v] > z[argmax]) argmax = v;
    }
    const double mx = z[argmax];
    double sum = 0;
    for (int64_t v = 0; v < vocab; ++v) sum += std::exp(double(z[v]) - mx);
    const double lse = mx + std::log(sum);
    loss[r] = lse - double(z[targets[r]]);
    hit[r] = argmax == targets[r];
    if (dz) {
      // In double, element by element: no float cancellation at the target, and dlogits may
      // alias logits.
      for (int64_t v = 0; v < vocab; ++v) {
        const double p = std::exp(double(z[v]) - lse);
        dz[v] = T(grad_scale * (v == targets[r] ? p - 1.0 : p));
      }
    }
  }
  CrossEntropyStats stats;
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] == ignore_index) continue;
    stats.loss_sum += loss[r];
    stats.count += 1;
    stats.correct += hit[r];
  }
  return stats;
}

template CrossEntropyStats CrossEntropyCpu<float>(int64_t, int64_t, const float*, const int32_t*,
                                                  int32_t, double, float*);
template CrossEntropyStats CrossEntropyCpu<double>(int64_t, int64_t, const double*, const int32_t*,
                                                   int32_t, double, double*);

}  // namespace mamba::kernels
