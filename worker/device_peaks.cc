#include "worker/device_peaks.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <random>

namespace mamba {

using Clock = std::chrono::steady_clock;

profiling::Peaks MeasurePeaks(Backend& be) {
  using Seconds = std::chrono::duration<double>;
  const bool device = be.device() != Device::kCPU;
  profiling::Peaks peaks;
  peaks.device = device ? be.name() : "this CPU (" + be.name() + " backend)";
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1, 1);
  const auto random = [&](const Shape& shape) {
    Tensor host = Tensor::Empty(shape, DType::kF32);
    for (int64_t i = 0; i < host.numel(); ++i) host.data<float>()[i] = u(rng);
    return device ? be.FromHost(host) : host;
  };
  // The fastest of three runs of f, in seconds.
  const auto best_of_three = [&](const auto& f) {
    double best = 1e30;
    for (int i = 0; i < 3; ++i) {
      be.Synchronize();
      const auto t0 = Clock::now();
      f();
      be.Synchronize();
      best = std::min(best, Seconds(Clock::now() - t0).count());
    }
    return best;
  };
  const int64_t n = int64_t{1} << (device ? 28 : 24);  // 1 GiB / 64 MiB of floats
  Tensor src = random({n}), dst = be.Empty({n}, DType::kF32);
  peaks.bandwidth_gbps = 2.0 * n * 4 / best_of_three([&] {
                           if (device) {
                             be.Convert(src, dst);  // a device-to-device copy
                           } else {
                             std::memcpy(dst.raw(), src.raw(), src.nbytes());
                           }
                         }) /
                         1e9;
  const int64_t m = device ? 8192 : 512;
  Tensor x = random({m, m}), w = random({m, m}), y = be.Empty({m, m}, DType::kF32);
  peaks.flops = 2.0 * m * m * m / best_of_three([&] { be.LinearForward(x, w, Tensor(), y); });
  return peaks;
}

}  // namespace mamba
