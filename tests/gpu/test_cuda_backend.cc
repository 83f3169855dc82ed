// Every op of the CUDA backend against the CPU backend. The oracle runs in float64 on the same
// (float32-representable) random inputs, and errors are global relative errors (largest |diff|
// over largest |reference|) that must be <= 1e-5 (GEMMs with TF32 off included). Sizes are odd on
// purpose (not multiples of warps, blocks or chunks). Outputs are poisoned with NaN first, so an
// entry a kernel forgets to write fails the comparison; accumulating outputs start from random
// values, so += is checked too. Every op also runs twice and must give identical bits. The ops
// whose activations take either dtype (embedding, norm, conv1d, SiLU, cross-entropy, column
// copies, the scan) run on float32 and on bf16 activations (CudaBackendActTest): inputs rounded
// to bf16 first, so both backends see the same numbers; bf16 outputs within kBf16Tol (rounding to
// 8 significant bits costs 2^-9 of each entry), float32 outputs (residual stream, statistics,
// parameter gradients, scan state) within the float32 tolerances, since bf16 inputs widen exactly
// and the kernels compute in float. test_cuda_backend_bf16 has the checks that only bf16 has.
// Without a CUDA device every test skips with a message.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "tests/gpu/cuda_backend_fixture.h"
#include "tests/test_util.h"
#include "worker/backend.h"

namespace mamba {
namespace {

using testing::HostInts;
using testing::HostTensor;
using testing::kBf16Tol;
using testing::kF32Tol;
using testing::kScanGradTol;
using testing::Values;

class CudaBackendTest : public testing::CudaBackendFixture {
 protected:
  CudaBackendTest() : CudaBackendFixture(DType::kF32, 1234) {}
};

TEST_F(CudaBackendTest, MemoryRoundTripsAndZero) {
  const std::vector<float> v = Rand(1001);
  Tensor t = Gpu({7, 143}, v);
  EXPECT_EQ(t.device(), Device::kCUDA);
  EXPECT_EQ(Fetch(t), v);
  const std::vector<int32_t> ids = {3, -1, 7, 2147483647};
  Tensor hi = gpu_->ToHost(GpuInts({4}, ids));
  EXPECT_EQ(std::vector<int32_t>(hi.data<int32_t>(), hi.data<int32_t>() + 4), ids);
  gpu_->Zero(t);
  for (float x : Fetch(t)) ASSERT_EQ(x, 0.f);
  Tensor e = gpu_->Empty({0, 5}, DType::kF32);  // empty tensors are still defined
  EXPECT_TRUE(e.defined());
  EXPECT_EQ(gpu_->ToHost(e).numel(), 0);
}

TEST_F(CudaBackendTest, Linear) {
  const int64_t M = 133, N = 67, K = 259;
  const std::vector<float> x = Rand(M * K), w = Rand(N * K), b = Rand(N), dy = Rand(M * N),
                           dw0 = Rand(N * K), db0 = Rand(N);
  for (const bool with_bias : {true, false}) {
    SCOPED_TRACE(with_bias ? "bias" : "no bias");
    Tensor gb = with_bias ? Gpu({N}, b) : Tensor(), rb = with_bias ? Ref({N}, b) : Tensor();
    Tensor gy = Poisoned({M, N}), gy2 = Poisoned({M, N}), ry = cpu_->Empty({M, N}, DType::kF64);
    gpu_->LinearForward(Gpu({M, K}, x), Gpu({N, K}, w), gb, gy);
    gpu_->LinearForward(Gpu({M, K}, x), Gpu({N, K}, w), gb, gy2);
    cpu_->LinearForward(Ref({M, K}, x), Ref({N, K}, w), rb, ry);
    ExpectClose(gy, ry, "linear y");
    ExpectSameBits(gy, gy2, "linear y");

    Tensor gdx = Poisoned({M, K}), gdw = Gpu({N, K}, dw0),
           gdb = with_bias ? Gpu({N}, db0) : Tensor();
    Tensor gdx2 = Poisoned({M, K}), gdw2 = Gpu({N, K}, dw0),
           gdb2 = with_bias ? Gpu({N}, db0) : Tensor();
    Tensor rdx = cpu_->Empty({M, K}, DType::kF64), rdw = Ref({N, K}, dw0),
           rdb = with_bias ? Ref({N}, db0) : Tensor();
    gpu_->LinearBackward(Gpu({M, N}, dy), Gpu({M, K}, x), Gpu({N, K}, w), gdx, gdw, gdb);
    gpu_->LinearBackward(Gpu({M, N}, dy), Gpu({M, K}, x), Gpu({N, K}, w), gdx2, gdw2, gdb2);
    cpu_->LinearBackward(Ref({M, N}, dy), Ref({M, K}, x), Ref({N, K}, w), rdx, rdw, rdb);
    ExpectClose(gdx, rdx, "linear dx");
    ExpectClose(gdw, rdw, "linear dw");
    ExpectSameBits(gdx, gdx2, "linear dx");
    ExpectSameBits(gdw, gdw2, "linear dw");
    if (with_bias) {
      ExpectClose(gdb, rdb, "linear dbias");
      ExpectSameBits(gdb, gdb2, "linear dbias");
    }
  }
  // dx is optional.
  Tensor none, gdw = Gpu({N, K}, dw0), rdw = Ref({N, K}, dw0);
  gpu_->LinearBackward(Gpu({M, N}, dy), Gpu({M, K}, x), Gpu({N, K}, w), none, gdw, none);
  cpu_->LinearBackward(Ref({M, N}, dy), Ref({M, K}, x), Ref({N, K}, w), none, rdw, none);
  ExpectClose(gdw, rdw, "linear dw without dx");
}

TEST_F(CudaBackendTest, LinearWithTf32) {
  // TF32 operands keep 10 mantissa bits: about 1e-3 relative error, not 1e-5.
  CudaBackendOptions options;
  options.gemm_precision = GemmPrecision::kTf32;
  std::unique_ptr<Backend> tf32 = MakeCudaBackend(options);
  const int64_t M = 257, N = 129, K = 515;
  const std::vector<float> x = Rand(M * K), w = Rand(N * K), b = Rand(N);
  Tensor gy = Poisoned({M, N}), ry = cpu_->Empty({M, N}, DType::kF64);
  tf32->LinearForward(Gpu({M, K}, x), Gpu({N, K}, w), Gpu({N}, b), gy);
  cpu_->LinearForward(Ref({M, K}, x), Ref({N, K}, w), Ref({N}, b), ry);
  tf32->ToHost(gy);  // waits for the second backend's stream
  ExpectClose(gy, ry, "tf32 linear y", 5e-3);
}

TEST_F(CudaBackendTest, LinearWithBf16) {
  // bf16 operands keep 8 mantissa bits: within 1e-2 of the float64 product of the fp32 inputs;
  // and, since the products accumulate in fp32, within fp32 tolerance of the float64 product of
  // the bf16-rounded inputs (which shows the operands really were rounded, to nearest even).
  CudaBackendOptions options;
  options.gemm_precision = GemmPrecision::kBf16;
  std::unique_ptr<Backend> bf16 = MakeCudaBackend(options);
  // The first shape's operand sizes are not multiples of 4 (the scalar conversion path), the
  // second's are (the vectorized one).
  for (const auto& [M, N, K] : {std::tuple<int64_t, int64_t, int64_t>{133, 67, 259},
                                std::tuple<int64_t, int64_t, int64_t>{256, 96, 512}}) {
    SCOPED_TRACE(::testing::Message() << "M " << M << " N " << N << " K " << K);
    const std::vector<float> x = Rand(M * K), w = Rand(N * K), b = Rand(N), dy = Rand(M * N),
                             dw0 = Rand(N * K), db0 = Rand(N);
    const std::vector<float> xr = testing::RoundToBf16(x), wr = testing::RoundToBf16(w),
                             dyr = testing::RoundToBf16(dy);
    ASSERT_NE(xr, x);  // the rounded reference differs from the exact one

    Tensor gy = Poisoned({M, N}), gy2 = Poisoned({M, N});
    Tensor ry = cpu_->Empty({M, N}, DType::kF64), ryr = cpu_->Empty({M, N}, DType::kF64);
    bf16->LinearForward(Gpu({M, K}, x), Gpu({N, K}, w), Gpu({N}, b), gy);
    bf16->LinearForward(Gpu({M, K}, x), Gpu({N, K}, w), Gpu({N}, b), gy2);
    cpu_->LinearForward(Ref({M, K}, x), Ref({N, K}, w), Ref({N}, b), ry);
    cpu_->LinearForward(Ref({M, K}, xr), Ref({N, K}, wr), Ref({N}, b), ryr);
    bf16->ToHost(gy2);  // waits for the bf16 backend's stream
    ExpectClose(gy, ry, "bf16 linear y", 1e-2);
    ExpectClose(gy, ryr, "bf16 linear y vs rounded operands");
    ExpectSameBits(gy, gy2, "bf16 linear y");

    Tensor gdx = Poisoned({M, K}), gdw = Gpu({N, K}, dw0), gdb = Gpu({N}, db0);
    Tensor gdx2 = Poisoned({M, K}), gdw2 = Gpu({N, K}, dw0), gdb2 = Gpu({N}, db0);
    Tensor rdx = cpu_->Empty({M, K}, DType::kF64), rdw = Ref({N, K}, dw0), rdb = Ref({N}, db0);
    Tensor rdxr = cpu_->Empty({M, K}, DType::kF64), rdwr = Ref({N, K}, dw0), rdbr = Ref({N}, db0);
    bf16->LinearBackward(Gpu({M, N}, dy), Gpu({M, K}, x), Gpu({N, K}, w), gdx, gdw, gdb);
    bf16->LinearBackward(Gpu({M, N}, dy), Gpu({M, K}, x), Gpu({N, K}, w), gdx2, gdw2, gdb2);
    cpu_->LinearBackward(Ref({M, N}, dy), Ref({M, K}, x), Ref({N, K}, w), rdx, rdw, rdb);
    cpu_->LinearBackward(Ref({M, N}, dyr), Ref({M, K}, xr), Ref({N, K}, wr), rdxr, rdwr, rdbr);
    bf16->ToHost(gdb2);
    ExpectClose(gdx, rdx, "bf16 linear dx", 1e-2);
    ExpectClose(gdw, rdw, "bf16 linear dw", 1e-2);
    ExpectClose(gdx, rdxr, "bf16 linear dx vs rounded operands");
    ExpectClose(gdw, rdwr, "bf16 linear dw vs rounded operands");
    // dbias sums the fp32 dy exactly as in fp32 mode.
    ExpectClose(gdb, rdb, "bf16 linear dbias");
    ExpectSameBits(gdx, gdx2, "bf16 linear dx");
    ExpectSameBits(gdw, gdw2, "bf16 linear dw");
    ExpectSameBits(gdb, gdb2, "bf16 linear dbias");

    // dx is optional (no bf16 copy of w then).
    Tensor none, gdw3 = Gpu({N, K}, dw0);
    bf16->LinearBackward(Gpu({M, N}, dy), Gpu({M, K}, x), Gpu({N, K}, w), none, gdw3, none);
    bf16->ToHost(gdw3);
    ExpectSameBits(gdw3, gdw, "bf16 linear dw without dx");
  }
}

// Ops whose activations take either dtype, on both: float32 activations within kF32Tol, bf16
// ones (inputs rounded to bf16, so both backends see the same numbers) within kBf16Tol;
// parameters and their gradients are float32 (kF32Tol).
class CudaBackendActTest : public testing::CudaBackendFixture,
                           public ::testing::WithParamInterface<DType> {
 protected:
  CudaBackendActTest() : CudaBackendFixture(GetParam(), 2468) {}
};
INSTANTIATE_TEST_SUITE_P(Activations, CudaBackendActTest,
                         ::testing::Values(DType::kF32, DType::kBF16),
                         [](const ::testing::TestParamInfo<DType>& info) {
                           return std::string(DTypeName(info.param));
                         });

// Shapes: one time tile with float2 channels; several time tiles (L not a multiple of the tile)
// with the widest vectors forward; odd C (scalar path) with L shorter than the kernel.
TEST_P(CudaBackendActTest, CausalConv1d) {
  const DType act = GetParam();
  struct ConvShape {
    int64_t B, L, C;
  };
  for (const ConvShape shape : {ConvShape{3, 37, 70}, ConvShape{2, 300, 132}, ConvShape{2, 2, 67}})
    for (const int64_t K : {4, 1, 3}) {
      for (const bool silu : {true, false}) {
        for (const bool with_prefix : {false, true}) {
          const int64_t B = shape.B, L = shape.L, C = shape.C;
          SCOPED_TRACE(::testing::Message() << "B " << B << " L " << L << " C " << C << " K " << K
                                            << " silu " << silu << " prefix " << with_prefix);
          const Shape xs{B, L, C}, ps{B, K - 1, C};
          const std::vector<float> x = Rand(B * L * C, -2, 2), w = RandF32(C * K), b = RandF32(C),
                                   pre = Rand(B * (K - 1) * C), dy = Rand(B * L * C),
                                   dw0 = RandF32(C * K), db0 = RandF32(C);
          Tensor gp = with_prefix ? Gpu(ps, pre, act) : Tensor(),
                 rp = with_prefix ? Ref(ps, pre) : Tensor();
          Tensor gx = Gpu(xs, x, act), gw = Gpu({C, 1, K}, w), gb = Gpu({C}, b);
          Tensor rx = Ref(xs, x), rw = Ref({C, 1, K}, w), rb = Ref({C}, b);
          Tensor gy = Poisoned(xs, act), ry = cpu_->Empty(xs, DType::kF64);
          gpu_->CausalConv1dForward(gx, gw, gb, gp, silu, gy);
          cpu_->CausalConv1dForward(rx, rw, rb, rp, silu, ry);
          ExpectCloseAct(gy, ry, "conv1d y");

          Tensor gdx[2], gdw[2], gdb[2], gdp[2];
          for (int run = 0; run < 2; ++run) {
            gdx[run] = Poisoned(xs, act);
            gdw[run] = Gpu({C, 1, K}, dw0);
            gdb[run] = Gpu({C}, db0);
            gdp[run] = Poisoned(ps, act);
            gpu_->CausalConv1dBackward(gx, gw, gb, gp, silu, Gpu(xs, dy, act), gdx[run], gdw[run],
                                       gdb[run], gdp[run]);
          }
          Tensor rdx = cpu_->Empty(xs, DType::kF64), rdw = Ref({C, 1, K}, dw0), rdb = Ref({C}, db0),
                 rdp = cpu_->Empty(ps, DType::kF64);
          cpu_->CausalConv1dBackward(rx, rw, rb, rp, silu, Ref(xs, dy), rdx, rdw, rdb, rdp);
          ExpectCloseAct(gdx[0], rdx, "conv1d dx");
          ExpectClose(gdw[0], rdw, "conv1d dweight");
          ExpectClose(gdb[0], rdb, "conv1d dbias");
          if (K > 1) ExpectCloseAct(gdp[0], rdp, "conv1d dprefix");
          ExpectSameBits(gdx[0], gdx[1], "conv1d dx");
          ExpectSameBits(gdw[0], gdw[1], "conv1d dweight");
          ExpectSameBits(gdb[0], gdb[1], "conv1d dbias");

          // dx may alias dy (in place): the same bits as with separate buffers.
          Tensor inplace = Gpu(xs, dy, act), adw = Gpu({C, 1, K}, dw0), adb = Gpu({C}, db0),
                 adp = Poisoned(ps, act);
          gpu_->CausalConv1dBackward(gx, gw, gb, gp, silu, inplace, inplace, adw, adb, adp);
          ExpectSameBits(inplace, gdx[0], "conv1d dx in place");
          ExpectSameBits(adw, gdw[0], "conv1d dweight in place");
          ExpectSameBits(adb, gdb[0], "conv1d dbias in place");
          if (K > 1) ExpectSameBits(adp, gdp[0], "conv1d dprefix in place");
        }
      }
    }
}

TEST_P(CudaBackendActTest, Silu) {
  const DType act = GetParam();
  const int64_t n = 100003;
  const std::vector<float> x = Rand(n, -30, 30), dy = Rand(n);
  Tensor gy = Poisoned({n}, act), ry = cpu_->Empty({n}, DType::kF64);
  gpu_->SiluForward(Gpu({n}, x, act), gy);
  cpu_->SiluForward(Ref({n}, x), ry);
  ExpectCloseAct(gy, ry, "silu y");
  Tensor gdx = Poisoned({n}, act), rdx = cpu_->Empty({n}, DType::kF64);
  gpu_->SiluBackward(Gpu({n}, x, act), Gpu({n}, dy, act), gdx);
  cpu_->SiluBackward(Ref({n}, x), Ref({n}, dy), rdx);
  ExpectCloseAct(gdx, rdx, "silu dx");
}

TEST_P(CudaBackendActTest, Embedding) {
  const DType act = GetParam();
  // Small vocabularies (<= 256: tiles of tokens, then the tiles) and large ones (sorted runs);
  // 70,001 tokens of 16 ids: runs of ~4,400 rows across 274 tiles.
  for (const auto [T, V, C] : {std::array<int64_t, 3>{1003, 37, 67},
                               {4099, 50280, 33},
                               {70001, 16, 64},
                               {5000, 256, 40}}) {
    SCOPED_TRACE(::testing::Message() << "tokens " << T << " vocab " << V << " dim " << C);
    std::vector<int32_t> ids(T);
    std::mt19937 rng(7);
    for (auto& id : ids) id = static_cast<int32_t>(rng() % V);
    ids[5] = ids[6] = ids[900] = 11;  // repeats in and out of order
    // Forward: rows of the float32 weights, rounded to the activations' dtype.
    const std::vector<float> w = RandF32(V * C);
    Tensor gid = GpuInts({T}, ids), out = Poisoned({T, C}, act);
    gpu_->EmbeddingForward(gid, Gpu({V, C}, w), out);
    std::vector<float> want(T * C);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = 0; j < C; ++j) want[t * C + j] = w[ids[t] * C + j];
    }
    ExpectBits(out, want, "embedding forward");

    // Backward from dout (an activation) into float32 dweight, twice: large vocabularies add in
    // the float32 CPU reference's order on the same (widened) values, so the bits match it;
    // small ones in their own fixed order, close to the float64 reference.
    const std::vector<float> dout = Rand(T * C), dw0 = RandF32(V * C);
    Tensor gdout = Gpu({T, C}, dout, act), dw[2];
    for (int run = 0; run < 2; ++run) {
      dw[run] = Gpu({V, C}, dw0);
      gpu_->EmbeddingBackward(gid, gdout, dw[run]);
    }
    Tensor cdw = HostTensor({V, C}, dw0, DType::kF32), rdw = Ref({V, C}, dw0);
    cpu_->EmbeddingBackward(HostInts({T}, ids), HostTensor({T, C}, dout, DType::kF32), cdw);
    cpu_->EmbeddingBackward(HostInts({T}, ids), Ref({T, C}, dout), rdw);
    if (V > 256) ExpectBits(dw[0], Values(cdw), "embedding dweight");
    ExpectClose(dw[0], rdw, "embedding dweight", V > 256 ? kF32Tol : kScanGradTol);
    ExpectSameBits(dw[0], dw[1], "embedding dweight");
  }
}

TEST_P(CudaBackendActTest, AddRmsNorm) {
  const DType act = GetParam();
  // (x, y) dtypes. bf16: the model's bf16 layers, the residual stream itself as x (a recomputed
  // layer) or an fp32 embedding output, and an fp32 norm output.
  const std::vector<std::array<DType, 2>> dtypes =
      act == DType::kF32 ? std::vector<std::array<DType, 2>>{{DType::kF32, DType::kF32}}
                         : std::vector<std::array<DType, 2>>{{DType::kBF16, DType::kBF16},
                                                             {DType::kF32, DType::kBF16},
                                                             {DType::kBF16, DType::kF32}};
  for (const auto [x_dtype, y_dtype] : dtypes) {
    for (const int64_t dim : {3, 64, 100, 1000, 1537}) {  // <= 128: a warp a row
      for (const bool with_residual : {false, true}) {
        SCOPED_TRACE(::testing::Message()
                     << "x " << DTypeName(x_dtype) << " y " << DTypeName(y_dtype) << " dim " << dim
                     << " residual " << with_residual);
        // 20,011 rows: ~10 a dweight chunk (of 2048), so each warp of a chunk takes rows.
        const int64_t rows = dim <= 100 ? 20011 : 77;
        const Shape s{rows, dim};
        const std::vector<float> res = RandF32(rows * dim), x = Rand(rows * dim, -2, 2),
                                 w = RandF32(dim, 0.5, 1.5), dy = Rand(rows * dim),
                                 dres = RandF32(rows * dim), dw0 = RandF32(dim);
        Tensor g_res = with_residual ? Gpu(s, res) : Tensor();
        Tensor r_res = with_residual ? Ref(s, res) : Tensor();
        Tensor gro = Poisoned(s), gy = Poisoned(s, y_dtype), grstd = Poisoned({rows});
        Tensor rro = cpu_->Empty(s, DType::kF64), ry = cpu_->Empty(s, DType::kF64),
               rrstd = cpu_->Empty({rows}, DType::kF64);
        gpu_->AddRmsNormForward(g_res, Gpu(s, x, x_dtype), Gpu({dim}, w), 1e-5, gro, gy, grstd);
        cpu_->AddRmsNormForward(r_res, Ref(s, x), Ref({dim}, w), 1e-5, rro, ry, rrstd);
        ExpectClose(gro, rro, "rmsnorm residual_out");
        ExpectClose(grstd, rrstd, "rmsnorm rstd");
        ExpectCloseAct(gy, ry, "rmsnorm y");

        // The backward from the GPU's forward state (the same numbers on both sides); dy is an
        // activation (x's dtype here), the rest float32.
        const std::vector<float> ro = Fetch(gro), rstd = Fetch(grstd);
        Tensor g_dres = with_residual ? Gpu(s, dres) : Tensor();
        Tensor r_dres = with_residual ? Ref(s, dres) : Tensor();
        Tensor gdx[2], gdw[2];
        for (int run = 0; run < 2; ++run) {
          gdx[run] = Poisoned(s);
          gdw[run] = Gpu({dim}, dw0);
          gpu_->AddRmsNormBackward(Gpu(s, dy, x_dtype), g_dres, Gpu(s, ro), Gpu({dim}, w),
                                   Gpu({rows}, rstd), gdx[run], gdw[run]);
        }
        Tensor rdx = cpu_->Empty(s, DType::kF64), rdw = Ref({dim}, dw0);
        cpu_->AddRmsNormBackward(Ref(s, dy), r_dres, Ref(s, ro), Ref({dim}, w), Ref({rows}, rstd),
                                 rdx, rdw);
        ExpectClose(gdx[0], rdx, "rmsnorm dx");
        ExpectClose(gdw[0], rdw, "rmsnorm dweight");
        ExpectSameBits(gdx[0], gdx[1], "rmsnorm dx");
        ExpectSameBits(gdw[0], gdw[1], "rmsnorm dweight");
      }
    }
  }
}

TEST_P(CudaBackendActTest, AddRmsNormInPlace) {
  // As the model calls it: y aliasing x (activations) and residual_out aliasing residual_in.
  const DType act = GetParam();
  const int64_t rows = 5, dim = 259;
  const std::vector<float> res = RandF32(rows * dim), x = Rand(rows * dim), w = RandF32(dim);
  Tensor gres = Gpu({rows, dim}, res), gx = Gpu({rows, dim}, x, act), grstd = Poisoned({rows});
  Tensor rro = cpu_->Empty({rows, dim}, DType::kF64), ry = cpu_->Empty({rows, dim}, DType::kF64),
         rrstd = cpu_->Empty({rows}, DType::kF64);
  gpu_->AddRmsNormForward(gres, gx, Gpu({dim}, w), 1e-5, gres, gx, grstd);
  cpu_->AddRmsNormForward(Ref({rows, dim}, res), Ref({rows, dim}, x), Ref({dim}, w), 1e-5, rro, ry,
                          rrstd);
  ExpectClose(gres, rro, "in-place residual_out");
  ExpectCloseAct(gx, ry, "in-place y");
}

TEST_P(CudaBackendActTest, CrossEntropy) {
  const DType act = GetParam();
  // Lanes a row: 4 (16), 8 (5: scalar loads), 16 (64), 32 (1000, 1001: several passes), a block
  // (50280).
  for (const int64_t V : {1001, 5, 16, 64, 1000, 50280}) {
    SCOPED_TRACE(::testing::Message() << "vocab " << V);
    const int64_t rows = 129;
    const int32_t ignore = -100;
    std::vector<int32_t> tgt(rows);
    std::mt19937 rng(11);
    for (auto& t : tgt) t = rng() % 5 == 0 ? ignore : static_cast<int32_t>(rng() % V);
    // A tie (bf16 logits tie often: 8 significant bits): the first maximum is the argmax.
    std::vector<float> z = Rand(rows * V, -4, 4);
    z[3 * V + 1] = z[3 * V + 2] = 9.f;
    tgt[3] = 1;
    const double scale = 1.0 / 97;
    Tensor gz = Gpu({rows, V}, z, act), gt = GpuInts({rows}, tgt);
    Tensor gdz = Poisoned({rows, V}, act), rdz = cpu_->Empty({rows, V}, DType::kF64);
    const kernels::CrossEntropyStats g = gpu_->CrossEntropy(gz, gt, ignore, scale, gdz);
    const kernels::CrossEntropyStats r =
        cpu_->CrossEntropy(Ref({rows, V}, z), HostInts({rows}, tgt), ignore, scale, rdz);
    EXPECT_EQ(g.count, r.count);
    EXPECT_EQ(g.correct, r.correct);
    EXPECT_GE(g.correct, 1);                                              // row 3 at least
    EXPECT_NEAR(g.loss_sum, r.loss_sum, kF32Tol * std::abs(r.loss_sum));  // float math either way
    ExpectCloseAct(gdz, rdz, "cross-entropy dlogits");

    // Repeated, in place (dlogits aliasing logits, as the model calls it), and without a
    // gradient: the same bits.
    Tensor inplace = Gpu({rows, V}, z, act);
    const kernels::CrossEntropyStats g2 = gpu_->CrossEntropy(inplace, gt, ignore, scale, inplace);
    EXPECT_EQ(g2.loss_sum, g.loss_sum);
    EXPECT_EQ(g2.correct, g.correct);
    ExpectSameBits(inplace, gdz, "cross-entropy dlogits in place");
    Tensor none;
    const kernels::CrossEntropyStats g3 = gpu_->CrossEntropy(gz, gt, ignore, scale, none);
    EXPECT_EQ(g3.loss_sum, g.loss_sum);
    EXPECT_EQ(g3.correct, g.correct);
  }
}

TEST_P(CudaBackendActTest, CopyAndWriteColumns) {
  // Copies: exact.
  const DType act = GetParam();
  const int64_t rows = 41, ld = 77, col0 = 13, n = 29;
  const std::vector<float> src = Rand(rows * ld), blk = Rand(rows * n);
  Tensor gsrc = Gpu({rows, ld}, src, act), gdst = Poisoned({rows, n}, act);
  gpu_->CopyColumns(gsrc, col0, gdst);
  std::vector<float> want(rows * n);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < n; ++j) want[r * n + j] = src[r * ld + col0 + j];
  }
  ExpectBits(gdst, want, "copy columns");
  gpu_->WriteColumns(Gpu({rows, n}, blk, act), gsrc, col0);
  std::vector<float> written = src;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < n; ++j) written[r * ld + col0 + j] = blk[r * n + j];
  }
  ExpectBits(gsrc, written, "write columns");
}

// The scan through the backend, as the kernels' own tests check it (they cover the shapes and
// layouts): float64 reference on the same inputs; the (B, L, D) / (B, L, G, N) views, every
// output and gradient, h0 and h_last. Shapes: the tiled N == 16 kernels (one tile; several
// tiles and segments) and the general kernels (N == 8, several backward segments).
TEST_P(CudaBackendActTest, SelectiveScan) {
  const DType act = GetParam();
  // Activation gradients: bf16 rounding, or the fp32 scan's gradient tolerance.
  const double act_grad_tol = act == DType::kBF16 ? kBf16Tol : kScanGradTol;
  struct ScanShape {
    int64_t B, L, D, N, G;
  };
  for (const ScanShape sh :
       {ScanShape{2, 37, 40, 16, 2}, ScanShape{1, 300, 64, 16, 1}, ScanShape{2, 130, 40, 8, 1}}) {
    const int64_t B = sh.B, L = sh.L, D = sh.D, N = sh.N, G = sh.G;
    SCOPED_TRACE(::testing::Message()
                 << "B " << B << " L " << L << " D " << D << " N " << N << " G " << G);
    const Shape as{B, L, D}, bc{B, L, G, N}, st{B, D, N};
    const std::vector<float> u = Rand(B * L * D), delta = Rand(B * L * D, -3.0, 0.5),
                             Bm = Rand(B * L * G * N), Cm = Rand(B * L * G * N),
                             z = Rand(B * L * D, -2.0, 2.0), dout = Rand(B * L * D);
    const std::vector<float> A = RandF32(D * N, -2.0, -0.1), Dskip = RandF32(D),
                             bias = RandF32(D, -1.0, 0.0), h0 = RandF32(B * D * N),
                             dh_last = RandF32(B * D * N);
    // The activations (u, delta, Bm, Cm, z) in act_t's dtype, the rest in f32_t's.
    auto inputs = [&](auto act_t, auto f32_t) {
      ScanInputs in;
      in.u = act_t(as, u);
      in.delta = act_t(as, delta);
      in.A = f32_t(Shape{D, N}, A);
      in.Bm = act_t(bc, Bm);
      in.Cm = act_t(bc, Cm);
      in.D_skip = f32_t(Shape{D}, Dskip);
      in.z = act_t(as, z);
      in.dt_bias = f32_t(Shape{D}, bias);
      in.h0 = f32_t(st, h0);
      return in;
    };
    const auto gact = [&](const Shape& s, const std::vector<float>& v) { return Gpu(s, v, act); };
    const auto gf32 = [&](const Shape& s, const std::vector<float>& v) { return Gpu(s, v); };
    const auto f64 = [&](const Shape& s, const std::vector<float>& v) { return Ref(s, v); };
    const ScanInputs gin = inputs(gact, gf32);
    const ScanInputs cin = inputs(f64, f64);
    Tensor gout = Poisoned(as, act), gh = Poisoned(st);
    Tensor cout = Tensor::Empty(as, DType::kF64), ch = Tensor::Empty(st, DType::kF64);
    gpu_->SelectiveScanForward(gin, gout, gh);
    cpu_->SelectiveScanForward(cin, cout, ch);
    ExpectCloseAct(gout, cout, "scan out");
    // The fp32 final state: with bf16 inputs and L split, the kernels hand the step sizes from
    // the pre-pass to the main pass in fp16 (11 significant bits; selective_scan_tiled.cu), which
    // moves it by ~1e-4 (1.1e-4 seen at (1, 300, 64)); bf16 outputs round at 2^-9 anyway.
    ExpectClose(gh, ch, "scan h_last", act == DType::kBF16 ? 1e-3 : kF32Tol);

    auto grads = [&](auto act_t, auto f32_t) {
      ScanGrads g;
      g.du = act_t(as);
      g.ddelta = act_t(as);
      g.dA = f32_t(Shape{D, N});
      g.dBm = act_t(bc);
      g.dCm = act_t(bc);
      g.dD_skip = f32_t(Shape{D});
      g.dz = act_t(as);
      g.ddt_bias = f32_t(Shape{D});
      g.dh0 = f32_t(st);
      return g;
    };
    ScanGrads gg = grads([&](const Shape& s) { return Poisoned(s, act); },
                         [&](const Shape& s) { return Poisoned(s); });
    const auto empty64 = [](const Shape& s) { return Tensor::Empty(s, DType::kF64); };
    ScanGrads cg = grads(empty64, empty64);
    gpu_->SelectiveScanBackward(gin, Gpu(as, dout, act), Gpu(st, dh_last), gg);
    cpu_->SelectiveScanBackward(cin, Ref(as, dout), Ref(st, dh_last), cg);
    ExpectClose(gg.du, cg.du, "scan du", act_grad_tol);
    ExpectClose(gg.ddelta, cg.ddelta, "scan ddelta", act_grad_tol);
    ExpectClose(gg.dBm, cg.dBm, "scan dBm", act_grad_tol);
    ExpectClose(gg.dCm, cg.dCm, "scan dCm", act_grad_tol);
    ExpectClose(gg.dz, cg.dz, "scan dz", act_grad_tol);
    ExpectClose(gg.dA, cg.dA, "scan dA", kScanGradTol);
    ExpectClose(gg.dD_skip, cg.dD_skip, "scan dD", kScanGradTol);
    ExpectClose(gg.ddt_bias, cg.ddt_bias, "scan ddt_bias", kScanGradTol);
    ExpectClose(gg.dh0, cg.dh0, "scan dh0", kScanGradTol);
  }
}

// Sequence parallelism's slice maps (decay, state; dstate) against the CPU reference: long
// slices (the kernel's chunks fold), one step, several groups, N other than 16.
TEST_P(CudaBackendActTest, SelectiveScanStateMaps) {
  const DType act = GetParam();
  struct ScanShape {
    int64_t B, L, D, N, G;
  };
  for (const ScanShape sh : {ScanShape{2, 37, 40, 16, 2}, ScanShape{1, 3000, 64, 16, 1},
                             ScanShape{2, 1, 40, 8, 1}, ScanShape{1, 130, 24, 5, 1}}) {
    const int64_t B = sh.B, L = sh.L, D = sh.D, N = sh.N, G = sh.G;
    SCOPED_TRACE(::testing::Message()
                 << "B " << B << " L " << L << " D " << D << " N " << N << " G " << G);
    const Shape as{B, L, D}, bc{B, L, G, N}, st{B, D, N};
    const std::vector<float> u = Rand(B * L * D), delta = Rand(B * L * D, -6.0, 0.5),
                             Bm = Rand(B * L * G * N), Cm = Rand(B * L * G * N),
                             z = Rand(B * L * D, -2.0, 2.0), dout = Rand(B * L * D);
    const std::vector<float> A = RandF32(D * N, -2.0, -0.1), bias = RandF32(D, -1.0, 0.0);
    auto inputs = [&](auto act_t, auto f32_t) {
      ScanInputs in;
      in.u = act_t(as, u);
      in.delta = act_t(as, delta);
      in.A = f32_t(Shape{D, N}, A);
      in.Bm = act_t(bc, Bm);
      in.Cm = act_t(bc, Cm);
      in.z = act_t(as, z);
      in.dt_bias = f32_t(Shape{D}, bias);
      return in;
    };
    const ScanInputs gin =
        inputs([&](const Shape& s, const std::vector<float>& v) { return Gpu(s, v, act); },
               [&](const Shape& s, const std::vector<float>& v) { return Gpu(s, v); });
    const ScanInputs cin =
        inputs([&](const Shape& s, const std::vector<float>& v) { return Ref(s, v); },
               [&](const Shape& s, const std::vector<float>& v) { return Ref(s, v); });
    Tensor gdecay = Poisoned(st), gstate = Poisoned(st), gdstate = Poisoned(st);
    Tensor cdecay = Tensor::Empty(st, DType::kF64), cstate = Tensor::Empty(st, DType::kF64),
           cdstate = Tensor::Empty(st, DType::kF64);
    gpu_->SelectiveScanStateMap(gin, gdecay, gstate);
    cpu_->SelectiveScanStateMap(cin, cdecay, cstate);
    gpu_->SelectiveScanStateGrad(gin, Gpu(as, dout, act), gdstate);
    cpu_->SelectiveScanStateGrad(cin, Ref(as, dout), cdstate);
    ExpectClose(gdecay, cdecay, "state map decay", kScanGradTol);
    ExpectClose(gstate, cstate, "state map state", kScanGradTol);
    ExpectClose(gdstate, cdstate, "state grad", kScanGradTol);
    Tensor gdecay_alone = Poisoned(st), no_state;  // the last slice's: the decay alone
    gpu_->SelectiveScanStateMap(gin, gdecay_alone, no_state);
    ExpectClose(gdecay_alone, cdecay, "state map decay alone", kScanGradTol);
  }
}

TEST_F(CudaBackendTest, ElementwiseHelpers) {
  const int64_t n = 70001;
  const std::vector<float> a = Rand(n, -3, 3), b = Rand(n), c = Rand(n);
  Tensor gy = Poisoned({n}), ry = cpu_->Empty({n}, DType::kF64);
  gpu_->NegExp(Gpu({n}, a), gy);
  cpu_->NegExp(Ref({n}, a), ry);
  ExpectClose(gy, ry, "negexp");

  Tensor gd = Gpu({n}, c), rd = Ref({n}, c);
  gpu_->AddProduct(Gpu({n}, a), Gpu({n}, b), gd);
  cpu_->AddProduct(Ref({n}, a), Ref({n}, b), rd);
  ExpectClose(gd, rd, "addproduct");
  gpu_->Add(Gpu({n}, b), gd);
  cpu_->Add(Ref({n}, b), rd);
  ExpectClose(gd, rd, "add");
  gpu_->Scale(gd, -0.37);
  cpu_->Scale(rd, double(float(-0.37)));  // the GPU scales by the float32 factor
  ExpectClose(gd, rd, "scale");
}

TEST_F(CudaBackendTest, SumSquares) {
  for (const int64_t n : {int64_t(1), int64_t(1000003)}) {
    const std::vector<float> x = Rand(n, -2, 2);
    Tensor gx = Gpu({n}, x);
    const double g = gpu_->SumSquares({gx}), r = cpu_->SumSquares({Ref({n}, x)});
    EXPECT_NEAR(g, r, 1e-12 * r) << "n " << n;  // both sum in double
    EXPECT_EQ(gpu_->SumSquares({gx}), g) << "n " << n;
  }
  // Several tensors (one empty) in one reduction.
  const std::vector<float> a = Rand(70001, -2, 2), b = Rand(3, -2, 2);
  const double g = gpu_->SumSquares({Gpu({70001}, a), gpu_->Empty({0}, DType::kF32), Gpu({3}, b)});
  const double r = cpu_->SumSquares({Ref({70001}, a), Ref({3}, b)});
  EXPECT_NEAR(g, r, 1e-12 * r);
  EXPECT_EQ(gpu_->SumSquares({}), 0.0);
}

TEST_F(CudaBackendTest, AdamW) {
  const int64_t n = 10007;
  const std::vector<float> p = Rand(n), m = Rand(n, -0.1, 0.1), v = Rand(n, 0, 0.01);
  Tensor gp = Gpu({n}, p), gm = Gpu({n}, m), gv = Gpu({n}, v);
  Tensor rp = Ref({n}, p), rm = Ref({n}, m), rv = Ref({n}, v);
  AdamWHyper h;
  h.lr = 3e-3;
  h.weight_decay = 0.1;
  for (int step = 1; step <= 3; ++step) {
    h.step = step;
    const std::vector<float> g = Rand(n);
    Tensor none;
    gpu_->AdamW(gp, Gpu({n}, g), gm, gv, none, h);
    cpu_->AdamW(rp, Ref({n}, g), rm, rv, none, h);
  }
  ExpectClose(gp, rp, "adamw param");
  ExpectClose(gm, rm, "adamw m");
  ExpectClose(gv, rv, "adamw v");
}

TEST_F(CudaBackendTest, BadEmbeddingIdAbortsNamingIt) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        Tensor out = gpu_->Empty({2, 4}, DType::kF32);
        gpu_->EmbeddingForward(GpuInts({2}, {1, 9}), Gpu({3, 4}, Rand(12)), out);
        gpu_->ToHost(out);
      },
      "embedding id outside");
}

TEST_F(CudaBackendTest, RejectsCpuTensors) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        Tensor y = gpu_->Empty({4}, DType::kF32);
        gpu_->SiluForward(HostTensor({4}, Rand(4), DType::kF32), y);
      },
      "silu_fwd: CUDA backend given");
}

}  // namespace
}  // namespace mamba
