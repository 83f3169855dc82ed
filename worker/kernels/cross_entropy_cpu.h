#pragma once
#include <cstdint>
namespace mamba::kernels {
struct CrossEntropyStats { double loss_sum = 0; int64_t count = 0; int64_t correct = 0; };
template <typename T> CrossEntropyStats CrossEntropyCpu(int64_t rows, int64_t vocab, const T* logits, const int32_t* targets, int32_t ignore_index, double grad_scale, T* dlogits);
}
