// The CPU backend: float32 for training, float64 for finite-difference tests. Each op checks
// shapes, dispatches on dtype and calls the templated reference in worker/kernels/.
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>

#include "worker/backend.h"
#include "worker/check.h"
#include "worker/kernels/conv1d_cpu.h"
#include "worker/kernels/cross_entropy_cpu.h"
#include "worker/kernels/embedding_cpu.h"
#include "worker/kernels/linear_cpu.h"
#include "worker/kernels/rmsnorm_cpu.h"
#include "worker/kernels/selective_scan_cpu.h"
#include "worker/kernels/silu_cpu.h"

namespace mamba {
namespace {

// Calls fn(T{}) with T = float or double according to the tensor's dtype.
template <typename Fn>
auto Dispatch(const Tensor& t, Fn&& fn) {
  MAMBA_CHECK(t.device() == Device::kCPU) << "CPU backend given " << t.DebugString();
  switch (t.dtype()) {
    case DType::kF32:
      return fn(float{});
    case DType::kF64:
      return fn(double{});
    default:
      break;
  }
  MAMBA_CHECK(false) << "CPU backend supports float32 and float64, got " << t.DebugString();
  return fn(float{});
}

template <typename T>
const T* Opt(const Tensor& t) {
  return t.defined() ? t.data<T>() : nullptr;
}
template <typename T>
T* OptMut(const Tensor& t) {
  return t.defined() ? t.data<T>() : nullptr;
}

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }
  Device device() const override { return Device::kCPU; }

  Tensor Empty(const Shape& shape, DType dtype) override { return Tensor::Empty(shape, dtype); }
  void Zero(Tensor& t) override { std::memset(t.raw(), 0, t.nbytes()); }
  Tensor FromHost(const Tensor& host) override {
    Tensor t = Tensor::Empty(host.shape(), host.dtype());
    std::memcpy(t.raw(), host.raw(), host.nbytes());
    return t;
  }
  Tensor ToHost(const Tensor& t) override { return FromHost(t); }
  void CopyToHost(const Tensor& t, Tensor& host) override { CopyFromHost(t, host); }
  void CopyFromHost(const Tensor& host, Tensor& dst) override {
    CheckSameShape(host, dst, "copy_from_host");
    MAMBA_CHECK(host.dtype() == dst.dtype() && host.device() == Device::kCPU &&
                dst.device() == Device::kCPU)
        << "copy_from_host: " << host.DebugString() << " to " << dst.DebugString();
    std::memcpy(dst.raw(), host.raw(), host.nbytes());
  }
  void Convert(const Tensor& src, Tensor& dst) override {
    CheckSameShape(src, dst, "convert");
    Dispatch(src, [&](auto a) {
      Dispatch(dst, [&](auto b) {
        const auto* p = src.data<decltype(a)>();
        auto* q = dst.data<decltype(b)>();
        for (int64_t i = 0; i < src.numel(); ++i) q[i] = static_cast<decltype(b)>(p[i]);
      });
    });
  }

  void EmbeddingForward(const Tensor& ids, const Tensor& weight, Tensor& out) override {
    OpTimer timer(this, "embedding_fwd");
    MAMBA_CHECK(out.numel() == ids.numel() * weight.dim(1));
    Dispatch(weight, [&](auto z) {
      using T = decltype(z);
      kernels::EmbeddingForwardCpu<T>(ids.data<int32_t>(), ids.numel(), weight.data<T>(),
                                      weight.dim(0), weight.dim(1), out.data<T>());
    });
  }
  void EmbeddingBackward(const Tensor& ids, const Tensor& dout, Tensor& dweight) override {
    OpTimer timer(this, "embedding_bwd");
    MAMBA_CHECK(dout.numel() == ids.numel() * dweight.dim(1));
    Dispatch(dweight, [&](auto z) {
      using T = decltype(z);
      kernels::EmbeddingBackwardCpu<T>(ids.data<int32_t>(), ids.numel(), dout.data<T>(),
                                       dweight.dim(0), dweight.dim(1), dweight.data<T>());
    });
  }

  void AddRmsNormForward(const Tensor& residual_in, const Tensor& x, const Tensor& weight,
                         double eps, Tensor& residual_out, Tensor& y, Tensor& rstd) override {
    OpTimer timer(this, "rmsnorm_fwd");
    CheckSameShape(x, y, "rmsnorm");
    CheckSameShape(x, residual_out, "rmsnorm residual");
    MAMBA_CHECK(x.dim(-1) == weight.numel() && rstd.numel() == x.rows());
    Dispatch(x, [&](auto z) {
      using T = decltype(z);
      kernels::AddRmsNormForwardCpu<T>(x.rows(), x.dim(-1), Opt<T>(residual_in), x.data<T>(),
                                       weight.data<T>(), T(eps), residual_out.data<T>(),
                                       y.data<T>(), rstd.data<T>());
    });
  }
  using Backend::AddRmsNormBackward;
  void AddRmsNormBackward(const Tensor& dy, const Tensor& dresidual_out, const Tensor& residual_out,
                          const Tensor& weight, const Tensor& rstd, Tensor& dx, Tensor& dweight,
                          Tensor& dx_copy) override {
    OpTimer timer(this, "rmsnorm_bwd");
    CheckSameShape(dy, dx, "rmsnorm backward");
    Dispatch(dy, [&](auto z) {
      using T = decltype(z);
      kernels::AddRmsNormBackwardCpu<T>(dy.rows(), dy.dim(-1), dy.data<T>(), Opt<T>(dresidual_out),
                                        residual_out.data<T>(), weight.data<T>(), rstd.data<T>(),
                                        dx.data<T>(), dweight.data<T>());
      if (dx_copy.defined()) {
        CheckSameShape(dx, dx_copy, "rmsnorm backward dx_copy");
        std::copy(dx.data<T>(), dx.data<T>() + dx.numel(), dx_copy.data<T>());
      }
    });
  }

  void LinearForward(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& y) override {
    OpTimer timer(this, "linear_fwd");
    const int64_t M = x.rows(), N = w.dim(0), K = w.dim(1);
    MAMBA_CHECK(x.dim(-1) == K && y.numel() == M * N)
        << "linear: x " << x.DebugString() << " w " << w.DebugString() << " y " << y.DebugString();
    Dispatch(x, [&](auto z) {
      using T = decltype(z);
      kernels::LinearForwardCpu<T>(M, N, K, x.data<T>(), w.data<T>(), Opt<T>(bias), y.data<T>());
    });
  }
  using Backend::LinearBackward;
  void LinearBackward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor& dx, Tensor& dw,
                      Tensor& dbias, bool accumulate_dx) override {
    OpTimer timer(this, "linear_bwd");
    const int64_t M = x.rows(), N = w.dim(0), K = w.dim(1);
    MAMBA_CHECK(dy.numel() == M * N && dw.shape() == w.shape());
    Dispatch(x, [&](auto z) {
      using T = decltype(z);
      kernels::LinearBackwardCpu<T>(M, N, K, dy.data<T>(), x.data<T>(), w.data<T>(), OptMut<T>(dx),
                                    dw.data<T>(), OptMut<T>(dbias), accumulate_dx);
    });
  }

  void CausalConv1dForward(const Tensor& x, const Tensor& weight, const Tensor& bias,
                           const Tensor& prefix, bool silu, Tensor& y) override {
    OpTimer timer(this, "conv1d_fwd");
    CheckSameShape(x, y, "conv1d");
    const int64_t C = x.dim(2), K = weight.dim(-1);
    MAMBA_CHECK(weight.numel() == C * K);
    Dispatch(x, [&](auto z) {
      using T = decltype(z);
      kernels::CausalConv1dForwardCpu<T>(x.dim(0), x.dim(1), C, K, x.data<T>(), weight.data<T>(),
                                         Opt<T>(bias), Opt<T>(prefix), silu, y.data<T>());
    });
  }
  void CausalConv1dBackward(const Tensor& x, const Tensor& weight, const Tensor& bias,
                            const Tensor& prefix, bool silu, const Tensor& dy, Tensor& dx,
                            Tensor& dweight, Tensor& dbias, Tensor& dprefix) override {
    OpTimer timer(this, "conv1d_bwd");
    CheckSameShape(x, dx, "conv1d backward");
    const int64_t C = x.dim(2), K = weight.dim(-1);
    Dispatch(x, [&](auto z) {
      using T = decltype(z);
      kernels::CausalConv1dBackwardCpu<T>(x.dim(0), x.dim(1), C, K, x.data<T>(), weight.data<T>(),
                                          Opt<T>(bias), Opt<T>(prefix), silu, dy.data<T>(),
                                          dx.data<T>(), dweight.data<T>(), OptMut<T>(dbias),
                                          OptMut<T>(dprefix));
    });
  }

  void SiluForward(const Tensor& x, Tensor& y) override {
    OpTimer timer(this, "silu_fwd");
    CheckSameShape(x, y, "silu");
    Dispatch(x, [&](auto z) {
      using T = decltype(z);
      kernels::SiluForwardCpu<T>(x.numel(), x.data<T>(), y.data<T>());
    });
  }
  void SiluBackward(const Tensor& x, const Tensor& dy, Tensor& dx) override {
    OpTimer timer(this, "silu_bwd");
    CheckSameShape(x, dx, "silu backward");
    Dispatch(x, [&](auto z) {
      using T = decltype(z);
      kernels::SiluBackwardCpu<T>(x.numel(), x.data<T>(), dy.data<T>(), dx.data<T>());
    });
  }

  void SelectiveScanForward(const ScanInputs& given, Tensor& out, Tensor& h_last) override {
    OpTimer timer(this, "selective_scan_fwd");
    const ScanInputs in = WithBlocks(given);
    const kernels::ScanShape s = ScanShapeOf(in);
    Dispatch(in.u, [&](auto z) {
      using T = decltype(z);
      kernels::ScanForwardArgs<T> a = ForwardArgs<T>(in);
      a.out = out.data<T>();
      a.h_last = OptMut<T>(h_last);
      kernels::SelectiveScanForwardCpu<T>(s, a);
    });
  }
  void SelectiveScanBackward(const ScanInputs& given, const Tensor& dout, const Tensor& dh_last,
                             ScanGrads& g) override {
    OpTimer timer(this, "selective_scan_bwd");
    const ScanInputs in = WithBlocks(given);
    if (given.bc.defined()) {  // gradients of the blocks, then into dbc's columns
      CheckSameShape(given.bc, g.dbc, "scan backward dbc");
      g.dBm = Empty(in.Bm.shape(), in.Bm.dtype());
      g.dCm = Empty(in.Cm.shape(), in.Cm.dtype());
    }
    const kernels::ScanShape s = ScanShapeOf(in);
    Dispatch(in.u, [&](auto z) {
      using T = decltype(z);
      kernels::ScanBackwardArgs<T> a;
      a.fwd = ForwardArgs<T>(in);
      a.dout = dout.data<T>();
      a.dh_last = Opt<T>(dh_last);
      a.du = g.du.data<T>();
      a.ddelta = g.ddelta.data<T>();
      a.dA = g.dA.data<T>();
      a.dBm = g.dBm.data<T>();
      a.dCm = g.dCm.data<T>();
      a.dD_skip = OptMut<T>(g.dD_skip);
      a.dz = OptMut<T>(g.dz);
      a.ddt_bias = OptMut<T>(g.ddt_bias);
      a.dh0 = OptMut<T>(g.dh0);
      kernels::SelectiveScanBackwardCpu<T>(s, a);
    });
    if (given.bc.defined()) {
      WriteColumns(g.dBm, g.dbc, given.bm_col);
      WriteColumns(g.dCm, g.dbc, given.cm_col);
      g.dBm = g.dCm = Tensor();
    }
  }

  void SelectiveScanStateMap(const ScanInputs& given, Tensor& decay, Tensor& state) override {
    OpTimer timer(this, "scan_state_map");
    const ScanInputs in = WithBlocks(given);
    const kernels::ScanShape s = ScanShapeOf(in);
    Dispatch(in.u, [&](auto z) {
      using T = decltype(z);
      kernels::SelectiveScanStateMapCpu<T>(s, ForwardArgs<T>(in), decay.data<T>(),
                                           OptMut<T>(state));
    });
  }
  void SelectiveScanStateGrad(const ScanInputs& given, const Tensor& dout,
                              Tensor& dstate) override {
    OpTimer timer(this, "scan_state_grad");
    const ScanInputs in = WithBlocks(given);
    const kernels::ScanShape s = ScanShapeOf(in);
    Dispatch(in.u, [&](auto z) {
      using T = decltype(z);
      kernels::SelectiveScanStateGradCpu<T>(s, ForwardArgs<T>(in), dout.data<T>(),
                                            dstate.data<T>());
    });
  }

  kernels::CrossEntropyStats CrossEntropy(const Tensor& logits, const Tensor& targets,
                                          int32_t ignore_index, double grad_scale,
                                          Tensor& dlogits) override {
    OpTimer timer(this, "cross_entropy");
    MAMBA_CHECK(targets.numel() == logits.rows());
    return Dispatch(logits, [&](auto z) {
      using T = decltype(z);
      return kernels::CrossEntropyCpu<T>(logits.rows(), logits.dim(-1), logits.data<T>(),
                                         targets.data<int32_t>(), ignore_index, grad_scale,
                                         OptMut<T>(dlogits));
    });
  }
  void AccumulateCrossEntropy(const Tensor& logits, const Tensor& targets, int32_t ignore_index,
                              double grad_scale, Tensor& dlogits) override {
    const kernels::CrossEntropyStats s =
        CrossEntropy(logits, targets, ignore_index, grad_scale, dlogits);
    cross_entropy_total_.loss_sum += s.loss_sum;
    cross_entropy_total_.count += s.count;
    cross_entropy_total_.correct += s.correct;
  }
  kernels::CrossEntropyStats TakeCrossEntropyStats() override {
    const kernels::CrossEntropyStats total = cross_entropy_total_;
    cross_entropy_total_ = {};
    return total;
  }

  // Host time per op (the ops run synchronously), for the profiling report and benchmarks.
  void EnableOpTiming(bool on) override { timing_ = on; }
  std::vector<std::pair<std::string, double>> TakeOpTimes() override {
    std::vector<std::pair<std::string, double>> out(op_ms_.begin(), op_ms_.end());
    op_ms_.clear();
    return out;
  }

  void CopyColumns(const Tensor& src, int64_t col0, Tensor& dst) override {
    const int64_t rows = src.rows(), n = dst.dim(-1), ld = src.dim(-1);
    MAMBA_CHECK(dst.rows() == rows && col0 + n <= ld);
    const size_t es = DTypeSize(src.dtype());
    const char* s = static_cast<const char*>(src.raw());
    char* d = static_cast<char*>(dst.raw());
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(d + r * n * es, s + (r * ld + col0) * es, n * es);
  }
  void WriteColumns(const Tensor& src, Tensor& dst, int64_t col0) override {
    const int64_t rows = src.rows(), n = src.dim(-1), ld = dst.dim(-1);
    MAMBA_CHECK(dst.rows() == rows && col0 + n <= ld);
    const size_t es = DTypeSize(src.dtype());
    const char* s = static_cast<const char*>(src.raw());
    char* d = static_cast<char*>(dst.raw());
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(d + (r * ld + col0) * es, s + r * n * es, n * es);
  }

  void NegExp(const Tensor& x, Tensor& y) override {
    CheckSameShape(x, y, "negexp");
    Dispatch(x, [&](auto z) {
      using T = decltype(z);
      const T* a = x.data<T>();
      T* b = y.data<T>();
      for (int64_t i = 0; i < x.numel(); ++i) b[i] = -std::exp(a[i]);
    });
  }
  void AddProduct(const Tensor& a, const Tensor& b, Tensor& dst) override {
    CheckSameShape(a, dst, "addproduct");
    CheckSameShape(b, dst, "addproduct");
    Dispatch(dst, [&](auto z) {
      using T = decltype(z);
      const T *p = a.data<T>(), *q = b.data<T>();
      T* r = dst.data<T>();
      for (int64_t i = 0; i < dst.numel(); ++i) r[i] += p[i] * q[i];
    });
  }
  void Add(const Tensor& src, Tensor& dst) override {
    MAMBA_CHECK(src.numel() == dst.numel()) << src.DebugString() << " += " << dst.DebugString();
    Dispatch(dst, [&](auto z) {
      using T = decltype(z);
      const T* p = src.data<T>();
      T* r = dst.data<T>();
      for (int64_t i = 0; i < dst.numel(); ++i) r[i] += p[i];
    });
  }
  void Scale(Tensor& x, double s) override {
    Dispatch(x, [&](auto z) {
      using T = decltype(z);
      T* p = x.data<T>();
      for (int64_t i = 0; i < x.numel(); ++i) p[i] *= T(s);
    });
  }
  double SumSquares(const std::vector<Tensor>& xs) override {
    OpTimer timer(this, "sum_squares");
    double s = 0;
    for (const Tensor& x : xs) {
      Dispatch(x, [&](auto z) {
        using T = decltype(z);
        const T* p = x.data<T>();
        for (int64_t i = 0; i < x.numel(); ++i) s += double(p[i]) * double(p[i]);
      });
    }
    return s;
  }

  void AdamW(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, Tensor& param_bf16,
             const AdamWHyper& h) override {
    OpTimer timer(this, "adamw");
    CheckSameShape(param, grad, "adamw");
    CheckSameShape(param, m, "adamw");
    CheckSameShape(param, v, "adamw");
    MAMBA_CHECK(!param_bf16.defined())
        << "adamw: the CPU backend has no bfloat16, got " << param_bf16.DebugString();
    Dispatch(param, [&](auto z) {
      using T = decltype(z);
      T *p = param.data<T>(), *mm = m.data<T>(), *vv = v.data<T>();
      const T* g = grad.data<T>();
      const double bc1 = 1 - std::pow(h.beta1, double(h.step));
      const double bc2 = 1 - std::pow(h.beta2, double(h.step));
      const T decay = T(1 - h.lr * h.weight_decay), step_size = T(h.lr / bc1);
      const T b1 = T(h.beta1), b2 = T(h.beta2), sqrt_bc2 = T(std::sqrt(bc2)), eps = T(h.eps);
      const T scale = T(h.grad_scale);
      for (int64_t i = 0; i < param.numel(); ++i) {
        const T gi = g[i] * scale;
        mm[i] = b1 * mm[i] + (1 - b1) * gi;
        vv[i] = b2 * vv[i] + (1 - b2) * gi * gi;
        p[i] = p[i] * decay - step_size * mm[i] / (std::sqrt(vv[i]) / sqrt_bc2 + eps);
      }
    });
  }

 private:
  // Times one op while timing is on.
  class OpTimer {
   public:
    OpTimer(CpuBackend* be, const char* name)
        : be_(be), name_(name), start_(be->timing_ ? Clock::now() : Clock::time_point()) {}
    ~OpTimer() {
      if (be_->timing_) {
        be_->op_ms_[name_] +=
            std::chrono::duration<double, std::milli>(Clock::now() - start_).count();
      }
    }

   private:
    using Clock = std::chrono::steady_clock;
    CpuBackend* be_;
    const char* name_;
    Clock::time_point start_;
  };
  bool timing_ = false;
  std::map<std::string, double> op_ms_;
  kernels::CrossEntropyStats cross_entropy_total_;

  // ScanInputs with Bm and Cm as their own tensors: copies of bc's column blocks when given so.
  ScanInputs WithBlocks(const ScanInputs& in) {
    if (!in.bc.defined()) return in;
    ScanInputs r = in;
    const int64_t B = in.bc.dim(0), L = in.bc.dim(1), N = in.A.dim(1);
    r.Bm = Empty({B, L, 1, N}, in.bc.dtype());
    r.Cm = Empty({B, L, 1, N}, in.bc.dtype());
    CopyColumns(in.bc, in.bm_col, r.Bm);
    CopyColumns(in.bc, in.cm_col, r.Cm);
    r.bc = Tensor();
    return r;
  }
  static kernels::ScanShape ScanShapeOf(const ScanInputs& in) {
    kernels::ScanShape s;
    s.batch = in.u.dim(0);
    s.len = in.u.dim(1);
    s.dim = in.u.dim(2);
    s.dstate = in.A.dim(1);
    s.groups = in.Bm.dim(2);
    MAMBA_CHECK(in.A.dim(0) == s.dim && s.dim % s.groups == 0);
    MAMBA_CHECK(in.Bm.shape() == (Shape{s.batch, s.len, s.groups, s.dstate}))
        << "scan Bm " << in.Bm.DebugString();
    MAMBA_CHECK(in.Cm.shape() == in.Bm.shape());
    return s;
  }
  template <typename T>
  static kernels::ScanForwardArgs<T> ForwardArgs(const ScanInputs& in) {
    kernels::ScanForwardArgs<T> a;
    a.u = in.u.data<T>();
    a.delta = in.delta.data<T>();
    a.A = in.A.data<T>();
    a.Bm = in.Bm.data<T>();
    a.Cm = in.Cm.data<T>();
    a.D_skip = Opt<T>(in.D_skip);
    a.z = Opt<T>(in.z);
    a.dt_bias = Opt<T>(in.dt_bias);
    a.h0 = Opt<T>(in.h0);
    a.delta_softplus = in.delta_softplus;
    return a;
  }
};

}  // namespace

std::unique_ptr<Backend> MakeCpuBackend() { return std::make_unique<CpuBackend>(); }

}  // namespace mamba
