// Token embedding on the GPU, the same contract as embedding_cpu.h:
//   out[t, :] = weight[ids[t], :];   dweight[v, :] += sum of dout[t, :] over tokens t with id v.
// weight and dweight are float; out and dout are T, float or __nv_bfloat16 (sums in float).
// An id outside [0, vocab) sets kBadEmbeddingId in *error_flag (device) and its row is skipped.
//
// The backward is deterministic without float atomics. Large vocabularies: a stable radix sort of
// (id, token) pairs groups each id's tokens in token order, and one thread owns each (id, column)
// entry and adds the run into it in that order (the CPU reference's order, so the bits match it
// too). Vocabularies of at most 256 ids (long runs): each tile of tokens sums into shared memory
// in token order, then the tiles' sums add up in double in a fixed order (not the reference's:
// float32 rounding differs from it).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mamba::kernels {

template <typename T>
void EmbeddingForwardCuda(const int32_t* ids, int64_t num_tokens, const float* weight,
                          int64_t vocab, int64_t dim, T* out, int* error_flag, cudaStream_t stream);

size_t EmbeddingBackwardWorkspaceBytes(int64_t num_tokens, int64_t vocab, int64_t dim);
template <typename T>
void EmbeddingBackwardCuda(const int32_t* ids, int64_t num_tokens, const T* dout, int64_t vocab,
                           int64_t dim, float* dweight, void* workspace, size_t workspace_bytes,
                           int* error_flag, cudaStream_t stream);

}  // namespace mamba::kernels
