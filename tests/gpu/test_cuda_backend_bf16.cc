// What only bf16 activations have, against the CPU backend in float64 or a host emulation: mixed
// dtypes (additions, the norm's bf16 copy of dx), the deferred cross-entropy statistics, the scan
// reading Bm/Cm in place, and the dtype checks. The ops' bf16 forms beside their float32 ones are
// in test_cuda_backend (CudaBackendActTest). Inputs are random, nonzero and rounded to bf16 first;
// ops whose float result is exact (copies, a single addition) are checked bit for bit against a
// host emulation (float math, then round to nearest even). Outputs are poisoned with NaN first, so
// an entry a kernel forgets to write fails. Without a CUDA device the GPU tests skip.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "tests/gpu/cuda_backend_fixture.h"
#include "tests/test_util.h"
#include "worker/backend.h"

namespace mamba {
namespace {

using testing::FloatBits;
using testing::HostTensor;
using testing::RandomVector;
using testing::RoundBf16;

constexpr DType kBF16 = DType::kBF16;
constexpr DType kF32 = DType::kF32;

class CudaBackendBf16Test : public testing::CudaBackendFixture {
 protected:
  CudaBackendBf16Test() : CudaBackendFixture(kBF16, 4321) {}
};

// dx_copy: the same pass also writes dx rounded to bf16 (out_proj's backward operand), bit for
// bit the rounding of the fp32 dx; an fp32 copy is dx itself.
TEST_F(CudaBackendBf16Test, AddRmsNormBackwardWritesDxCopy) {
  const int64_t rows = 37, dim = 768;
  const Shape s{rows, dim};
  const std::vector<float> dy = Rand(rows * dim), dres = RandF32(rows * dim),
                           ro = RandF32(rows * dim), w = RandF32(dim), rstd = RandF32(rows, 0.5, 2);
  for (const DType copy_dtype : {kBF16, kF32}) {
    Tensor dx = Poisoned(s, kF32), copy = Poisoned(s, copy_dtype),
           dw = Gpu({dim}, std::vector<float>(dim, 0.f), kF32);
    gpu_->AddRmsNormBackward(Gpu(s, dy, kBF16), Gpu(s, dres, kF32), Gpu(s, ro, kF32),
                             Gpu({dim}, w, kF32), Gpu({rows}, rstd, kF32), dx, dw, copy);
    const std::vector<float> got = Fetch(copy), full = Fetch(dx);
    ASSERT_EQ(got.size(), full.size());
    double norm = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const float want = copy_dtype == kBF16 ? RoundBf16(full[i]) : full[i];
      ASSERT_EQ(FloatBits(got[i]), FloatBits(want)) << "entry " << i;
      norm += double(full[i]) * full[i];
    }
    EXPECT_GT(norm, 1.0);  // a copy of zeros proves nothing
  }
}

// Deferred statistics: chunks accumulated on the device and taken once equal the per-chunk
// results added in order on the host (bit for bit), an immediate call in between leaves the
// total alone, and a take resets it.
void CheckAccumulatedCrossEntropy(Backend& be, DType dtype, const Tensor& logits_host,
                                  const Tensor& targets_host) {
  const int64_t rows = logits_host.dim(0), V = logits_host.dim(1);
  const int64_t cuts[] = {0, 40, 41, rows};
  const Tensor logits = be.FromHost(logits_host), targets = be.FromHost(targets_host);
  kernels::CrossEntropyStats want;
  for (int c = 0; c < 3; ++c) {
    Tensor dz = be.Empty({cuts[c + 1] - cuts[c], V}, dtype);
    const kernels::CrossEntropyStats s = be.CrossEntropy(
        logits.Slice(cuts[c], cuts[c + 1]), targets.Slice(cuts[c], cuts[c + 1]), -100, 0.5, dz);
    want.loss_sum += s.loss_sum;
    want.count += s.count;
    want.correct += s.correct;
  }
  for (int c = 0; c < 3; ++c) {
    Tensor dz = be.Empty({cuts[c + 1] - cuts[c], V}, dtype);
    be.AccumulateCrossEntropy(logits.Slice(cuts[c], cuts[c + 1]),
                              targets.Slice(cuts[c], cuts[c + 1]), -100, 0.5, dz);
    if (c == 0) {
      Tensor none;
      be.CrossEntropy(logits, targets, -100, 0.5, none);
    }
  }
  const kernels::CrossEntropyStats got = be.TakeCrossEntropyStats();
  EXPECT_EQ(got.loss_sum, want.loss_sum);
  EXPECT_EQ(got.count, want.count);
  EXPECT_EQ(got.correct, want.correct);
  EXPECT_GT(got.count, 0);
  const kernels::CrossEntropyStats empty = be.TakeCrossEntropyStats();
  EXPECT_EQ(empty.loss_sum, 0.0);
  EXPECT_EQ(empty.count, 0);
  EXPECT_EQ(empty.correct, 0);
}

Tensor CrossEntropyTargets(int64_t rows, int64_t V) {
  std::vector<int32_t> tgt(rows);
  std::mt19937 rng(3);
  for (auto& t : tgt) t = rng() % 7 == 0 ? -100 : static_cast<int32_t>(rng() % V);
  Tensor t = Tensor::Empty({rows}, DType::kI32);
  std::copy(tgt.begin(), tgt.end(), t.data<int32_t>());
  return t;
}

TEST_F(CudaBackendBf16Test, AccumulatedCrossEntropy) {
  const int64_t rows = 97, V = 301;
  for (const DType dtype : {kBF16, kF32}) {
    SCOPED_TRACE(DTypeName(dtype));
    CheckAccumulatedCrossEntropy(*gpu_, dtype, HostTensor({rows, V}, Rand(rows * V, -3, 3), dtype),
                                 CrossEntropyTargets(rows, V));
  }
}

TEST(CpuBackendTest, AccumulatedCrossEntropy) {
  const int64_t rows = 97, V = 301;
  const std::vector<double> z = RandomVector(rows * V, 5, -3, 3);
  std::unique_ptr<Backend> cpu = MakeCpuBackend();
  CheckAccumulatedCrossEntropy(*cpu, kF32,
                               HostTensor({rows, V}, std::vector<float>(z.begin(), z.end()), kF32),
                               CrossEntropyTargets(rows, V));
}

TEST_F(CudaBackendBf16Test, AccumulatedCrossEntropyReportsBadTargets) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        Tensor none;
        gpu_->AccumulateCrossEntropy(Gpu({2, 4}, Rand(8), kBF16), GpuInts({2}, {1, 9}), -100, 1.0,
                                     none);
        gpu_->TakeCrossEntropyStats();
      },
      "cross-entropy target outside");
}

TEST_F(CudaBackendBf16Test, AddMixedDtypes) {
  // dst += src in float, rounded to dst's dtype: exactly the host's float addition, rounded.
  const int64_t n = 70001;
  for (const auto [src_dtype, dst_dtype] :
       {std::array<DType, 2>{kBF16, kBF16}, {kBF16, kF32}, {kF32, kBF16}, {kF32, kF32}}) {
    SCOPED_TRACE(::testing::Message() << DTypeName(src_dtype) << " into " << DTypeName(dst_dtype));
    const std::vector<float> src = src_dtype == kBF16 ? Rand(n) : RandF32(n);
    const std::vector<float> dst = dst_dtype == kBF16 ? Rand(n, -3, 3) : RandF32(n, -3, 3);
    Tensor gdst = Gpu({n}, dst, dst_dtype);
    gpu_->Add(Gpu({n}, src, src_dtype), gdst);
    std::vector<float> want(n);
    for (int64_t i = 0; i < n; ++i) want[i] = dst[i] + src[i];
    ExpectBits(gdst, want, "add");
  }
}

// The scan in bf16 through the backend, as the kernels' own bf16 tests check it: the reference
// in float64 on the rounded inputs. Shapes: the tiled N == 16 kernels (one tile; several tiles and
// segments) and the general kernels (N == 8, several backward segments).
// Bm and Cm read in place as column blocks of one (B, L, K) tensor (x_proj's output, as the
// model passes them), and dBm/dCm written into the same columns of dbc: the same bits as with
// separate tensors, in both dtypes; the other columns of dbc are left as they were.
TEST_F(CudaBackendBf16Test, SelectiveScanReadsBmCmInPlace) {
  const int64_t B = 2, L = 300, D = 64, N = 16, R = 48, K = R + 2 * N;
  const Shape act{B, L, D}, bcs{B, L, 1, N}, st{B, D, N};
  const std::vector<float> u = Rand(B * L * D), delta = Rand(B * L * D, -3.0, 0.5),
                           z = Rand(B * L * D, -2.0, 2.0), dout = Rand(B * L * D),
                           bc = Rand(B * L * K), dbc0 = Rand(B * L * K);
  const std::vector<float> A = RandF32(D * N, -2.0, -0.1), Dskip = RandF32(D),
                           bias = RandF32(D, -1.0, 0.0);
  std::vector<float> Bm(B * L * N), Cm(B * L * N);
  for (int64_t r = 0; r < B * L; ++r) {
    for (int64_t n = 0; n < N; ++n) {
      Bm[r * N + n] = bc[r * K + R + n];
      Cm[r * N + n] = bc[r * K + R + N + n];
    }
  }
  for (const DType dt : {kF32, kBF16}) {
    SCOPED_TRACE(DTypeName(dt));
    ScanInputs sep;
    sep.u = Gpu(act, u, dt);
    sep.delta = Gpu(act, delta, dt);
    sep.A = Gpu({D, N}, A, kF32);
    sep.D_skip = Gpu({D}, Dskip, kF32);
    sep.z = Gpu(act, z, dt);
    sep.dt_bias = Gpu({D}, bias, kF32);
    ScanInputs blk = sep;
    sep.Bm = Gpu(bcs, Bm, dt);
    sep.Cm = Gpu(bcs, Cm, dt);
    blk.bc = Gpu({B, L, K}, bc, dt);
    blk.bm_col = R;
    blk.cm_col = R + N;
    Tensor y_sep = Poisoned(act, dt), y_blk = Poisoned(act, dt), none;
    gpu_->SelectiveScanForward(sep, y_sep, none);
    gpu_->SelectiveScanForward(blk, y_blk, none);
    ExpectSameBits(y_sep, y_blk, "scan out");
    const std::vector<float> y = Fetch(y_sep);
    EXPECT_GT(std::abs(y[0]) + std::abs(y[y.size() / 2]), 0.f);

    auto grads = [&] {
      ScanGrads g;
      g.du = Poisoned(act, dt);
      g.ddelta = Poisoned(act, dt);
      g.dA = Poisoned({D, N}, kF32);
      g.dD_skip = Poisoned({D}, kF32);
      g.dz = Poisoned(act, dt);
      g.ddt_bias = Poisoned({D}, kF32);
      return g;
    };
    ScanGrads gs = grads(), gb = grads();
    gs.dBm = Poisoned(bcs, dt);
    gs.dCm = Poisoned(bcs, dt);
    gb.dbc = Gpu({B, L, K}, dbc0, dt);
    gpu_->SelectiveScanBackward(sep, Gpu(act, dout, dt), Tensor(), gs);
    gpu_->SelectiveScanBackward(blk, Gpu(act, dout, dt), Tensor(), gb);
    ExpectSameBits(gs.du, gb.du, "du");
    ExpectSameBits(gs.ddelta, gb.ddelta, "ddelta");
    ExpectSameBits(gs.dz, gb.dz, "dz");
    ExpectSameBits(gs.dA, gb.dA, "dA");
    ExpectSameBits(gs.dD_skip, gb.dD_skip, "dD");
    ExpectSameBits(gs.ddt_bias, gb.ddt_bias, "ddt_bias");
    const std::vector<float> dB = Fetch(gs.dBm), dC = Fetch(gs.dCm), dbc = Fetch(gb.dbc),
                             before = Fetch(Gpu({B, L, K}, dbc0, dt));
    for (int64_t r = 0; r < B * L; ++r) {
      for (int64_t k = 0; k < K; ++k) {
        const float want = k < R       ? before[r * K + k]
                           : k < R + N ? dB[r * N + k - R]
                                       : dC[r * N + k - R - N];
        ASSERT_EQ(FloatBits(dbc[r * K + k]), FloatBits(want)) << "dbc row " << r << " column " << k;
      }
    }
  }
}

// Mixed dtypes abort naming the op and the tensors.
TEST_F(CudaBackendBf16Test, DtypeMismatchesAbortNamingThem) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const Shape xs{2, 5, 8};
  EXPECT_DEATH(
      {
        Tensor y = Poisoned(xs, kF32);
        gpu_->CausalConv1dForward(Gpu(xs, Rand(80), kBF16), Gpu({8, 1, 4}, Rand(32), kF32),
                                  Tensor(), Tensor(), true, y);
      },
      "conv1d_fwd: x and y must share one dtype");
  EXPECT_DEATH(
      {
        Tensor ro = Poisoned({4, 8}, kBF16);
        Tensor y = Poisoned({4, 8}, kBF16);
        Tensor rstd = Poisoned({4}, kF32);
        gpu_->AddRmsNormForward(Tensor(), Gpu({4, 8}, Rand(32), kBF16), Gpu({8}, Rand(8), kF32),
                                1e-5, ro, y, rstd);
      },
      "rmsnorm_fwd: residual_out must be float32");
  EXPECT_DEATH(
      {
        Tensor dz = Poisoned({4, 8}, kF32);
        gpu_->CrossEntropy(Gpu({4, 8}, Rand(32), kBF16), GpuInts({4}, {0, 1, 2, 3}), -100, 1.0, dz);
      },
      "cross_entropy: logits and dlogits must share one dtype");
  EXPECT_DEATH(
      {
        Tensor dst = gpu_->FromHost(Tensor::Zeros({4}, DType::kF64));
        gpu_->Add(Gpu({4}, Rand(4), kBF16), dst);
      },
      "add: dst must be float32 or bfloat16");
  // The scan: an input, then a gradient, of the other activation dtype.
  const int64_t B = 1, L = 3, D = 4, N = 2;
  auto scan_inputs = [&](DType bm_dtype) {
    ScanInputs in;
    in.u = Gpu({B, L, D}, Rand(B * L * D), kBF16);
    in.delta = Gpu({B, L, D}, Rand(B * L * D), kBF16);
    in.A = Gpu({D, N}, RandF32(D * N, -1, -0.1), kF32);
    in.Bm = Gpu({B, L, 1, N}, Rand(B * L * N), bm_dtype);
    in.Cm = Gpu({B, L, 1, N}, Rand(B * L * N), kBF16);
    return in;
  };
  EXPECT_DEATH(
      {
        Tensor out = Poisoned({B, L, D}, kBF16);
        Tensor none;
        gpu_->SelectiveScanForward(scan_inputs(kF32), out, none);
      },
      "selective_scan_fwd: u and Bm must share one dtype");
  EXPECT_DEATH(
      {
        ScanGrads g;
        g.du = Poisoned({B, L, D}, kF32);
        g.ddelta = Poisoned({B, L, D}, kBF16);
        g.dA = Poisoned({D, N}, kF32);
        g.dBm = Poisoned({B, L, 1, N}, kBF16);
        g.dCm = Poisoned({B, L, 1, N}, kBF16);
        gpu_->SelectiveScanBackward(scan_inputs(kBF16), Gpu({B, L, D}, Rand(B * L * D), kBF16),
                                    Tensor(), g);
      },
      "selective_scan_bwd: du must have the dtype of u");
}

TEST(CpuBackendTest, RejectsBf16) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  std::unique_ptr<Backend> cpu = MakeCpuBackend();
  EXPECT_DEATH(
      {
        Tensor y = Tensor::Empty({4}, kBF16);
        cpu->SiluForward(HostTensor({4}, {1, 2, 3, 4}, kBF16), y);
      },
      "CPU backend supports float32 and float64, got .*bfloat16");
}

}  // namespace
}  // namespace mamba
