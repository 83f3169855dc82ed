// Token embedding, CPU reference: out[t, :] = weight[ids[t], :].
//   ids: (num_tokens)   weight, dweight: (vocab, dim)   out, dout: (num_tokens, dim)
// An id outside [0, vocab) is a programming error (the data layer validates): the kernel aborts.
#pragma once

#include <cstdint>

namespace mamba::kernels {

template <typename T>
void EmbeddingForwardCpu(const int32_t* ids, int64_t num_tokens, const T* weight, int64_t vocab,
                         int64_t dim, T* out);

// dweight += the scatter-add of dout rows into the rows of their ids. Deterministic: every entry
// of dweight is accumulated in token order by one thread, whatever the thread count.
template <typename T>
void EmbeddingBackwardCpu(const int32_t* ids, int64_t num_tokens, const T* dout, int64_t vocab,
                          int64_t dim, T* dweight);

}  // namespace mamba::kernels
