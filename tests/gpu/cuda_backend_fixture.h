// What the CUDA backend's op tests share: a GPU backend beside the CPU oracle, random inputs that
// both see as the same numbers, NaN-poisoned outputs, and comparisons against float64. Errors
// are global relative errors (largest |diff| over largest |reference|). Tests skip, with a
// message, without a CUDA device.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "tests/test_util.h"
#include "worker/backend.h"

namespace mamba {
namespace testing {

constexpr double kF32Tol = 1e-5;       // float32 outputs
constexpr double kBf16Tol = 1e-2;      // bf16 outputs: rounding to 8 significant bits costs 2^-9
constexpr double kScanGradTol = 1e-4;  // the scan's float32 gradients (long sums over steps)

// A host tensor of float values as float32, bf16 (rounded to nearest even) or float64.
inline Tensor HostTensor(const Shape& shape, const std::vector<float>& v, DType dtype) {
  Tensor t = Tensor::Empty(shape, dtype);
  EXPECT_EQ(t.numel(), static_cast<int64_t>(v.size()));
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == DType::kF32) {
      t.data<float>()[i] = v[i];
    } else if (dtype == DType::kBF16) {
      static_cast<uint16_t*>(t.raw())[i] = Bf16Bits(v[i]);
    } else {
      t.data<double>()[i] = v[i];
    }
  }
  return t;
}

// Entries of a float32 or bf16 host tensor, widened.
inline std::vector<float> Values(const Tensor& h) {
  std::vector<float> v(h.numel());
  for (int64_t i = 0; i < h.numel(); ++i) {
    v[i] = h.dtype() == DType::kBF16 ? Bf16Value(static_cast<const uint16_t*>(h.raw())[i])
                                     : h.data<float>()[i];
  }
  return v;
}

inline Tensor HostInts(const Shape& shape, const std::vector<int32_t>& v) {
  Tensor t = Tensor::Empty(shape, DType::kI32);
  std::copy(v.begin(), v.end(), t.data<int32_t>());
  return t;
}

class CudaBackendFixture : public ::testing::Test {
 protected:
  // act: the activations' dtype (Rand's values are representable in it); seed: of the inputs.
  CudaBackendFixture(DType act, uint64_t seed, CudaBackendOptions options = {})
      : act_(act), seed_(seed), options_(options) {}

  void SetUp() override {
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible: CUDA backend tests skip";
    gpu_ = MakeCudaBackend(options_);
    cpu_ = MakeCpuBackend();
  }

  // Random values for activations: rounded to bf16 when activations are bf16, so that bf16 and
  // float tensors hold them exactly.
  std::vector<float> Rand(int64_t n, double lo = -1.0, double hi = 1.0) {
    std::vector<float> v = RandF32(n, lo, hi);
    if (act_ == DType::kBF16) {
      for (float& x : v) x = RoundBf16(x);
    }
    return v;
  }
  // Random float32 values (most not representable in bf16).
  std::vector<float> RandF32(int64_t n, double lo = -1.0, double hi = 1.0) {
    const std::vector<double> v = RandomVector(n, ++seed_, lo, hi);
    return std::vector<float>(v.begin(), v.end());
  }

  Tensor Gpu(const Shape& shape, const std::vector<float>& v, DType dtype = DType::kF32) {
    return gpu_->FromHost(HostTensor(shape, v, dtype));
  }
  static Tensor Ref(const Shape& shape, const std::vector<float>& v) {
    return HostTensor(shape, v, DType::kF64);
  }
  // A GPU tensor whose every entry is NaN, for outputs the op must overwrite.
  Tensor Poisoned(const Shape& shape, DType dtype = DType::kF32) {
    return Gpu(shape,
               std::vector<float>(NumElements(shape), std::numeric_limits<float>::quiet_NaN()),
               dtype);
  }
  Tensor GpuInts(const Shape& shape, const std::vector<int32_t>& v) {
    return gpu_->FromHost(HostInts(shape, v));
  }
  std::vector<float> Fetch(const Tensor& t) { return Values(gpu_->ToHost(t)); }

  // Against a float64 reference; non-finite entries (an unwritten NaN, an overflow) fail
  // outright, and so does an all-zero reference.
  void ExpectClose(const Tensor& got, const Tensor& ref, const std::string& what,
                   double tol = kF32Tol) {
    const std::vector<float> g = Fetch(got);
    ASSERT_EQ(static_cast<int64_t>(g.size()), ref.numel()) << what;
    const double* r = ref.data<double>();
    double max_diff = 0, max_ref = 0;
    for (size_t i = 0; i < g.size(); ++i) {
      ASSERT_TRUE(std::isfinite(g[i])) << what << ": entry " << i << " is " << g[i];
      max_diff = std::max(max_diff, std::abs(double(g[i]) - r[i]));
      max_ref = std::max(max_ref, std::abs(r[i]));
    }
    ASSERT_GT(max_ref, 0) << what << ": the reference is all zeros";
    EXPECT_LE(max_diff / max_ref, tol)
        << what << ": max |diff| " << max_diff << ", max |ref| " << max_ref;
  }
  // An activation output: kBf16Tol when bf16, kF32Tol when float32.
  void ExpectCloseAct(const Tensor& got, const Tensor& ref, const std::string& what) {
    ExpectClose(got, ref, what, got.dtype() == DType::kBF16 ? kBf16Tol : kF32Tol);
  }
  void ExpectSameBits(const Tensor& a, const Tensor& b, const std::string& what) {
    const Tensor ha = gpu_->ToHost(a), hb = gpu_->ToHost(b);
    ASSERT_EQ(ha.dtype(), hb.dtype()) << what;
    ASSERT_EQ(ha.nbytes(), hb.nbytes()) << what;
    EXPECT_EQ(std::memcmp(ha.raw(), hb.raw(), ha.nbytes()), 0) << what << ": differ";
  }
  // Exact: the GPU tensor holds `want` rounded to its dtype.
  void ExpectBits(const Tensor& got, const std::vector<float>& want, const std::string& what) {
    const Tensor h = gpu_->ToHost(got);
    const Tensor w = HostTensor(got.shape(), want, got.dtype());
    ASSERT_EQ(h.nbytes(), w.nbytes()) << what;
    EXPECT_EQ(std::memcmp(h.raw(), w.raw(), h.nbytes()), 0) << what << ": not bit-exact";
  }

  DType act_;
  uint64_t seed_;
  CudaBackendOptions options_;
  std::unique_ptr<Backend> gpu_, cpu_;
};

}  // namespace testing
}  // namespace mamba
