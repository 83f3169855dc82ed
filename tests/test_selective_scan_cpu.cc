// The CPU selective scan against a plain float64 loop, against finite differences, and split in
// two pieces (h_last -> h0, dh0 -> dh_last) against one scan.
#include <gtest/gtest.h>

#include <array>
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

// Every gradient of one backward call.
struct Grads {
  std::vector<double> du, ddelta, dA, dB, dC, dD, dz, dbias, dh0;
};

// The backward of p's scan for output gradient dout and (optional) final-state gradient dh_last.
Grads Backward(const Problem& p, const std::vector<double>& dout, const double* dh_last) {
  Grads g{std::vector<double>(p.u.size()),  std::vector<double>(p.u.size()),
          std::vector<double>(p.A.size()),  std::vector<double>(p.Bm.size()),
          std::vector<double>(p.Cm.size()), std::vector<double>(p.Dskip.size()),
          std::vector<double>(p.z.size()),  std::vector<double>(p.dt_bias.size()),
          std::vector<double>(p.h0.size())};
  ScanBackwardArgs<double> b;
  b.fwd = p.Args();
  b.dout = dout.data();
  b.dh_last = dh_last;
  b.du = g.du.data();
  b.ddelta = g.ddelta.data();
  b.dA = g.dA.data();
  b.dBm = g.dB.data();
  b.dCm = g.dC.data();
  b.dD_skip = g.dD.data();
  b.dz = g.dz.data();
  b.ddt_bias = g.dbias.data();
  b.dh0 = g.dh0.data();
  SelectiveScanBackwardCpu<double>(p.s, b);
  return g;
}

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
    const Grads g = Backward(p, w_out, w_h.data());
    const double tol = 1e-7;
    EXPECT_LT(RelativeError(g.du, FiniteDifference(p.u, loss)), tol) << "du L=" << L;
    EXPECT_LT(RelativeError(g.ddelta, FiniteDifference(p.delta, loss)), tol) << "ddelta L=" << L;
    EXPECT_LT(RelativeError(g.dA, FiniteDifference(p.A, loss)), tol) << "dA L=" << L;
    EXPECT_LT(RelativeError(g.dB, FiniteDifference(p.Bm, loss)), tol) << "dB L=" << L;
    EXPECT_LT(RelativeError(g.dC, FiniteDifference(p.Cm, loss)), tol) << "dC L=" << L;
    EXPECT_LT(RelativeError(g.dD, FiniteDifference(p.Dskip, loss)), tol) << "dD L=" << L;
    EXPECT_LT(RelativeError(g.dz, FiniteDifference(p.z, loss)), tol) << "dz L=" << L;
    EXPECT_LT(RelativeError(g.dbias, FiniteDifference(p.dt_bias, loss)), tol) << "ddt_bias L=" << L;
    EXPECT_LT(RelativeError(g.dh0, FiniteDifference(p.h0, loss)), tol) << "dh0 L=" << L;
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

  struct Run {
    std::vector<double> out, h_last;
    Grads g;
  };
  auto run = [&](const Problem& q, const std::vector<double>& dout_q,
                 const std::vector<double>& dh_q) {
    Run r;
    r.out.resize(q.u.size());
    r.h_last.resize(q.h0.size());
    auto a = q.Args();
    a.out = r.out.data();
    a.h_last = r.h_last.data();
    SelectiveScanForwardCpu<double>(q.s, a);
    r.g = Backward(q, dout_q, dh_q.data());
    return r;
  };
  const Run whole = run(p, dout, dh_last);

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
  const Run r1f = run(p1, SliceL(dout, B, L, D, 0, L1), dh_last);
  p2.h0 = r1f.h_last;
  const Run r2 = run(p2, SliceL(dout, B, L, D, L1, L), dh_last);
  const Run r1 = run(p1, SliceL(dout, B, L, D, 0, L1), r2.g.dh0);
  const Grads &g1 = r1.g, &g2 = r2.g, &gw = whole.g;

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
  EXPECT_LT(RelativeError(join(r1.out, r2.out, D), whole.out), tol);
  EXPECT_LT(RelativeError(r2.h_last, whole.h_last), tol);
  EXPECT_LT(RelativeError(join(g1.du, g2.du, D), gw.du), tol);
  EXPECT_LT(RelativeError(join(g1.ddelta, g2.ddelta, D), gw.ddelta), tol);
  EXPECT_LT(RelativeError(join(g1.dz, g2.dz, D), gw.dz), tol);
  EXPECT_LT(RelativeError(join(g1.dB, g2.dB, N), gw.dB), tol);
  EXPECT_LT(RelativeError(join(g1.dC, g2.dC, N), gw.dC), tol);
  EXPECT_LT(RelativeError(add(g1.dA, g2.dA), gw.dA), tol);
  EXPECT_LT(RelativeError(add(g1.dD, g2.dD), gw.dD), tol);
  EXPECT_LT(RelativeError(add(g1.dbias, g2.dbias), gw.dbias), tol);
  EXPECT_LT(RelativeError(g1.dh0, gw.dh0), tol);
}

TEST(SelectiveScanCpu, BackwardIsDeterministic) {
  Problem p(3, 50, 20, 8, 2, 77);
  const auto dout = RandomVector(p.u.size(), 5);
  auto run = [&]() {
    const Grads g = Backward(p, dout, nullptr);
    std::vector<double> all = g.du;
    for (const auto* v : {&g.ddelta, &g.dA, &g.dB, &g.dC, &g.dD, &g.dz, &g.dbias, &g.dh0})
      all.insert(all.end(), v->begin(), v->end());
    return all;
  };
  EXPECT_EQ(run(), run());
}

// The slice maps of sequence parallelism, against the scan itself: with h0 = H, the forward's
// final state is decay * H + state; with dh_last = G, the backward's dh0 is decay * G + dstate.
TEST(SelectiveScanStateMapCpu, ComposesLikeTheScan) {
  for (const auto& [B, L, D, N, G] :
       std::vector<std::array<int64_t, 5>>{{2, 7, 6, 4, 2}, {1, 1, 3, 16, 1}, {3, 33, 4, 5, 1}}) {
    SCOPED_TRACE(::testing::Message() << "B " << B << " L " << L << " D " << D << " N " << N);
    const Problem p(B, L, D, N, G, 41 + L);
    std::vector<double> decay(B * D * N), state(B * D * N);
    SelectiveScanStateMapCpu<double>(p.s, p.Args(), decay.data(), state.data());
    std::vector<double> out(p.u.size()), h_last(B * D * N);
    ScanForwardArgs<double> f = p.Args();
    f.out = out.data();
    f.h_last = h_last.data();
    SelectiveScanForwardCpu<double>(p.s, f);
    std::vector<double> composed(B * D * N);
    for (size_t i = 0; i < composed.size(); ++i) composed[i] = decay[i] * p.h0[i] + state[i];
    EXPECT_LT(RelativeError(composed, h_last), 1e-13);
    for (double a : decay) {  // a decay of positive steps and negative A: in (0, 1)
      EXPECT_GT(a, 0);
      EXPECT_LT(a, 1);
    }
    std::vector<double> decay_alone(B * D * N, -1.0);  // no state asked for: the same decay
    SelectiveScanStateMapCpu<double>(p.s, p.Args(), decay_alone.data(), nullptr);
    EXPECT_EQ(decay_alone, decay);

    const std::vector<double> dout = RandomVector(p.u.size(), 7 + L);
    const std::vector<double> dh_last = RandomVector(B * D * N, 8 + L);
    std::vector<double> dstate(B * D * N);
    SelectiveScanStateGradCpu<double>(p.s, p.Args(), dout.data(), dstate.data());
    const Grads g = Backward(p, dout, dh_last.data());
    std::vector<double> composed_grad(B * D * N);
    for (size_t i = 0; i < composed_grad.size(); ++i) {
      composed_grad[i] = decay[i] * dh_last[i] + dstate[i];
    }
    EXPECT_LT(RelativeError(composed_grad, g.dh0), 1e-13);
  }
}

}  // namespace
}  // namespace mamba::kernels
