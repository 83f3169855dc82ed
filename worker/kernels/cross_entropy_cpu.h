// Cross entropy over rows of logits, CPU reference: logits, dlogits (rows, vocab); targets (rows).
#pragma once

#include <cstdint>

namespace mamba::kernels {

struct CrossEntropyStats {
  double loss_sum = 0;  // summed over counted rows
  int64_t count = 0;    // rows whose target is not ignore_index
  int64_t correct = 0;  // counted rows whose argmax (first maximum) is the target
};

// Per row: loss = logsumexp(logits) - logits[target]; rows with target == ignore_index are skipped.
// When dlogits is non-null it is overwritten: grad_scale * (softmax - onehot(target)) for counted
// rows, 0 for ignored rows. A target outside [0, vocab) that is not ignore_index is a programming
// error (the data layer validates): the kernel aborts. loss_sum is summed in row order.
// dlogits may alias logits (the gradient then overwrites the logits).
template <typename T>
CrossEntropyStats CrossEntropyCpu(int64_t rows, int64_t vocab, const T* logits,
                                  const int32_t* targets, int32_t ignore_index, double grad_scale,
                                  T* dlogits);

}  // namespace mamba::kernels
