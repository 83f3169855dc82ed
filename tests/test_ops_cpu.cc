// The CPU reference ops other than the scan: each forward against a plain float64 loop, each
// backward against central finite differences of a random projection <w, out> in float64, float
// against double, accumulation of parameter gradients, and independence of the thread count.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "tests/test_util.h"
#include "worker/kernels/conv1d_cpu.h"
#include "worker/kernels/cross_entropy_cpu.h"
#include "worker/kernels/embedding_cpu.h"
#include "worker/kernels/linear_cpu.h"
#include "worker/kernels/rmsnorm_cpu.h"
#include "worker/kernels/silu_cpu.h"

namespace mamba::kernels {
namespace {

using ::mamba::testing::Cast;
using ::mamba::testing::Dot;
using ::mamba::testing::FiniteDifference;
using ::mamba::testing::RandomVector;
using ::mamba::testing::RelativeError;

using Vec = std::vector<double>;

constexpr double kFdTol = 1e-7;      // analytic vs finite-difference gradients, float64
constexpr double kExactTol = 1e-13;  // kernel vs naive float64 loop
constexpr double kFloatTol = 1e-5;   // float kernel vs double kernel

// Guards against comparisons that pass because both sides are zero.
double MaxAbs(const Vec& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

// The analytic gradient matches finite differences of `loss` w.r.t. x, and is not trivially zero.
void ExpectGradient(const Vec& analytic, Vec& x, const std::function<double()>& loss,
                    const std::string& what) {
  const Vec fd = FiniteDifference(x, loss);
  EXPECT_LT(RelativeError(analytic, fd), kFdTol) << what;
  EXPECT_GT(MaxAbs(fd), 1e-3) << what << ": gradient is trivially zero";
}

Vec Scaled(const Vec& v, double s) {
  Vec r = v;
  for (double& x : r) x *= s;
  return r;
}

// Runs f with the given OpenMP thread count, restoring the previous one.
template <typename F>
void WithThreads(int n, F f) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(n);
  f();
  omp_set_num_threads(saved);
}

// ---------------------------------------------------------------------------------------------
// SiLU

TEST(SiluCpu, ForwardBackward) {
  Vec x = RandomVector(37, 1, -6.0, 6.0);
  x.insert(x.end(), {0.0, 50.0, -50.0, 800.0, -800.0});  // exp() of these overflows if done naively
  Vec y(x.size()), ref(x.size());
  SiluForwardCpu<double>(x.size(), x.data(), y.data());
  for (size_t i = 0; i < x.size(); ++i)
    ref[i] = x[i] * (x[i] >= 0 ? 1 / (1 + std::exp(-x[i])) : std::exp(x[i]) / (1 + std::exp(x[i])));
  EXPECT_LT(RelativeError(y, ref), kExactTol);
  for (double v : y) EXPECT_TRUE(std::isfinite(v));

  x.resize(37);  // finite differences on the moderate part
  const Vec w = RandomVector(x.size(), 2);
  Vec dx(x.size());
  SiluBackwardCpu<double>(x.size(), x.data(), w.data(), dx.data());
  ExpectGradient(
      dx, x,
      [&] {
        Vec out(x.size());
        SiluForwardCpu<double>(x.size(), x.data(), out.data());
        return Dot(out, w);
      },
      "silu dx");

  Vec big = {800.0, -800.0}, dbig(2), ones = {1.0, 1.0};
  SiluBackwardCpu<double>(2, big.data(), ones.data(), dbig.data());
  EXPECT_NEAR(dbig[0], 1.0, 1e-12);
  EXPECT_NEAR(dbig[1], 0.0, 1e-12);

  const auto xf = Cast<float>(x), wf = Cast<float>(w);
  std::vector<float> yf(x.size()), dxf(x.size());
  SiluForwardCpu<float>(x.size(), xf.data(), yf.data());
  SiluBackwardCpu<float>(x.size(), xf.data(), wf.data(), dxf.data());
  Vec yd(x.size());
  SiluForwardCpu<double>(x.size(), x.data(), yd.data());
  EXPECT_LT(RelativeError(yf, yd), kFloatTol);
  EXPECT_LT(RelativeError(dxf, dx), kFloatTol);
}

// ---------------------------------------------------------------------------------------------
// Embedding

TEST(EmbeddingCpu, ForwardBackwardAccumulates) {
  const int64_t vocab = 11, dim = 70;  // dim > one 64-column chunk of the backward
  const std::vector<int32_t> ids = {3, 0, 10, 3, 7, 3, 10};  // repeated ids add up
  const int64_t T = ids.size();
  Vec weight = RandomVector(vocab * dim, 3);
  Vec out(T * dim);
  EmbeddingForwardCpu<double>(ids.data(), T, weight.data(), vocab, dim, out.data());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < dim; ++j) ASSERT_EQ(out[t * dim + j], weight[ids[t] * dim + j]);

  const Vec w = RandomVector(T * dim, 4);
  Vec dweight(vocab * dim, 0.0);
  EmbeddingBackwardCpu<double>(ids.data(), T, w.data(), vocab, dim, dweight.data());
  ExpectGradient(
      dweight, weight,
      [&] {
        Vec o(T * dim);
        EmbeddingForwardCpu<double>(ids.data(), T, weight.data(), vocab, dim, o.data());
        return Dot(o, w);
      },
      "embedding dweight");
  // Rows of unused ids stay zero.
  for (int64_t j = 0; j < dim; ++j) EXPECT_EQ(dweight[1 * dim + j], 0.0);

  Vec twice(vocab * dim, 0.0);
  EmbeddingBackwardCpu<double>(ids.data(), T, w.data(), vocab, dim, twice.data());
  EmbeddingBackwardCpu<double>(ids.data(), T, w.data(), vocab, dim, twice.data());
  EXPECT_LT(RelativeError(twice, Scaled(dweight, 2)), kExactTol);

  const auto wf = Cast<float>(w);
  std::vector<float> dwf(vocab * dim, 0.0f);
  EmbeddingBackwardCpu<float>(ids.data(), T, wf.data(), vocab, dim, dwf.data());
  EXPECT_LT(RelativeError(dwf, dweight), kFloatTol);
}

TEST(EmbeddingCpuDeathTest, IdOutOfRangeAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const std::vector<int32_t> ids = {0, 5};
  std::vector<float> weight(5 * 2), out(2 * 2);
  EXPECT_DEATH(EmbeddingForwardCpu<float>(ids.data(), 2, weight.data(), 5, 2, out.data()),
               "embedding id 5");
}

// ---------------------------------------------------------------------------------------------
// Fused add + RMSNorm

struct NormProblem {
  int64_t rows, dim;
  Vec res_in, x, weight;
  double eps = 1e-5;
  NormProblem(int64_t num_rows, int64_t width, uint64_t seed) : rows(num_rows), dim(width) {
    res_in = RandomVector(rows * dim, seed + 1);
    x = RandomVector(rows * dim, seed + 2);
    weight = RandomVector(dim, seed + 3, 0.5, 1.5);
  }
};

TEST(RmsNormCpu, ForwardMatchesNaiveLoop) {
  for (bool with_residual : {false, true}) {
    NormProblem p(2 * 33, 7, 10);
    Vec res(p.rows * p.dim), y(p.rows * p.dim), rstd(p.rows);
    AddRmsNormForwardCpu<double>(p.rows, p.dim, with_residual ? p.res_in.data() : nullptr,
                                 p.x.data(), p.weight.data(), p.eps, res.data(), y.data(),
                                 rstd.data());
    Vec ref_res(res.size()), ref_y(y.size()), ref_rstd(p.rows);
    for (int64_t r = 0; r < p.rows; ++r) {
      double ss = 0;
      for (int64_t i = 0; i < p.dim; ++i) {
        const int64_t k = r * p.dim + i;
        ref_res[k] = p.x[k] + (with_residual ? p.res_in[k] : 0.0);
        ss += ref_res[k] * ref_res[k];
      }
      ref_rstd[r] = 1 / std::sqrt(ss / p.dim + p.eps);
      for (int64_t i = 0; i < p.dim; ++i)
        ref_y[r * p.dim + i] = ref_res[r * p.dim + i] * ref_rstd[r] * p.weight[i];
    }
    EXPECT_LT(RelativeError(res, ref_res), kExactTol);
    EXPECT_LT(RelativeError(y, ref_y), kExactTol);
    EXPECT_LT(RelativeError(rstd, ref_rstd), kExactTol);
  }
}

TEST(RmsNormCpu, BackwardMatchesFiniteDifferences) {
  for (int64_t L : {1, 33}) {
    for (bool with_residual : {false, true}) {
      for (bool with_dres : {false, true}) {
        const std::string tag = " L=" + std::to_string(L) +
                                " residual_in=" + std::to_string(with_residual) +
                                " dres=" + std::to_string(with_dres);
        NormProblem p(2 * L, 9, 20 + L);
        const Vec wy = RandomVector(p.rows * p.dim, 5), wr = RandomVector(p.rows * p.dim, 6);
        Vec res(p.rows * p.dim), y(p.rows * p.dim), rstd(p.rows);
        auto forward = [&] {
          AddRmsNormForwardCpu<double>(p.rows, p.dim, with_residual ? p.res_in.data() : nullptr,
                                       p.x.data(), p.weight.data(), p.eps, res.data(), y.data(),
                                       rstd.data());
        };
        auto loss = [&] {
          forward();
          return Dot(y, wy) + (with_dres ? Dot(res, wr) : 0.0);
        };
        forward();
        Vec dx(p.rows * p.dim), dweight(p.dim, 0.0);
        AddRmsNormBackwardCpu<double>(p.rows, p.dim, wy.data(), with_dres ? wr.data() : nullptr,
                                      res.data(), p.weight.data(), rstd.data(), dx.data(),
                                      dweight.data());
        ExpectGradient(dx, p.x, loss, "rmsnorm dx" + tag);
        if (with_residual) ExpectGradient(dx, p.res_in, loss, "rmsnorm dresidual_in" + tag);
        ExpectGradient(dweight, p.weight, loss, "rmsnorm dweight" + tag);

        // Accumulation: a second call adds the same dweight again; dx is overwritten.
        forward();
        Vec dx2(dx.size(), 123.0);
        AddRmsNormBackwardCpu<double>(p.rows, p.dim, wy.data(), with_dres ? wr.data() : nullptr,
                                      res.data(), p.weight.data(), rstd.data(), dx2.data(),
                                      dweight.data());
        EXPECT_EQ(dx2, dx) << tag;
        Vec once(p.dim, 0.0);
        AddRmsNormBackwardCpu<double>(p.rows, p.dim, wy.data(), with_dres ? wr.data() : nullptr,
                                      res.data(), p.weight.data(), rstd.data(), dx2.data(),
                                      once.data());
        EXPECT_LT(RelativeError(dweight, Scaled(once, 2)), kExactTol) << tag;
      }
    }
  }
}

TEST(RmsNormCpu, FloatMatchesDouble) {
  NormProblem p(2 * 33, 48, 30);
  const Vec dy = RandomVector(p.rows * p.dim, 7), dres = RandomVector(p.rows * p.dim, 8);
  Vec res(p.rows * p.dim), y(res.size()), rstd(p.rows), dx(res.size()), dw(p.dim, 0.0);
  AddRmsNormForwardCpu<double>(p.rows, p.dim, p.res_in.data(), p.x.data(), p.weight.data(), p.eps,
                               res.data(), y.data(), rstd.data());
  AddRmsNormBackwardCpu<double>(p.rows, p.dim, dy.data(), dres.data(), res.data(), p.weight.data(),
                                rstd.data(), dx.data(), dw.data());
  const auto rif = Cast<float>(p.res_in), xf = Cast<float>(p.x), wf = Cast<float>(p.weight),
             dyf = Cast<float>(dy), dresf = Cast<float>(dres);
  std::vector<float> resf(res.size()), yf(res.size()), rstdf(p.rows), dxf(res.size()),
      dwf(p.dim, 0.0f);
  AddRmsNormForwardCpu<float>(p.rows, p.dim, rif.data(), xf.data(), wf.data(), float(p.eps),
                              resf.data(), yf.data(), rstdf.data());
  AddRmsNormBackwardCpu<float>(p.rows, p.dim, dyf.data(), dresf.data(), resf.data(), wf.data(),
                               rstdf.data(), dxf.data(), dwf.data());
  EXPECT_LT(RelativeError(yf, y), kFloatTol);
  EXPECT_LT(RelativeError(rstdf, rstd), kFloatTol);
  EXPECT_LT(RelativeError(dxf, dx), kFloatTol);
  EXPECT_LT(RelativeError(dwf, dw), kFloatTol);
}

// ---------------------------------------------------------------------------------------------
// Linear

TEST(LinearCpu, ForwardMatchesNaiveLoop) {
  for (bool with_bias : {false, true}) {
    const int64_t M = 33, N = 5, K = 7;
    const Vec x = RandomVector(M * K, 40), w = RandomVector(N * K, 41), b = RandomVector(N, 42);
    Vec y(M * N, 99.0), ref(M * N);
    LinearForwardCpu<double>(M, N, K, x.data(), w.data(), with_bias ? b.data() : nullptr, y.data());
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double s = with_bias ? b[n] : 0.0;
        for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * w[n * K + k];
        ref[m * N + n] = s;
      }
    EXPECT_LT(RelativeError(y, ref), kExactTol) << "bias=" << with_bias;
  }
}

TEST(LinearCpu, BackwardMatchesFiniteDifferences) {
  for (int64_t M : {1, 33}) {
    for (bool with_bias : {false, true}) {
      const std::string tag = " M=" + std::to_string(M) + " bias=" + std::to_string(with_bias);
      const int64_t N = 5, K = 7;
      Vec x = RandomVector(M * K, 50 + M), w = RandomVector(N * K, 51), b = RandomVector(N, 52);
      const Vec wy = RandomVector(M * N, 53);
      auto loss = [&] {
        Vec y(M * N);
        LinearForwardCpu<double>(M, N, K, x.data(), w.data(), with_bias ? b.data() : nullptr,
                                 y.data());
        return Dot(y, wy);
      };
      Vec dx(M * K, 99.0), dw(N * K, 0.0), db(N, 0.0);
      LinearBackwardCpu<double>(M, N, K, wy.data(), x.data(), w.data(), dx.data(), dw.data(),
                                with_bias ? db.data() : nullptr);
      ExpectGradient(dx, x, loss, "linear dx" + tag);
      ExpectGradient(dw, w, loss, "linear dw" + tag);
      if (with_bias) ExpectGradient(db, b, loss, "linear dbias" + tag);

      // Accumulation, and dx may be skipped.
      Vec dw1(N * K, 0.0), db1(N, 0.0);
      LinearBackwardCpu<double>(M, N, K, wy.data(), x.data(), w.data(), nullptr, dw1.data(),
                                db1.data());
      LinearBackwardCpu<double>(M, N, K, wy.data(), x.data(), w.data(), nullptr, dw1.data(),
                                db1.data());
      EXPECT_LT(RelativeError(dw1, Scaled(dw, 2)), kExactTol) << tag;
      if (with_bias) {
        EXPECT_LT(RelativeError(db1, Scaled(db, 2)), kExactTol) << tag;
      }
      // accumulate_dx adds dy w to what dx holds.
      const Vec dx0 = RandomVector(M * K, 54);
      Vec dx2 = dx0, dw2(N * K, 0.0);
      LinearBackwardCpu<double>(M, N, K, wy.data(), x.data(), w.data(), dx2.data(), dw2.data(),
                                nullptr, /*accumulate_dx=*/true);
      Vec expect = dx0;
      for (size_t i = 0; i < expect.size(); ++i) expect[i] += dx[i];
      EXPECT_LT(RelativeError(dx2, expect), kExactTol) << tag;
    }
  }
}

TEST(LinearCpu, FloatMatchesDouble) {
  const int64_t M = 65, N = 33, K = 47;
  const Vec x = RandomVector(M * K, 60), w = RandomVector(N * K, 61), b = RandomVector(N, 62),
            dy = RandomVector(M * N, 63);
  Vec y(M * N), dx(M * K), dw(N * K, 0.0), db(N, 0.0);
  LinearForwardCpu<double>(M, N, K, x.data(), w.data(), b.data(), y.data());
  LinearBackwardCpu<double>(M, N, K, dy.data(), x.data(), w.data(), dx.data(), dw.data(),
                            db.data());
  const auto xf = Cast<float>(x), wf = Cast<float>(w), bf = Cast<float>(b), dyf = Cast<float>(dy);
  std::vector<float> yf(M * N), dxf(M * K), dwf(N * K, 0.0f), dbf(N, 0.0f);
  LinearForwardCpu<float>(M, N, K, xf.data(), wf.data(), bf.data(), yf.data());
  LinearBackwardCpu<float>(M, N, K, dyf.data(), xf.data(), wf.data(), dxf.data(), dwf.data(),
                           dbf.data());
  EXPECT_LT(RelativeError(yf, y), kFloatTol);
  EXPECT_LT(RelativeError(dxf, dx), kFloatTol);
  EXPECT_LT(RelativeError(dwf, dw), kFloatTol);
  EXPECT_LT(RelativeError(dbf, db), kFloatTol);
}

// ---------------------------------------------------------------------------------------------
// Causal depthwise conv1d

struct ConvProblem {
  int64_t B, L, C, K;
  Vec x, weight, bias, prefix;
  ConvProblem(int64_t batch, int64_t len, int64_t channels, int64_t width, uint64_t seed)
      : B(batch), L(len), C(channels), K(width) {
    x = RandomVector(B * L * C, seed + 1);
    weight = RandomVector(C * K, seed + 2);
    bias = RandomVector(C, seed + 3);
    prefix = RandomVector(B * (K - 1) * C, seed + 4);
  }
};

// The contract, one output at a time, with the prefix and x concatenated explicitly.
Vec NaiveConv(const ConvProblem& p, bool with_bias, bool with_prefix, bool silu) {
  const int64_t P = p.K - 1;
  Vec y(p.B * p.L * p.C);
  for (int64_t b = 0; b < p.B; ++b) {
    Vec ext((P + p.L) * p.C, 0.0);  // positions -P .. L-1
    for (int64_t j = 0; j < P * p.C && with_prefix; ++j) ext[j] = p.prefix[b * P * p.C + j];
    for (int64_t j = 0; j < p.L * p.C; ++j) ext[P * p.C + j] = p.x[b * p.L * p.C + j];
    for (int64_t t = 0; t < p.L; ++t)
      for (int64_t c = 0; c < p.C; ++c) {
        double s = with_bias ? p.bias[c] : 0.0;
        for (int64_t k = 0; k < p.K; ++k) s += p.weight[c * p.K + k] * ext[(t + k) * p.C + c];
        y[(b * p.L + t) * p.C + c] = silu ? s / (1 + std::exp(-s)) : s;
      }
  }
  return y;
}

TEST(CausalConv1dCpu, ForwardMatchesNaiveLoop) {
  for (int64_t L : {1, 2, 33}) {
    for (int mask = 0; mask < 8; ++mask) {
      const bool with_bias = mask & 1, with_prefix = mask & 2, silu = mask & 4;
      ConvProblem p(2, L, 5, 4, 70 + L);
      Vec y(p.x.size());
      CausalConv1dForwardCpu<double>(p.B, p.L, p.C, p.K, p.x.data(), p.weight.data(),
                                     with_bias ? p.bias.data() : nullptr,
                                     with_prefix ? p.prefix.data() : nullptr, silu, y.data());
      EXPECT_LT(RelativeError(y, NaiveConv(p, with_bias, with_prefix, silu)), kExactTol)
          << "L=" << L << " mask=" << mask;
    }
  }
}

TEST(CausalConv1dCpu, BackwardMatchesFiniteDifferences) {
  for (int64_t L : {1, 33}) {
    for (int mask = 0; mask < 8; ++mask) {
      const bool with_bias = mask & 1, with_prefix = mask & 2, silu = mask & 4;
      const std::string tag = " L=" + std::to_string(L) + " bias=" + std::to_string(with_bias) +
                              " prefix=" + std::to_string(with_prefix) +
                              " silu=" + std::to_string(silu);
      ConvProblem p(2, L, 37, 4, 80 + L);  // C > one 32-channel chunk of the backward
      // Without a prefix the kernel reads zeros; dprefix is then the gradient w.r.t. those zeros.
      if (!with_prefix) std::fill(p.prefix.begin(), p.prefix.end(), 0.0);
      const Vec wy = RandomVector(p.x.size(), 81);
      auto loss = [&] {
        Vec y(p.x.size());
        CausalConv1dForwardCpu<double>(p.B, p.L, p.C, p.K, p.x.data(), p.weight.data(),
                                       with_bias ? p.bias.data() : nullptr, p.prefix.data(), silu,
                                       y.data());
        return Dot(y, wy);
      };
      auto backward = [&](Vec& dx, Vec& dw, Vec& db, Vec& dprefix) {
        CausalConv1dBackwardCpu<double>(
            p.B, p.L, p.C, p.K, p.x.data(), p.weight.data(), with_bias ? p.bias.data() : nullptr,
            with_prefix ? p.prefix.data() : nullptr, silu, wy.data(), dx.data(), dw.data(),
            with_bias ? db.data() : nullptr, dprefix.data());
      };
      Vec dx(p.x.size(), 99.0), dw(p.weight.size(), 0.0), db(p.C, 0.0),
          dprefix(p.prefix.size(), 99.0);
      backward(dx, dw, db, dprefix);
      ExpectGradient(dx, p.x, loss, "conv dx" + tag);
      ExpectGradient(dw, p.weight, loss, "conv dweight" + tag);
      if (with_bias) ExpectGradient(db, p.bias, loss, "conv dbias" + tag);
      ExpectGradient(dprefix, p.prefix, loss, "conv dprefix" + tag);

      Vec dx2(dx.size()), dw2(dw.size(), 0.0), db2(p.C, 0.0), dprefix2(dprefix.size());
      backward(dx2, dw2, db2, dprefix2);
      backward(dx2, dw2, db2, dprefix2);
      EXPECT_EQ(dx2, dx) << tag;
      EXPECT_EQ(dprefix2, dprefix) << tag;
      EXPECT_LT(RelativeError(dw2, Scaled(dw, 2)), kExactTol) << tag;
      if (with_bias) {
        EXPECT_LT(RelativeError(db2, Scaled(db, 2)), kExactTol) << tag;
      }
    }
  }
}

// Sequence parallelism: two pieces with the halo (prefix forward, dprefix backward) equal one conv.
TEST(CausalConv1dCpu, TwoPiecesEqualOneConv) {
  const int64_t B = 2, L = 33, C = 6, K = 4, L1 = 14, P = K - 1;
  ConvProblem whole(B, L, C, K, 90);
  const Vec dy = RandomVector(B * L * C, 91);
  auto slice = [&](const Vec& v, int64_t t0, int64_t t1) {
    Vec r;
    for (int64_t b = 0; b < B; ++b)
      r.insert(r.end(), v.begin() + (b * L + t0) * C, v.begin() + (b * L + t1) * C);
    return r;
  };
  auto run = [&](const ConvProblem& q, const Vec* prefix, const Vec& dyq, Vec& y, Vec& dx, Vec& dw,
                 Vec& db, Vec& dprefix) {
    y.resize(q.x.size());
    dx.resize(q.x.size());
    dprefix.resize(B * P * C);
    CausalConv1dForwardCpu<double>(B, q.L, C, K, q.x.data(), q.weight.data(), q.bias.data(),
                                   prefix ? prefix->data() : nullptr, true, y.data());
    CausalConv1dBackwardCpu<double>(B, q.L, C, K, q.x.data(), q.weight.data(), q.bias.data(),
                                    prefix ? prefix->data() : nullptr, true, dyq.data(), dx.data(),
                                    dw.data(), db.data(), dprefix.data());
  };
  Vec y, dx, dw(C * K, 0.0), db(C, 0.0), dprefix;
  run(whole, nullptr, dy, y, dx, dw, db, dprefix);

  ConvProblem p1 = whole, p2 = whole;
  p1.L = L1;
  p1.x = slice(whole.x, 0, L1);
  p2.L = L - L1;
  p2.x = slice(whole.x, L1, L);
  // The halo: the last K-1 positions of piece 1's input.
  Vec halo;
  for (int64_t b = 0; b < B; ++b)
    halo.insert(halo.end(), p1.x.begin() + (b * L1 + L1 - P) * C, p1.x.begin() + (b * L1 + L1) * C);
  Vec y1, dx1, dp1, y2, dx2, dp2, dwp(C * K, 0.0), dbp(C, 0.0);
  run(p1, nullptr, slice(dy, 0, L1), y1, dx1, dwp, dbp, dp1);
  run(p2, &halo, slice(dy, L1, L), y2, dx2, dwp, dbp, dp2);
  // Piece 2's dprefix flows back into the last K-1 positions of piece 1's dx.
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < P * C; ++j) dx1[(b * L1 + L1 - P) * C + j] += dp2[b * P * C + j];

  Vec y_join, dx_join;
  for (int64_t b = 0; b < B; ++b) {
    y_join.insert(y_join.end(), y1.begin() + b * L1 * C, y1.begin() + (b + 1) * L1 * C);
    y_join.insert(y_join.end(), y2.begin() + b * (L - L1) * C, y2.begin() + (b + 1) * (L - L1) * C);
    dx_join.insert(dx_join.end(), dx1.begin() + b * L1 * C, dx1.begin() + (b + 1) * L1 * C);
    dx_join.insert(dx_join.end(), dx2.begin() + b * (L - L1) * C,
                   dx2.begin() + (b + 1) * (L - L1) * C);
  }
  EXPECT_LT(RelativeError(y_join, y), 1e-14);
  EXPECT_LT(RelativeError(dx_join, dx), 1e-14);
  EXPECT_LT(RelativeError(dwp, dw), 1e-13);
  EXPECT_LT(RelativeError(dbp, db), 1e-13);
}

TEST(CausalConv1dCpu, FloatMatchesDouble) {
  ConvProblem p(2, 64, 40, 4, 95);
  const Vec dy = RandomVector(p.x.size(), 96);
  Vec y(p.x.size()), dx(p.x.size()), dw(p.weight.size(), 0.0), db(p.C, 0.0), dp(p.prefix.size());
  CausalConv1dForwardCpu<double>(p.B, p.L, p.C, p.K, p.x.data(), p.weight.data(), p.bias.data(),
                                 p.prefix.data(), true, y.data());
  CausalConv1dBackwardCpu<double>(p.B, p.L, p.C, p.K, p.x.data(), p.weight.data(), p.bias.data(),
                                  p.prefix.data(), true, dy.data(), dx.data(), dw.data(), db.data(),
                                  dp.data());
  const auto xf = Cast<float>(p.x), wf = Cast<float>(p.weight), bf = Cast<float>(p.bias),
             pf = Cast<float>(p.prefix), dyf = Cast<float>(dy);
  std::vector<float> yf(y.size()), dxf(dx.size()), dwf(dw.size(), 0.0f), dbf(p.C, 0.0f),
      dpf(dp.size());
  CausalConv1dForwardCpu<float>(p.B, p.L, p.C, p.K, xf.data(), wf.data(), bf.data(), pf.data(),
                                true, yf.data());
  CausalConv1dBackwardCpu<float>(p.B, p.L, p.C, p.K, xf.data(), wf.data(), bf.data(), pf.data(),
                                 true, dyf.data(), dxf.data(), dwf.data(), dbf.data(), dpf.data());
  EXPECT_LT(RelativeError(yf, y), kFloatTol);
  EXPECT_LT(RelativeError(dxf, dx), kFloatTol);
  EXPECT_LT(RelativeError(dwf, dw), kFloatTol);
  EXPECT_LT(RelativeError(dbf, db), kFloatTol);
  EXPECT_LT(RelativeError(dpf, dp), kFloatTol);
}

// ---------------------------------------------------------------------------------------------
// Cross entropy

constexpr int32_t kIgnore = -100;

TEST(CrossEntropyCpu, ForwardMatchesNaiveLoop) {
  const int64_t rows = 9, vocab = 13;
  Vec logits = RandomVector(rows * vocab, 100, -3.0, 3.0);
  std::vector<int32_t> targets = {4, kIgnore, 0, 12, 7, kIgnore, 3, 1, 9};
  // Row 6: a tie for the maximum at 3 and 5; the first one counts, so it is correct.
  logits[6 * vocab + 3] = logits[6 * vocab + 5] = 10.0;
  // Row 7: a tie at 1 and 3 with target 1, the first maximum again.
  logits[7 * vocab + 1] = logits[7 * vocab + 3] = 10.0;
  double loss = 0;
  int64_t count = 0, correct = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] == kIgnore) continue;
    double s = 0;
    int64_t am = 0;
    for (int64_t v = 0; v < vocab; ++v) {
      s += std::exp(logits[r * vocab + v]);
      if (logits[r * vocab + v] > logits[r * vocab + am]) am = v;
    }
    loss += std::log(s) - logits[r * vocab + targets[r]];
    ++count;
    correct += am == targets[r];
  }
  const CrossEntropyStats st =
      CrossEntropyCpu<double>(rows, vocab, logits.data(), targets.data(), kIgnore, 1.0, nullptr);
  EXPECT_NEAR(st.loss_sum, loss, 1e-12 * std::abs(loss));
  EXPECT_EQ(st.count, 7);
  EXPECT_EQ(st.count, count);
  EXPECT_EQ(st.correct, correct);
  // Ties go to the first maximum: rows 6 and 7 on their own are both correct.
  EXPECT_EQ(CrossEntropyCpu<double>(2, vocab, logits.data() + 6 * vocab, targets.data() + 6,
                                    kIgnore, 1.0, nullptr)
                .correct,
            2);

  // Huge logits: the max-subtracted form stays finite and exact.
  Vec big = {1000.0, 999.0, -1000.0};
  const std::vector<int32_t> t1 = {1};
  Vec dbig(3);
  const CrossEntropyStats sb =
      CrossEntropyCpu<double>(1, 3, big.data(), t1.data(), kIgnore, 1.0, dbig.data());
  EXPECT_NEAR(sb.loss_sum, 1.0 + std::log1p(std::exp(-1.0)), 1e-12);
  EXPECT_EQ(sb.correct, 0);
  for (double g : dbig) EXPECT_TRUE(std::isfinite(g));
}

TEST(CrossEntropyCpu, BackwardMatchesFiniteDifferences) {
  const int64_t rows = 9, vocab = 13;
  const double grad_scale = 1.0 / 7;  // e.g. 1 / number of counted tokens
  Vec logits = RandomVector(rows * vocab, 110, -3.0, 3.0);
  const std::vector<int32_t> targets = {4, kIgnore, 0, 12, 7, kIgnore, 3, 11, 9};
  auto loss = [&] {
    return grad_scale * CrossEntropyCpu<double>(rows, vocab, logits.data(), targets.data(), kIgnore,
                                                grad_scale, nullptr)
                            .loss_sum;
  };
  Vec dlogits(logits.size(), 99.0);
  CrossEntropyCpu<double>(rows, vocab, logits.data(), targets.data(), kIgnore, grad_scale,
                          dlogits.data());
  ExpectGradient(dlogits, logits, loss, "cross-entropy dlogits");
  for (int64_t v = 0; v < vocab; ++v) {
    EXPECT_EQ(dlogits[1 * vocab + v], 0.0);
    EXPECT_EQ(dlogits[5 * vocab + v], 0.0);
  }

  // In place: dlogits may be the logits.
  Vec inplace = logits;
  CrossEntropyCpu<double>(rows, vocab, inplace.data(), targets.data(), kIgnore, grad_scale,
                          inplace.data());
  EXPECT_LT(RelativeError(inplace, dlogits), 1e-15);

  const auto lf = Cast<float>(logits);
  std::vector<float> df(logits.size());
  const CrossEntropyStats sf = CrossEntropyCpu<float>(rows, vocab, lf.data(), targets.data(),
                                                      kIgnore, grad_scale, df.data());
  const CrossEntropyStats sd = CrossEntropyCpu<double>(rows, vocab, logits.data(), targets.data(),
                                                       kIgnore, grad_scale, nullptr);
  EXPECT_NEAR(sf.loss_sum, sd.loss_sum, kFloatTol * std::abs(sd.loss_sum));
  EXPECT_EQ(sf.count, sd.count);
  EXPECT_EQ(sf.correct, sd.correct);
  EXPECT_LT(RelativeError(df, dlogits), kFloatTol);
}

TEST(CrossEntropyCpuDeathTest, TargetOutOfRangeAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const std::vector<float> logits(2 * 4, 0.0f);
  const std::vector<int32_t> targets = {1, 4};
  EXPECT_DEATH(CrossEntropyCpu<float>(2, 4, logits.data(), targets.data(), kIgnore, 1.0, nullptr),
               "target 4");
}

// ---------------------------------------------------------------------------------------------
// Parameter gradients do not depend on the number of threads (bitwise). In double, so that a
// change of summation order is not hidden by rounding to float.

TEST(OpsCpu, ParameterGradientsIndependentOfThreadCount) {
  // Sizes above the kernels' serial threshold (1 << 14 units of work), so they do run parallel.
  const int64_t rows = 203, dim = 100, vocab = 17, B = 3, L = 41, C = 70, K = 4;
  const auto a = RandomVector(rows * dim, 120);
  const auto b = RandomVector(rows * dim, 121);
  const auto nw = RandomVector(dim, 122, 0.5, 1.5);
  const auto cx = RandomVector(B * L * C, 123);
  const auto cw = RandomVector(C * K, 124);
  const auto cdy = RandomVector(B * L * C, 125);
  std::vector<int32_t> ids(rows);
  for (int64_t i = 0; i < rows; ++i) ids[i] = (i * 7) % vocab;

  auto grads = [&] {
    std::vector<double> res(rows * dim), y(rows * dim), rstd(rows), dx(rows * dim), out;
    std::vector<double> dwn(dim, 0.0), dwe(vocab * dim, 0.0), dbl(dim, 0.0), dwc(C * K, 0.0),
        dbc(C, 0.0), dxc(B * L * C);
    AddRmsNormForwardCpu<double>(rows, dim, a.data(), b.data(), nw.data(), 1e-5, res.data(),
                                 y.data(), rstd.data());
    AddRmsNormBackwardCpu<double>(rows, dim, a.data(), b.data(), res.data(), nw.data(), rstd.data(),
                                  dx.data(), dwn.data());
    EmbeddingBackwardCpu<double>(ids.data(), rows, a.data(), vocab, dim, dwe.data());
    std::vector<double> dw_lin(dim * dim, 0.0);  // BLAS's summation order: not compared
    LinearBackwardCpu<double>(rows, dim, dim, a.data(), b.data(), a.data(), nullptr, dw_lin.data(),
                              dbl.data());
    CausalConv1dBackwardCpu<double>(B, L, C, K, cx.data(), cw.data(), nw.data(), nullptr, true,
                                    cdy.data(), dxc.data(), dwc.data(), dbc.data(), nullptr);
    for (auto* v : {&dx, &dwn, &dwe, &dbl, &dwc, &dbc, &dxc})
      out.insert(out.end(), v->begin(), v->end());
    return out;
  };
  std::vector<double> one, three;
  WithThreads(1, [&] { one = grads(); });
  WithThreads(3, [&] { three = grads(); });
  EXPECT_EQ(one, three);
}

}  // namespace
}  // namespace mamba::kernels
