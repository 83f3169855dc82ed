#include <algorithm>
#include <cub/device/device_radix_sort.cuh>

#include "worker/kernels/cuda_check.h"
#include "worker/kernels/cuda_dtype.cuh"
#include "worker/kernels/cuda_reduce.cuh"
#include "worker/kernels/embedding.h"

namespace mamba::kernels {
namespace {

constexpr int kThreads = 128;

template <typename T>
__global__ void EmbeddingForwardKernel(const int32_t* ids, const float* weight, int64_t vocab,
                                       int64_t dim, T* out, int* error_flag) {
  const int64_t t = blockIdx.x;
  const int32_t id = ids[t];
  const bool ok = id >= 0 && id < vocab;
  if (!ok && threadIdx.x == 0) atomicOr(error_flag, kBadEmbeddingId);
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    Store(out + t * dim + j, ok ? weight[id * dim + j] : 0.f);
  }
}

// Invalid ids get the key `vocab`, which sorts last and is skipped.
__global__ void MakeKeysKernel(const int32_t* ids, int64_t num_tokens, int64_t vocab, int32_t* keys,
                               int32_t* tokens, int* error_flag) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= num_tokens) return;
  const int32_t id = ids[t];
  const bool ok = id >= 0 && id < vocab;
  if (!ok) atomicOr(error_flag, kBadEmbeddingId);
  keys[t] = ok ? id : int32_t(vocab);
  tokens[t] = int32_t(t);
}

// Block (i, y): if sorted position i starts a run of equal ids, its threads own columns
// y*blockDim + tid of that id's row and add the run's dout rows into them in token order.
template <typename T>
__global__ void AccumulateRunsKernel(const int32_t* keys, const int32_t* tokens, int64_t num_tokens,
                                     int64_t vocab, int64_t dim, const T* dout, float* dweight) {
  const int64_t i = blockIdx.x;
  const int32_t key = keys[i];
  if (key >= vocab || (i > 0 && keys[i - 1] == key)) return;
  const int64_t j = blockIdx.y * int64_t(blockDim.x) + threadIdx.x;
  if (j >= dim) return;
  float acc = dweight[key * dim + j];
  for (int64_t r = i; r < num_tokens && keys[r] == key; ++r) {
    acc += Load(dout + int64_t(tokens[r]) * dim + j);
  }
  dweight[key * dim + j] = acc;
}

// Small vocabularies (at most kSmallVocab ids: each id's run is long, and one thread adding a
// run of thousands of rows in turn took most of a small model's step) sum in two deterministic
// levels instead: tiles of tokens into shared memory, then the tiles' sums (double) by the chunked
// parameter-gradient reduction (LaunchAddChunkSums).
constexpr int64_t kSmallVocab = 256;
constexpr int kCols = 32;  // columns a block: one a lane

// Tokens a tile: at least 256, and 4 per id, so the tiles' sums take at most a quarter of dout's
// elements (in doubles).
int64_t TileTokens(int64_t vocab) { return std::max<int64_t>(256, 4 * vocab); }
int64_t NumTiles(int64_t num_tokens, int64_t vocab) {
  return (num_tokens + TileTokens(vocab) - 1) / TileTokens(vocab);
}

// Block (tile, column group): lane j owns column y*32 + j and adds the tile's rows into its slot
// of each id's shared row in token order, then writes the tile's sums to partial[tile, id, col].
template <typename T>
__global__ void TileSumsKernel(const int32_t* ids, int64_t num_tokens, const T* dout, int64_t vocab,
                               int64_t dim, int64_t tile_tokens, double* partial, int* error_flag) {
  extern __shared__ float acc[];  // [vocab][kCols]
  const int lane = threadIdx.x;
  const int64_t tile = blockIdx.x, col = blockIdx.y * int64_t(kCols) + lane;
  for (int64_t v = 0; v < vocab; ++v) acc[v * kCols + lane] = 0.f;
  const int64_t t0 = tile * tile_tokens, t1 = min(num_tokens, t0 + tile_tokens);
  constexpr int kAhead = 8;  // loads issued before their adds
  for (int64_t t = t0; t < t1; t += kAhead) {
    int32_t id[kAhead];
    float x[kAhead];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      id[u] = t + u < t1 ? ids[t + u] : -1;
      const bool ok = id[u] >= 0 && id[u] < vocab;
      if (!ok && t + u < t1 && lane == 0 && blockIdx.y == 0) atomicOr(error_flag, kBadEmbeddingId);
      x[u] = ok && col < dim ? Load(dout + (t + u) * dim + col) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      if (id[u] >= 0 && id[u] < vocab) acc[id[u] * kCols + lane] += x[u];
    }
  }
  if (col >= dim) return;
  for (int64_t v = 0; v < vocab; ++v)
    partial[(tile * vocab + v) * dim + col] = acc[v * kCols + lane];
}

int KeyBits(int64_t vocab) {
  int bits = 1;
  while (bits < 31 && (int64_t(1) << bits) <= vocab) ++bits;  // room for the sentinel `vocab`
  return bits;
}

size_t Align(size_t bytes) { return (bytes + 255) / 256 * 256; }

size_t SortTempBytes(int64_t num_tokens, int64_t vocab) {
  size_t temp = 0;
  MAMBA_CUDA_CHECK("embedding_bwd",
                   cub::DeviceRadixSort::SortPairs(
                       nullptr, temp, static_cast<const int32_t*>(nullptr),
                       static_cast<int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                       static_cast<int32_t*>(nullptr), num_tokens, 0, KeyBits(vocab)));
  return temp;
}

}  // namespace

template <typename T>
void EmbeddingForwardCuda(const int32_t* ids, int64_t num_tokens, const float* weight,
                          int64_t vocab, int64_t dim, T* out, int* error_flag,
                          cudaStream_t stream) {
  if (num_tokens == 0 || dim == 0) return;
  MAMBA_CHECK(num_tokens < (int64_t(1) << 31)) << "embedding: too many tokens";
  EmbeddingForwardKernel<<<static_cast<unsigned int>(num_tokens), kThreads, 0, stream>>>(
      ids, weight, vocab, dim, out, error_flag);
  MAMBA_CUDA_CHECK_LAUNCH("embedding_fwd");
}

size_t EmbeddingBackwardWorkspaceBytes(int64_t num_tokens, int64_t vocab, int64_t dim) {
  if (vocab <= kSmallVocab) return sizeof(double) * NumTiles(num_tokens, vocab) * vocab * dim;
  return 4 * Align(num_tokens * sizeof(int32_t)) + Align(SortTempBytes(num_tokens, vocab));
}

template <typename T>
void EmbeddingBackwardCuda(const int32_t* ids, int64_t num_tokens, const T* dout, int64_t vocab,
                           int64_t dim, float* dweight, void* workspace, size_t workspace_bytes,
                           int* error_flag, cudaStream_t stream) {
  if (num_tokens == 0 || dim == 0) return;
  MAMBA_CHECK(num_tokens < (int64_t(1) << 31)) << "embedding: too many tokens";
  MAMBA_CHECK(workspace_bytes >= EmbeddingBackwardWorkspaceBytes(num_tokens, vocab, dim))
      << "embedding_bwd: workspace too small";
  if (vocab <= kSmallVocab) {
    const int64_t tiles = NumTiles(num_tokens, vocab);
    double* partial = static_cast<double*>(workspace);
    const dim3 grid(static_cast<unsigned int>(tiles), GridFor(dim, kCols));
    TileSumsKernel<<<grid, kCols, vocab * kCols * sizeof(float), stream>>>(
        ids, num_tokens, dout, vocab, dim, TileTokens(vocab), partial, error_flag);
    MAMBA_CUDA_CHECK_LAUNCH("embedding_bwd");
    LaunchAddChunkSums(vocab * dim, tiles, partial, dweight, stream);
    MAMBA_CUDA_CHECK_LAUNCH("embedding_bwd");
    return;
  }
  char* p = static_cast<char*>(workspace);
  const size_t vec = Align(num_tokens * sizeof(int32_t));
  int32_t* keys_in = reinterpret_cast<int32_t*>(p);
  int32_t* tokens_in = reinterpret_cast<int32_t*>(p + vec);
  int32_t* keys = reinterpret_cast<int32_t*>(p + 2 * vec);
  int32_t* tokens = reinterpret_cast<int32_t*>(p + 3 * vec);
  void* temp = p + 4 * vec;
  size_t temp_bytes = workspace_bytes - 4 * vec;

  MakeKeysKernel<<<GridFor(num_tokens, 256), 256, 0, stream>>>(ids, num_tokens, vocab, keys_in,
                                                               tokens_in, error_flag);
  MAMBA_CUDA_CHECK_LAUNCH("embedding_bwd");
  // LSD radix sort is stable: equal ids keep token order.
  MAMBA_CUDA_CHECK("embedding_bwd",
                   cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys, tokens_in,
                                                   tokens, num_tokens, 0, KeyBits(vocab), stream));
  const dim3 grid(static_cast<unsigned int>(num_tokens), GridFor(dim, kThreads));
  AccumulateRunsKernel<<<grid, kThreads, 0, stream>>>(keys, tokens, num_tokens, vocab, dim, dout,
                                                      dweight);
  MAMBA_CUDA_CHECK_LAUNCH("embedding_bwd");
}

template void EmbeddingForwardCuda<float>(const int32_t*, int64_t, const float*, int64_t, int64_t,
                                          float*, int*, cudaStream_t);
template void EmbeddingForwardCuda<bf16>(const int32_t*, int64_t, const float*, int64_t, int64_t,
                                         bf16*, int*, cudaStream_t);
template void EmbeddingBackwardCuda<float>(const int32_t*, int64_t, const float*, int64_t, int64_t,
                                           float*, void*, size_t, int*, cudaStream_t);
template void EmbeddingBackwardCuda<bf16>(const int32_t*, int64_t, const bf16*, int64_t, int64_t,
                                          float*, void*, size_t, int*, cudaStream_t);

}  // namespace mamba::kernels
