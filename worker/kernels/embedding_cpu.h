#pragma once
#include <cstdint>
namespace mamba::kernels {
template <typename T> void EmbeddingForwardCpu(const int32_t* ids, int64_t num_tokens, const T* weight, int64_t vocab, int64_t dim, T* out);
template <typename T> void EmbeddingBackwardCpu(const int32_t* ids, int64_t num_tokens, const T* dout, int64_t vocab, int64_t dim, T* dweight);
}
