#include "worker/kernels/silu_cpu.h"

namespace mamba::kernels {
namespace {

// Below this much work an OpenMP fork/join costs more than it saves on a few cores (and
// stalls badly when the cores are shared).
constexpr int64_t kMinParallelWork = 1 << 14;

}  // namespace

template <typename T>
void SiluForwardCpu(int64_t n, const T* x, T* y) {
#pragma omp parallel for schedule(static) if (n >= kMinParallelWork)
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * StableSigmoid(x[i]);
}

template <typename T>
void SiluBackwardCpu(int64_t n, const T* x, const T* dy, T* dx) {
#pragma omp parallel for schedule(static) if (n >= kMinParallelWork)
  for (int64_t i = 0; i < n; ++i) dx[i] = dy[i] * SiluGrad(x[i]);
}

template void SiluForwardCpu<float>(int64_t, const float*, float*);
template void SiluForwardCpu<double>(int64_t, const double*, double*);
template void SiluBackwardCpu<float>(int64_t, const float*, const float*, float*);
template void SiluBackwardCpu<double>(int64_t, const double*, const double*, double*);

}  // namespace mamba::kernels
