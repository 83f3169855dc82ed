// Test harness for the CUDA selective scan: a problem in float64 (the CPU layout), uploaded in a
// chosen dtype and layout, run through the C ABI, downloaded back into the CPU layout.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tests/test_util.h"
#include "worker/kernels/mamba_kernels.h"
#include "worker/kernels/selective_scan_cpu.h"

namespace mamba::testing {

inline bool HasGpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define MAMBA_REQUIRE_GPU()                                                  \
  if (!::mamba::testing::HasGpu()) {                                         \
    GTEST_SKIP() << "no CUDA device on this machine: GPU scan test skipped"; \
  }

#define CUDA_OK(x) ASSERT_EQ((x), cudaSuccess) << #x

inline uint16_t ToBf16(double v) {
  const float f = static_cast<float>(v);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7fc0;
  u += 0x7fff + ((u >> 16) & 1);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

inline double FromBf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Rounds to the dtype the GPU sees, so the reference runs on exactly the GPU's inputs.
inline std::vector<double> Round(const std::vector<double>& v, int dtype) {
  std::vector<double> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    r[i] = dtype == MAMBA_DTYPE_F32 ? double(float(v[i])) : FromBf16(ToBf16(v[i]));
  }
  return r;
}

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    cudaMalloc(&ptr_, std::max<size_t>(bytes, 4));
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  void* get() const { return ptr_; }
  float* f() const { return static_cast<float*>(ptr_); }
  size_t bytes() const { return bytes_; }
  void Poison() const { cudaMemset(ptr_, 0xff, bytes_); }  // NaN in fp32 and bf16
  std::vector<uint8_t> Bytes() const {
    std::vector<uint8_t> h(bytes_);
    cudaMemcpy(h.data(), ptr_, bytes_, cudaMemcpyDeviceToHost);
    return h;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

enum class Layout { kChannelLast, kSeqLast };  // (B, L, D) as the CPU, or mamba_ssm's (B, D, L)

struct ScanCase {
  int64_t B, L, D, N, G;
  int dtype = MAMBA_DTYPE_F32;
  Layout layout = Layout::kChannelLast;
  bool optionals = true;  // z, D_skip, dt_bias, h0, dh_last present
  bool softplus = true;
};

// Inputs and cotangents of one problem in float64, CPU layout, already rounded to the dtype.
struct ScanData {
  ScanCase c;
  kernels::ScanShape s;
  std::vector<double> u, delta, A, Bm, Cm, Dskip, z, dt_bias, h0, dout, dh_last;

  ScanData(const ScanCase& sc, uint64_t seed) : c(sc) {
    s = {c.B, c.L, c.D, c.N, c.G};
    const int64_t act = c.B * c.L * c.D, bc = c.B * c.L * c.G * c.N, st = c.B * c.D * c.N;
    const int dt = c.dtype;
    u = Round(RandomVector(act, seed + 1), dt);
    delta = c.softplus ? Round(RandomVector(act, seed + 2, -3.0, 0.5), dt)
                       : Round(RandomVector(act, seed + 2, 0.01, 0.3), dt);
    A = Round(RandomVector(c.D * c.N, seed + 3, -2.0, -0.1), MAMBA_DTYPE_F32);
    Bm = Round(RandomVector(bc, seed + 4), dt);
    Cm = Round(RandomVector(bc, seed + 5), dt);
    Dskip = Round(RandomVector(c.D, seed + 6), MAMBA_DTYPE_F32);
    z = Round(RandomVector(act, seed + 7, -2.0, 2.0), dt);
    dt_bias = Round(RandomVector(c.D, seed + 8, -1.0, 0.0), MAMBA_DTYPE_F32);
    h0 = Round(RandomVector(st, seed + 9), MAMBA_DTYPE_F32);
    dout = Round(RandomVector(act, seed + 10), dt);
    dh_last = Round(RandomVector(st, seed + 11), MAMBA_DTYPE_F32);
  }

  kernels::ScanForwardArgs<double> Args() const {
    kernels::ScanForwardArgs<double> a;
    a.u = u.data();
    a.delta = delta.data();
    a.A = A.data();
    a.Bm = Bm.data();
    a.Cm = Cm.data();
    a.delta_softplus = c.softplus;
    if (c.optionals) {
      a.D_skip = Dskip.data();
      a.z = z.data();
      a.dt_bias = dt_bias.data();
      a.h0 = h0.data();
    }
    return a;
  }
};

struct ScanResult {
  std::vector<double> out, h_last;
  std::vector<double> du, ddelta, dA, dBm, dCm, dD, dz, dbias, dh0;
  std::vector<std::vector<uint8_t>> raw;  // every output's bytes, for bitwise comparisons
};

inline ScanResult CpuReference(const ScanData& d) {
  ScanResult r;
  const auto& c = d.c;
  const int64_t act = c.B * c.L * c.D, bc = c.B * c.L * c.G * c.N, st = c.B * c.D * c.N;
  r.out.resize(act);
  r.h_last.resize(st);
  auto a = d.Args();
  a.out = r.out.data();
  a.h_last = r.h_last.data();
  kernels::SelectiveScanForwardCpu<double>(d.s, a);
  kernels::ScanBackwardArgs<double> b;
  b.fwd = d.Args();
  b.dout = d.dout.data();
  r.du.resize(act), r.ddelta.resize(act), r.dz.resize(act), r.dA.resize(c.D * c.N);
  r.dBm.resize(bc), r.dCm.resize(bc), r.dD.resize(c.D), r.dbias.resize(c.D), r.dh0.resize(st);
  b.du = r.du.data();
  b.ddelta = r.ddelta.data();
  b.dA = r.dA.data();
  b.dBm = r.dBm.data();
  b.dCm = r.dCm.data();
  if (c.optionals) {
    b.dh_last = d.dh_last.data();
    b.dz = r.dz.data();
    b.dD_skip = r.dD.data();
    b.ddt_bias = r.dbias.data();
  }
  b.dh0 = r.dh0.data();
  kernels::SelectiveScanBackwardCpu<double>(d.s, b);
  return r;
}

// A (B, L, D) or (B, L, G, N) tensor on the device in the case's dtype and layout.
class DeviceTensor {
 public:
  // dims: {B, L, X} with X = D, or {B, L, G, N}.
  DeviceTensor(std::vector<int64_t> dims, int dtype, Layout layout)
      : dims_(std::move(dims)), dtype_(dtype), layout_(layout) {
    count_ = 1;
    for (int64_t x : dims_) count_ *= x;
    buf_ = DeviceBuffer(count_ * (dtype == MAMBA_DTYPE_F32 ? 4 : 2));
    // Element strides in logical order (b, l, then the channel dims).
    const int64_t B = dims_[0], L = dims_[1], inner = count_ / (B * L);
    if (layout == Layout::kChannelLast) {
      strides_ = {L * inner, inner};
      int64_t s = inner;
      for (size_t k = 2; k < dims_.size(); ++k) strides_.push_back(s /= dims_[k]);
    } else {
      strides_ = {L * inner, 1};
      int64_t s = inner;
      for (size_t k = 2; k < dims_.size(); ++k) strides_.push_back((s /= dims_[k]) * L);
    }
  }
  // Storage offset of the logical CPU-layout index i.
  int64_t Offset(int64_t i) const {
    const int64_t inner = count_ / (dims_[0] * dims_[1]);
    const int64_t c = i % inner, t = (i / inner) % dims_[1], b = i / (inner * dims_[1]);
    int64_t off = b * strides_[0] + t * strides_[1], rem = c;
    for (size_t k = dims_.size() - 1; k >= 2; --k) {
      off += (rem % dims_[k]) * strides_[k];
      rem /= dims_[k];
    }
    return off;
  }
  void Upload(const std::vector<double>& v) {
    if (dtype_ == MAMBA_DTYPE_F32) {
      std::vector<float> h(count_);
      for (int64_t i = 0; i < count_; ++i) h[Offset(i)] = float(v[i]);
      cudaMemcpy(buf_.get(), h.data(), count_ * 4, cudaMemcpyHostToDevice);
    } else {
      std::vector<uint16_t> h(count_);
      for (int64_t i = 0; i < count_; ++i) h[Offset(i)] = ToBf16(v[i]);
      cudaMemcpy(buf_.get(), h.data(), count_ * 2, cudaMemcpyHostToDevice);
    }
  }
  std::vector<double> Download() const {
    std::vector<double> v(count_);
    const std::vector<uint8_t> raw = buf_.Bytes();
    for (int64_t i = 0; i < count_; ++i) {
      const int64_t o = Offset(i);
      if (dtype_ == MAMBA_DTYPE_F32) {
        float f;
        std::memcpy(&f, raw.data() + 4 * o, 4);
        v[i] = f;
      } else {
        uint16_t b;
        std::memcpy(&b, raw.data() + 2 * o, 2);
        v[i] = FromBf16(b);
      }
    }
    return v;
  }
  mamba_tensor3 T3() const { return {buf_.get(), strides_[0], strides_[1], strides_[2]}; }
  mamba_tensor4 T4() const {
    return {buf_.get(), strides_[0], strides_[1], strides_[2], strides_[3]};
  }
  const DeviceBuffer& buffer() const { return buf_; }

 private:
  std::vector<int64_t> dims_;
  int dtype_;
  Layout layout_;
  int64_t count_ = 0;
  std::vector<int64_t> strides_;
  DeviceBuffer buf_;
};

inline DeviceBuffer UploadF32(const std::vector<double>& v) {
  DeviceBuffer b(v.size() * 4);
  std::vector<float> h(v.begin(), v.end());
  cudaMemcpy(b.get(), h.data(), h.size() * 4, cudaMemcpyHostToDevice);
  return b;
}

inline std::vector<double> DownloadF32(const DeviceBuffer& b) {
  std::vector<float> h(b.bytes() / 4);
  cudaMemcpy(h.data(), b.get(), b.bytes(), cudaMemcpyDeviceToHost);
  return std::vector<double>(h.begin(), h.end());
}

// Every element finite (the outputs were poisoned with NaN before the run).
inline bool AllFinite(const std::vector<double>& v) {
  for (double x : v) {
    if (!std::isfinite(x)) return false;
  }
  return true;
}

}  // namespace mamba::testing
