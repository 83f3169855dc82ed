#include "worker/kernels/rmsnorm_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace mamba::kernels {
namespace {

// Below this much work an OpenMP fork/join costs more than it saves on a few cores (and
// stalls badly when the cores are shared).
constexpr int64_t kMinParallelWork = 1 << 14;

// Row blocks of the dweight reduction: fixed, so results do not depend on the thread count.
constexpr int64_t kRowBlocks = 16;

}  // namespace

template <typename T>
void AddRmsNormForwardCpu(int64_t rows, int64_t dim, const T* residual_in, const T* x,
                          const T* weight, T eps, T* residual_out, T* y, T* rstd) {
#pragma omp parallel for schedule(static) if (rows * dim >= kMinParallelWork)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    T* res = residual_out + r * dim;
    double sum_sq = 0;
    for (int64_t i = 0; i < dim; ++i) {
      const T v = residual_in ? residual_in[r * dim + i] + xr[i] : xr[i];
      res[i] = v;
      sum_sq += double(v) * double(v);
    }
    const T s = T(1.0 / std::sqrt(sum_sq / double(dim) + double(eps)));
    rstd[r] = s;
    T* yr = y + r * dim;
    for (int64_t i = 0; i < dim; ++i) yr[i] = res[i] * s * weight[i];
  }
}

// With r = residual_out, s = rstd, g = dy * weight:
//   d/dr_j = s * (g_j - r_j * s^2 * mean_i(g_i * r_i))      (s depends on every r_i of the row)
template <typename T>
void AddRmsNormBackwardCpu(int64_t rows, int64_t dim, const T* dy, const T* dresidual_out,
                           const T* residual_out, const T* weight, const T* rstd, T* dx,
                           T* dweight) {
  const int64_t blocks = std::max<int64_t>(1, std::min(rows, kRowBlocks));
  std::vector<double> dw_part(blocks * dim, 0.0);
#pragma omp parallel for schedule(static) if (rows * dim >= kMinParallelWork)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t r_begin = rows * blk / blocks, r_end = rows * (blk + 1) / blocks;
    double* dw = dw_part.data() + blk * dim;
    for (int64_t r = r_begin; r < r_end; ++r) {
      const T* dyr = dy + r * dim;
      const T* res = residual_out + r * dim;
      const double s = rstd[r];
      double dot = 0;
      for (int64_t i = 0; i < dim; ++i) {
        dot += double(dyr[i]) * double(weight[i]) * double(res[i]);
        dw[i] += double(dyr[i]) * double(res[i]) * s;
      }
      const double c = s * s * dot / double(dim);
      T* dxr = dx + r * dim;
      for (int64_t i = 0; i < dim; ++i) {
        const double g = double(dyr[i]) * double(weight[i]);
        double v = s * (g - double(res[i]) * c);
        if (dresidual_out) v += double(dresidual_out[r * dim + i]);
        dxr[i] = T(v);
      }
    }
  }
#pragma omp parallel for schedule(static) if (blocks * dim >= kMinParallelWork)
  for (int64_t i = 0; i < dim; ++i) {
    double sum = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) sum += dw_part[blk * dim + i];
    dweight[i] += T(sum);
  }
}

template void AddRmsNormForwardCpu<float>(int64_t, int64_t, const float*, const float*,
                                          const float*, float, float*, float*, float*);
template void AddRmsNormForwardCpu<double>(int64_t, int64_t, const double*, const double*,
                                           const double*, double, double*, double*, double*);
template void AddRmsNormBackwardCpu<float>(int64_t, int64_t, const float*, const float*,
                                           const float*, const float*, const float*, float*,
                                           float*);
template void AddRmsNormBackwardCpu<double>(int64_t, int64_t, const double*, const double*,
                                            const double*, const double*, const double*, double*,
                                            double*);

}  // namespace mamba::kernels
