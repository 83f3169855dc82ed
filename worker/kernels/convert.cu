#include <cuda_bf16.h>

#include <algorithm>

#include "worker/kernels/convert.h"
#include "worker/kernels/cuda_check.h"

namespace mamba::kernels {
namespace {

constexpr int kThreads = 256;

unsigned int Blocks(int64_t n) { return std::min(GridFor(n, kThreads), 1048576u); }

__global__ void ToBf16Kernel(int64_t n, const float* src, __nv_bfloat16* dst) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    dst[i] = __float2bfloat16_rn(src[i]);
  }
}

// Four at a time: 16-byte loads, 8-byte stores (the conversion is bandwidth-bound).
__global__ void ToBf16x4Kernel(int64_t n4, const float4* src, uint2* dst) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float4 v = src[i];
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y);
    const __nv_bfloat162 hi = __floats2bfloat162_rn(v.z, v.w);
    uint2 out;
    out.x = *reinterpret_cast<const unsigned int*>(&lo);
    out.y = *reinterpret_cast<const unsigned int*>(&hi);
    dst[i] = out;
  }
}

__global__ void ToFloatKernel(int64_t n, const __nv_bfloat16* src, float* dst) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    dst[i] = __bfloat162float(src[i]);
  }
}

}  // namespace

void FloatToBf16Cuda(int64_t n, const float* src, void* dst, cudaStream_t stream) {
  if (n == 0) return;
  if (n % 4 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(dst) % 8 == 0) {
    ToBf16x4Kernel<<<Blocks(n / 4), kThreads, 0, stream>>>(
        n / 4, reinterpret_cast<const float4*>(src), static_cast<uint2*>(dst));
  } else {
    ToBf16Kernel<<<Blocks(n), kThreads, 0, stream>>>(n, src, static_cast<__nv_bfloat16*>(dst));
  }
  MAMBA_CUDA_CHECK_LAUNCH("float_to_bf16");
}

void Bf16ToFloatCuda(int64_t n, const void* src, float* dst, cudaStream_t stream) {
  if (n == 0) return;
  ToFloatKernel<<<Blocks(n), kThreads, 0, stream>>>(n, static_cast<const __nv_bfloat16*>(src), dst);
  MAMBA_CUDA_CHECK_LAUNCH("bf16_to_float");
}

}  // namespace mamba::kernels
