// The CPU selective scan against a plain float64 loop, against finite differences, and split in
// two pieces (h_last -> h0, dh0 -> dh_last) against one scan.
#include <gtest/gtest.h>

#include <cmath>

#include "tests/test_util.h"
#include "worker/kernels/selective_scan_cpu.h"

namespace mamba::kernels {
namespace {

using ::mamba::testing::Dot;
using ::mamba::testing::FiniteDifference;
using ::mamba::testing::RandomVector;
using ::mamba::testing::RelativeError;

// All inputs of one scan problem, in float64, CPU layout.
struct Problem {
  ScanShape s;
  std::vector<double> u, delta, A, Bm, Cm, Dskip, z, dt_bias, h0;

  Problem(int64_t B, int64_t L, int64_t D, int64_t N, int64_t G, uint64_t seed) {
    s = {B, L, D, N, G};
    u = RandomVector(B * L * D, seed + 1);
    delta = RandomVector(B * L * D, seed + 2, -3.0, 0.5);  // raw: softplus makes it positive
    A = RandomVector(D * N, seed + 3, -2.0, -0.1);
    Bm = RandomVector(B * L * G * N, seed + 4);
    Cm = RandomVector(B * L * G * N, seed + 5);
    Dskip = RandomVector(D, seed + 6);
    z = RandomVector(B * L * D, seed + 7, -2.0, 2.0);
    dt_bias = RandomVector(D, seed + 8, -1.0, 0.0);
    h0 = RandomVector(B * D * N, seed + 9);
  }

  ScanForwardArgs<double> Args() const {
    ScanForwardArgs<double> a;
    a.u = u.data();
    a.delta = delta.data();
    a.A = A.data();
    a.Bm = Bm.data();
    a.Cm = Cm.data();
    a.D_skip = Dskip.data();
    a.z = z.data();
    a.dt_bias = dt_bias.data();
    a.h0 = h0.data();
    return a;
  }
};

// The contract written as directly as possible, one (b, d, n) at a time.
void NaiveForward(const Problem& p, std::vector<double>& out, std::vector<double>& h_last) {
  const auto& s = p.s;
  out.assign(s.batch * s.len * s.dim, 0);
  h_last.assign(s.batch * s.dim * s.dstate, 0);
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t d = 0; d < s.dim; ++d) {
      const int64_t g = d / (s.dim / s.groups);
      std::vector<double> h(s.dstate);
      for (int64_t n = 0; n < s.dstate; ++n) h[n] = p.h0[(b * s.dim + d) * s.dstate + n];
      for (int64_t t = 0; t < s.len; ++t) {
        const int64_t i = (b * s.len + t) * s.dim + d;
        double raw = p.delta[i] + p.dt_bias[d];
        double dt = raw > 20 ? raw : std::log(1 + std::exp(raw));
        double y = p.Dskip[d] * p.u[i];
        for (int64_t n = 0; n < s.dstate; ++n) {
          const int64_t j = ((b * s.len + t) * s.groups + g) * s.dstate + n;
          h[n] = std::exp(dt * p.A[d * s.dstate + n]) * h[n] + dt * p.Bm[j] * p.u[i];
          y += p.Cm[j] * h[n];
        }
        out[i] = y * p.z[i] / (1 + std::exp(-p.z[i]));
      }
      for (int64_t n = 0; n < s.dstate; ++n) h_last[(b * s.dim + d) * s.dstate + n] = h[n];
    }
}

TEST(SelectiveScanCpu, ForwardMatchesNaiveLoop) {
  for (int64_t L : {1, 33}) {
    Problem p(2, L, 6, 4, 2, 100 + L);
    std::vector<double> out(p.u.size()), h_last(p.h0.size()), ref_out, ref_h;
    auto a = p.Args();
    a.out = out.data();
    a.h_last = h_last.data();
    SelectiveScanForwardCpu<double>(p.s, a);
    NaiveForward(p, ref_out, ref_h);
    EXPECT_LT(RelativeError(out, ref_out), 1e-14) << "L=" << L;
    EXPECT_LT(RelativeError(h_last, ref_h), 1e-14) << "L=" << L;
    // Not all zeros: the comparison means something.
    EXPECT_GT(std::abs(ref_out[0]) + std::abs(ref_out.back()), 1e-6);
  }
}

TEST(SelectiveScanCpu, FloatMatchesDouble) {
  Problem p(2, 64, 8, 16, 1, 7);
  std::vector<double> out(p.u.size()), h_last(p.h0.size());
  auto a = p.Args();
  a.out = out.data();
  a.h_last = h_last.data();
  SelectiveScanForwardCpu<double>(p.s, a);
  auto cast = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  auto u = cast(p.u), delta = cast(p.delta), A = cast(p.A), Bm = cast(p.Bm), Cm = cast(p.Cm),
       Ds = cast(p.Dskip), z = cast(p.z), bias = cast(p.dt_bias), h0 = cast(p.h0);
  std::vector<float> outf(out.size()), hf(h_last.size());
  ScanForwardArgs<float> af{u.data(), delta.data(), A.data(),  Bm.data(), Cm.data(),   Ds.data(),
                            z.data(), bias.data(),  h0.data(), true,      outf.data(), hf.data()};
  SelectiveScanForwardCpu<float>(p.s, af);
  EXPECT_LT(RelativeError(outf, out), 1e-5);
  EXPECT_LT(RelativeError(hf, h_last), 1e-5);
}

// Loss = <w_out, out> + <w_h, h_last>; its gradient from the backward against finite differences
// for every input.
TEST(SelectiveScanCpu, BackwardMatchesFiniteDifferences) {
  for (int64_t L : {1, 33}) {
    Problem p(2, L, 4, 3, 2, 500 + L);
    const auto w_out = RandomVector(p.u.size(), 11);
    const auto w_h = RandomVector(p.h0.size(), 12);
    auto loss = [&]() {
      std::vector<double> out(p.u.size()), h(p.h0.size());
      auto a = p.Args();
      a.out = out.data();
      a.h_last = h.data();
      SelectiveScanForwardCpu<double>(p.s, a);
      return Dot(out, w_out) + Dot(h, w_h);
    };
    std::vector<double> du(p.u.size()), ddelta(p.u.size()), dA(p.A.size()), dB(p.Bm.size()),
        dC(p.Cm.size()), dD(p.Dskip.size()), dz(p.z.size()), dbias(p.dt_bias.size()),
        dh0(p.h0.size());
    ScanBackwardArgs<double> b;
    b.fwd = p.Args();
    b.dout = w_out.data();
    b.dh_last = w_h.data();
    b.du = du.data();
    b.ddelta = ddelta.data();
    b.dA = dA.data();
    b.dBm = dB.data();
    b.dCm = dC.data();
    b.dD_skip = dD.data();
    b.dz = dz.data();
    b.ddt_bias = dbias.data();
    b.dh0 = dh0.data();
    SelectiveScanBackwardCpu<double>(p.s, b);
    const double tol = 1e-7;
    EXPECT_LT(RelativeError(du, FiniteDifference(p.u, loss)), tol) << "du L=" << L;
    EXPECT_LT(RelativeError(ddelta, FiniteDifference(p.delta, loss)), tol) << "ddelta L=" << L;
    EXPECT_LT(RelativeError(dA, FiniteDifference(p.A, loss)), tol) << "dA L=" << L;
    EXPECT_LT(RelativeError(dB, FiniteDifference(p.Bm, loss)), tol) << "dB L=" << L;
    EXPECT_LT(RelativeError(dC, FiniteDifference(p.Cm, loss)), tol) << "dC L=" << L;
    EXPECT_LT(RelativeError(dD, FiniteDifference(p.Dskip, loss)), tol) << "dD L=" << L;
    EXPECT_LT(RelativeError(dz, FiniteDifference(p.z, loss)), tol) << "dz L=" << L;
    EXPECT_LT(RelativeError(dbias, FiniteDifference(p.dt_bias, loss)), tol) << "ddt_bias L=" << L;
    EXPECT_LT(RelativeError(dh0, FiniteDifference(p.h0, loss)), tol) << "dh0 L=" << L;
  }
}

// Slices [0, L1) and [L1, L) of (B, L, ...) arrays with `inner` elements per position.
std::vector<double> SliceL(const std::vector<double>& v, int64_t B, int64_t L, int64_t inner,
                           int64_t t0, int64_t t1) {
  std::vector<double> r;
  for (int64_t b = 0; b < B; ++b)
    r.insert(r.end(), v.begin() + (b * L + t0) * inner, v.begin() + (b * L + t1) * inner);
  return r;
}

TEST(SelectiveScanCpu, TwoPiecesEqualOneScan) {
  const int64_t B = 2, L = 33, D = 5, N = 4, G = 1, L1 = 14;
  Problem p(B, L, D, N, G, 900);
  const auto dout = RandomVector(p.u.size(), 21);
  const auto dh_last = RandomVector(p.h0.size(), 22);

  struct Grads {
    std::vector<double> out, h_last, du, ddelta, dA, dB, dC, dD, dz, dbias, dh0;
  };
  auto run = [&](const Problem& q, const std::vector<double>& dout_q,
                 const std::vector<double>& dh_q) {
    Grads g;
    const auto& s = q.s;
    g.out.resize(q.u.size());
    g.h_last.resize(q.h0.size());
    auto a = q.Args();
    a.out = g.out.data();
    a.h_last = g.h_last.data();
    SelectiveScanForwardCpu<double>(s, a);
    g.du.resize(q.u.size());
    g.ddelta.resize(q.u.size());
    g.dA.resize(q.A.size());
    g.dB.resize(q.Bm.size());
    g.dC.resize(q.Cm.size());
    g.dD.resize(q.Dskip.size());
    g.dz.resize(q.z.size());
    g.dbias.resize(q.dt_bias.size());
    g.dh0.resize(q.h0.size());
    ScanBackwardArgs<double> b;
    b.fwd = q.Args();
    b.dout = dout_q.data();
    b.dh_last = dh_q.data();
    b.du = g.du.data();
    b.ddelta = g.ddelta.data();
    b.dA = g.dA.data();
    b.dBm = g.dB.data();
    b.dCm = g.dC.data();
    b.dD_skip = g.dD.data();
    b.dz = g.dz.data();
    b.ddt_bias = g.dbias.data();
    b.dh0 = g.dh0.data();
    SelectiveScanBackwardCpu<double>(s, b);
    return g;
  };
  const Grads whole = run(p, dout, dh_last);

  auto piece = [&](int64_t t0, int64_t t1) {
    Problem q = p;
    q.s.len = t1 - t0;
    q.u = SliceL(p.u, B, L, D, t0, t1);
    q.delta = SliceL(p.delta, B, L, D, t0, t1);
    q.z = SliceL(p.z, B, L, D, t0, t1);
    q.Bm = SliceL(p.Bm, B, L, G * N, t0, t1);
    q.Cm = SliceL(p.Cm, B, L, G * N, t0, t1);
    return q;
  };
  Problem p1 = piece(0, L1), p2 = piece(L1, L);
  // Forward of piece 1 gives h0 of piece 2; backward of piece 2 gives dh_last of piece 1.
  Grads g1f = run(p1, SliceL(dout, B, L, D, 0, L1), dh_last);
  p2.h0 = g1f.h_last;
  Grads g2 = run(p2, SliceL(dout, B, L, D, L1, L), dh_last);
  Grads g1 = run(p1, SliceL(dout, B, L, D, 0, L1), g2.dh0);

  auto join = [&](const std::vector<double>& a, const std::vector<double>& b, int64_t inner) {
    std::vector<double> r;
    for (int64_t bb = 0; bb < B; ++bb) {
      r.insert(r.end(), a.begin() + bb * L1 * inner, a.begin() + (bb + 1) * L1 * inner);
      r.insert(r.end(), b.begin() + bb * (L - L1) * inner, b.begin() + (bb + 1) * (L - L1) * inner);
    }
    return r;
  };
  auto add = [](std::vector<double> a, const std::vector<double>& b) {
    for (size_t i = 0; i < a.size(); ++i) a[i] += b[i];
    return a;
  };
  const double tol = 1e-12;
  EXPECT_LT(RelativeError(join(g1.out, g2.out, D), whole.out), tol);
  EXPECT_LT(RelativeError(g2.h_last, whole.h_last), tol);
  EXPECT_LT(RelativeError(join(g1.du, g2.du, D), whole.du), tol);
  EXPECT_LT(RelativeError(join(g1.ddelta, g2.ddelta, D), whole.ddelta), tol);
  EXPECT_LT(RelativeError(join(g1.dz, g2.dz, D), whole.dz), tol);
  EXPECT_LT(RelativeError(join(g1.dB, g2.dB, N), whole.dB), tol);
  EXPECT_LT(RelativeError(join(g1.dC, g2.dC, N), whole.dC), tol);
  EXPECT_LT(RelativeError(add(g1.dA, g2.dA), whole.dA), tol);
  EXPECT_LT(RelativeError(add(g1.dD, g2.dD), whole.dD), tol);
  EXPECT_LT(RelativeError(add(g1.dbias, g2.dbias), whole.dbias), tol);
  EXPECT_LT(RelativeError(g1.dh0, whole.dh0), tol);
}

TEST(SelectiveScanCpu, BackwardIsDeterministic) {
  Problem p(3, 50, 20, 8, 2, 77);
  const auto dout = RandomVector(p.u.size(), 5);
  auto run = [&]() {
    std::vector<double> du(p.u.size()), ddelta(p.u.size()), dA(p.A.size()), dB(p.Bm.size()),
        dC(p.Cm.size()), dD(p.Dskip.size()), dz(p.z.size()), dbias(p.dt_bias.size()),
        dh0(p.h0.size());
    ScanBackwardArgs<double> b;
    b.fwd = p.Args();
    b.dout = dout.data();
    b.du = du.data();
    b.ddelta = ddelta.data();
    b.dA = dA.data();
    b.dBm = dB.data();
    b.dCm = dC.data();
    b.dD_skip = dD.data();
    b.dz = dz.data();
    b.ddt_bias = dbias.data();
    b.dh0 = dh0.data();
    SelectiveScanBackwardCpu<double>(p.s, b);
    std::vector<double> all = du;
    for (auto* v : {&ddelta, &dA, &dB, &dC, &dD, &dz, &dbias, &dh0})
      all.insert(all.end(), v->begin(), v->end());
    return all;
  };
  EXPECT_EQ(run(), run());
}

}  // namespace
}  // namespace mamba::kernels
