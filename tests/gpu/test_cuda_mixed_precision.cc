// The CUDA backend's mixed-precision ops: Linear with every combination of fp32 and bf16
// operands and outputs (GemmPrecision::kBf16) against the float64 CPU result on the bf16-rounded
// operands; Convert; CopyFromHost into views; AdamW's fused bf16 shadow and gradient scale.
// Outputs are poisoned with NaN first, so an entry a kernel forgets to write fails the
// comparison. Without a CUDA device every test skips with a message.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "tests/gpu/cuda_backend_fixture.h"
#include "tests/test_util.h"
#include "worker/backend.h"

namespace mamba {
namespace {

using testing::Bf16Bits;
using testing::RoundToBf16;

// The backend multiplies in bf16 (GemmPrecision::kBf16); inputs are float32 values.
class CudaMixedPrecisionTest : public testing::CudaBackendFixture {
 protected:
  CudaMixedPrecisionTest() : CudaBackendFixture(DType::kF32, 4321, Bf16Gemms()) {}
  static CudaBackendOptions Bf16Gemms() {
    CudaBackendOptions options;
    options.gemm_precision = GemmPrecision::kBf16;
    return options;
  }
  std::vector<uint16_t> FetchBits(const Tensor& t) {
    EXPECT_EQ(t.dtype(), DType::kBF16);
    const Tensor h = gpu_->ToHost(t);
    const auto* bits = static_cast<const uint16_t*>(h.raw());
    return std::vector<uint16_t>(bits, bits + h.numel());
  }
};

const char* Name(DType d) { return d == DType::kBF16 ? "bf16" : "fp32"; }
std::string Dims(int64_t M, int64_t N, int64_t K) {
  return std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K);
}

// fp32 outputs keep the fp32 accumulation (1e-5, as in fp32 mode); a bf16 output adds one
// rounding of its own (2^-9 relative) and, with a bias, the bias's.
double OutputTol(DType d) { return d == DType::kBF16 ? 8e-3 : 1e-5; }

TEST_F(CudaMixedPrecisionTest, LinearForwardEveryDtype) {
  const DType kDtypes[] = {DType::kF32, DType::kBF16};
  // Sizes that are not (first) and are (second) multiples of 4: both conversion paths.
  for (const auto& [M, N, K] : {std::tuple<int64_t, int64_t, int64_t>{133, 67, 259},
                                std::tuple<int64_t, int64_t, int64_t>{256, 96, 512}}) {
    const std::vector<float> x = Rand(M * K), w = Rand(N * K), b = Rand(N);
    Tensor ry = cpu_->Empty({M, N}, DType::kF64), ryb = cpu_->Empty({M, N}, DType::kF64);
    cpu_->LinearForward(Ref({M, K}, RoundToBf16(x)), Ref({N, K}, RoundToBf16(w)), Tensor(), ry);
    cpu_->LinearForward(Ref({M, K}, RoundToBf16(x)), Ref({N, K}, RoundToBf16(w)), Ref({N}, b), ryb);
    for (const DType xd : kDtypes) {
      for (const DType wd : kDtypes) {
        for (const DType yd : kDtypes) {
          for (const bool with_bias : {false, true}) {
            const std::string what = Dims(M, N, K) + " x " + Name(xd) + " w " + Name(wd) + " y " +
                                     Name(yd) + (with_bias ? " bias" : "");
            Tensor y = Poisoned({M, N}, yd);
            gpu_->LinearForward(Gpu({M, K}, x, xd), Gpu({N, K}, w, wd),
                                with_bias ? Gpu({N}, b) : Tensor(), y);
            ASSERT_EQ(y.dtype(), yd);
            ExpectClose(y, with_bias ? ryb : ry, what, OutputTol(yd));
          }
        }
      }
    }
  }
}

TEST_F(CudaMixedPrecisionTest, LinearBackwardEveryDtype) {
  const DType kDtypes[] = {DType::kF32, DType::kBF16};
  for (const auto& [M, N, K] : {std::tuple<int64_t, int64_t, int64_t>{133, 67, 259},
                                std::tuple<int64_t, int64_t, int64_t>{256, 96, 512}}) {
    const std::vector<float> x = Rand(M * K), w = Rand(N * K), dy = Rand(M * N), dw0 = Rand(N * K),
                             db0 = Rand(N);
    const std::vector<float> dyr = RoundToBf16(dy);
    Tensor rdx = cpu_->Empty({M, K}, DType::kF64), rdw = Ref({N, K}, dw0), none;
    cpu_->LinearBackward(Ref({M, N}, dyr), Ref({M, K}, RoundToBf16(x)), Ref({N, K}, RoundToBf16(w)),
                         rdx, rdw, none);
    // dbias sums dy as it is given: exactly, or rounded to bf16.
    Tensor rdb[2] = {Ref({N}, db0), Ref({N}, db0)};
    for (int64_t r = 0; r < M; ++r) {
      for (int64_t n = 0; n < N; ++n) {
        rdb[0].data<double>()[n] += dy[r * N + n];
        rdb[1].data<double>()[n] += dyr[r * N + n];
      }
    }
    for (const DType dyd : kDtypes) {
      for (const DType xd : kDtypes) {
        for (const DType wd : kDtypes) {
          for (const DType dxd : kDtypes) {
            const std::string what = Dims(M, N, K) + " dy " + Name(dyd) + " x " + Name(xd) + " w " +
                                     Name(wd) + " dx " + Name(dxd);
            Tensor dx = Poisoned({M, K}, dxd), dw = Gpu({N, K}, dw0), db = Gpu({N}, db0);
            gpu_->LinearBackward(Gpu({M, N}, dy, dyd), Gpu({M, K}, x, xd), Gpu({N, K}, w, wd), dx,
                                 dw, db);
            ExpectClose(dx, rdx, what + ": dx", OutputTol(dxd));
            ExpectClose(dw, rdw, what + ": dw", 1e-5);
            ExpectClose(db, rdb[dyd == DType::kBF16], what + ": dbias", 1e-5);
          }
        }
      }
    }
  }
}

// accumulate_dx: dx += dy w, in fp32 and bf16 dx (the model sums x_proj's and the scan's input
// gradients, and in_proj's two halves, this way).
TEST_F(CudaMixedPrecisionTest, LinearBackwardAccumulatesDx) {
  const int64_t M = 133, N = 67, K = 259;
  const std::vector<float> x = Rand(M * K), w = Rand(N * K), dy = Rand(M * N), dx0 = Rand(M * K);
  // The GEMM operands are bf16 either way (rounded in the workspace when fp32); dx's previous
  // value is exact in fp32.
  const std::vector<float> xs = RoundToBf16(x), ws = RoundToBf16(w), dys = RoundToBf16(dy);
  for (const DType d : {DType::kF32, DType::kBF16}) {
    const std::vector<float> dx0s = d == DType::kBF16 ? RoundToBf16(dx0) : dx0;
    Tensor rdx = Ref({M, K}, dx0s), rdw = cpu_->Empty({N, K}, DType::kF64), none;
    cpu_->Zero(rdw);
    cpu_->LinearBackward(Ref({M, N}, dys), Ref({M, K}, xs), Ref({N, K}, ws), rdx, rdw, none,
                         /*accumulate_dx=*/true);
    Tensor dx = Gpu({M, K}, dx0, d), dw = Gpu({N, K}, std::vector<float>(N * K, 0.f));
    gpu_->LinearBackward(Gpu({M, N}, dy, d), Gpu({M, K}, x, d), Gpu({N, K}, w, d), dx, dw, none,
                         /*accumulate_dx=*/true);
    ExpectClose(dx, rdx, std::string("accumulated dx ") + Name(d), OutputTol(d));
    ExpectClose(dw, rdw, std::string("dw ") + Name(d), 1e-5);
  }
}

TEST_F(CudaMixedPrecisionTest, LinearWithBf16TensorsIsDeterministic) {
  const int64_t M = 133, N = 67, K = 259;
  const std::vector<float> x = Rand(M * K), w = Rand(N * K), dy = Rand(M * N), dw0 = Rand(N * K),
                           db0 = Rand(N);
  Tensor y[2], dx[2], dw[2], db[2];
  for (int run = 0; run < 2; ++run) {
    y[run] = Poisoned({M, N}, DType::kBF16);
    gpu_->LinearForward(Gpu({M, K}, x, DType::kBF16), Gpu({N, K}, w, DType::kBF16), Tensor(),
                        y[run]);
    dx[run] = Poisoned({M, K}, DType::kBF16);
    dw[run] = Gpu({N, K}, dw0);
    db[run] = Gpu({N}, db0);
    gpu_->LinearBackward(Gpu({M, N}, dy, DType::kBF16), Gpu({M, K}, x, DType::kBF16),
                         Gpu({N, K}, w, DType::kBF16), dx[run], dw[run], db[run]);
  }
  EXPECT_EQ(FetchBits(y[0]), FetchBits(y[1]));
  EXPECT_EQ(FetchBits(dx[0]), FetchBits(dx[1]));
  EXPECT_EQ(Fetch(dw[0]), Fetch(dw[1]));
  EXPECT_EQ(Fetch(db[0]), Fetch(db[1]));
}

// A bf16 weight (the model's shadow) and an fp32 one holding the same rounded values give the
// same bits: the shadow only skips the conversion.
TEST_F(CudaMixedPrecisionTest, Bf16WeightEqualsItsRoundedFp32Copy) {
  const int64_t M = 256, N = 96, K = 512;
  const std::vector<float> x = Rand(M * K), w = Rand(N * K), dy = Rand(M * N);
  Tensor y32 = Poisoned({M, N}, DType::kF32), y16 = Poisoned({M, N}, DType::kF32);
  gpu_->LinearForward(Gpu({M, K}, x), Gpu({N, K}, w), Tensor(), y32);
  gpu_->LinearForward(Gpu({M, K}, x), Gpu({N, K}, w, DType::kBF16), Tensor(), y16);
  EXPECT_EQ(Fetch(y32), Fetch(y16));
  Tensor dx32 = Poisoned({M, K}, DType::kF32), dx16 = Poisoned({M, K}, DType::kF32), none;
  Tensor dw32 = Gpu({N, K}, std::vector<float>(N * K, 0.f)),
         dw16 = Gpu({N, K}, std::vector<float>(N * K, 0.f));
  gpu_->LinearBackward(Gpu({M, N}, dy), Gpu({M, K}, x), Gpu({N, K}, w), dx32, dw32, none);
  gpu_->LinearBackward(Gpu({M, N}, dy), Gpu({M, K}, x), Gpu({N, K}, w, DType::kBF16), dx16, dw16,
                       none);
  EXPECT_EQ(Fetch(dx32), Fetch(dx16));
  EXPECT_EQ(Fetch(dw32), Fetch(dw16));
}

TEST_F(CudaMixedPrecisionTest, Bf16TensorsNeedBf16Gemms) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EQ(gpu_->GemmOperandDType(DType::kF32), DType::kBF16);
  std::unique_ptr<Backend> fp32 = MakeCudaBackend();
  EXPECT_EQ(fp32->GemmOperandDType(DType::kF32), DType::kF32);
  EXPECT_DEATH(
      {
        Tensor y = fp32->Empty({2, 3}, DType::kF32);
        fp32->LinearForward(Gpu({2, 4}, Rand(8), DType::kBF16), Gpu({3, 4}, Rand(12)), Tensor(), y);
      },
      "linear_fwd: a bfloat16 GEMM tensor needs GemmPrecision::kBf16");
  EXPECT_DEATH(
      {
        Tensor y = fp32->Empty({2, 3}, DType::kBF16);
        fp32->LinearForward(Gpu({2, 4}, Rand(8)), Gpu({3, 4}, Rand(12)), Tensor(), y);
      },
      "linear_fwd: a bfloat16 GEMM tensor needs GemmPrecision::kBf16");
}

TEST_F(CudaMixedPrecisionTest, ConvertRoundsToNearestEven) {
  // Ties both ways, values that round up into the next binade, tiny and huge ones, then random.
  std::vector<float> v = {1.0f,     1.00390625f, 1.01171875f, -1.00390625f, 1.9999999f,
                          1.0e-30f, -0.f,        3.0e38f,     0.1f,         -2.5e-5f};
  for (float r : Rand(1002, -100, 100)) v.push_back(r);
  ASSERT_EQ(v.size() % 4, 0u);           // the vectorized path at offset 0
  for (const int64_t offset : {0, 1}) {  // an unaligned view: the scalar path
    const int64_t n = int64_t(v.size()) - offset;
    std::vector<float> src(v.begin() + offset, v.end());
    Tensor f = Gpu({int64_t(v.size())}, v).View(offset, {n});
    Tensor b = Poisoned({n}, DType::kBF16);
    gpu_->Convert(f, b);
    std::vector<uint16_t> want(n);
    for (int64_t i = 0; i < n; ++i) want[i] = Bf16Bits(src[i]);
    EXPECT_EQ(FetchBits(b), want) << "offset " << offset;
    Tensor back = Poisoned({n}, DType::kF32);
    gpu_->Convert(b, back);
    EXPECT_EQ(Fetch(back), RoundToBf16(src)) << "offset " << offset;
  }
}

TEST_F(CudaMixedPrecisionTest, CopyFromHostWritesOnlyTheView) {
  const std::vector<float> outer = Rand(100), inner = Rand(30);
  Tensor t = Gpu({100}, outer);
  Tensor view = t.View(40, {5, 6});
  Tensor host = Tensor::Empty({5, 6}, DType::kF32);
  std::copy(inner.begin(), inner.end(), host.data<float>());
  gpu_->CopyFromHost(host, view);
  std::vector<float> want = outer;
  std::copy(inner.begin(), inner.end(), want.begin() + 40);
  EXPECT_EQ(Fetch(t), want);
}

// AdamW's fused shadow is the bf16 rounding of the updated fp32 value, bit for bit; the gradient
// scale is applied exactly as a Scale pass before it (same bits); both against float64.
TEST_F(CudaMixedPrecisionTest, AdamWShadowAndGradScale) {
  const int64_t n = 10007;  // odd: not a multiple of any vector width
  const std::vector<float> p = Rand(n), m = Rand(n, -0.1, 0.1), v = Rand(n, 0, 0.01);
  Tensor gp = Gpu({n}, p), gm = Gpu({n}, m), gv = Gpu({n}, v);
  Tensor sp = Gpu({n}, p), sm = Gpu({n}, m), sv = Gpu({n}, v);  // with a Scale pass
  Tensor rp = Ref({n}, p), rm = Ref({n}, m), rv = Ref({n}, v);
  Tensor shadow = Poisoned({n}, DType::kBF16), none;
  AdamWHyper h;
  h.lr = 3e-3;
  h.weight_decay = 0.1;
  for (int step = 1; step <= 3; ++step) {
    h.step = step;
    const std::vector<float> g = Rand(n, -4, 4);
    const double scale = 0.3 + 0.2 * step;
    AdamWHyper hs = h;
    hs.grad_scale = scale;
    gpu_->AdamW(gp, Gpu({n}, g), gm, gv, shadow, hs);
    Tensor scaled = Gpu({n}, g);
    gpu_->Scale(scaled, scale);
    gpu_->AdamW(sp, scaled, sm, sv, none, h);
    // The float64 reference scales by the float32 factor, as the GPU does.
    AdamWHyper hr = h;
    hr.grad_scale = double(float(scale));
    cpu_->AdamW(rp, Ref({n}, g), rm, rv, none, hr);
  }
  ExpectClose(gp, rp, "adamw param", 1e-5);
  ExpectClose(gm, rm, "adamw m", 1e-5);
  ExpectClose(gv, rv, "adamw v", 1e-5);
  EXPECT_EQ(Fetch(gp), Fetch(sp)) << "grad_scale differs from a Scale pass";
  EXPECT_EQ(Fetch(gm), Fetch(sm));
  EXPECT_EQ(Fetch(gv), Fetch(sv));
  const std::vector<float> updated = Fetch(gp);
  std::vector<uint16_t> want(n);
  for (int64_t i = 0; i < n; ++i) want[i] = Bf16Bits(updated[i]);
  EXPECT_EQ(FetchBits(shadow), want);
}

}  // namespace
}  // namespace mamba
