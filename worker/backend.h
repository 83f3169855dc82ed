// The op interface the model is written against. One model, several backends: the CPU backend
// (the reference and test oracle) and the CUDA backend (built when MAMBA_HAS_CUDA is defined)
// implement the same ops. The math of each op is documented beside its CPU reference in
// worker/kernels/<op>_cpu.h.
//
// Conventions: activations are row-major (tokens, channels), tokens ordered (batch, position);
// linear weights use torch's (out, in) layout. Activation gradients are overwritten, parameter
// gradients accumulate (+=), so tied weights and several contributions add up. Optional inputs are
// undefined Tensors.
//
// Dtypes: the CPU backend takes float32 or float64, one dtype per op. The CUDA backend keeps
// parameters and their gradients, the residual stream and the scan state in float32; activations
// ("act": float32 or bfloat16, picked by the tensor's dtype, computed in float inside the kernels
// and rounded to nearest even on store) are, per op:
//   Embedding: out, dout act. AddRmsNorm: x and y act (each its own); residual_in/out,
//   dresidual_out, dx, weight, rstd float32; dy act. CausalConv1d, Silu: x, y, prefix and their
//   gradients one act dtype. SelectiveScan: u, delta, z, Bm, Cm, out and their gradients one act
//   dtype; A, D_skip, dt_bias, h0, h_last and their gradients float32. CrossEntropy: logits and
//   dlogits one act dtype. Add: src and dst act, any mix. CopyColumns, WriteColumns: any dtype,
//   the same for src and dst.
#pragma once

#include <cstddef>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "profiling/cupti_counters.h"
#include "worker/kernels/cross_entropy_cpu.h"
#include "worker/tensor.h"

namespace mamba {

// Inputs of the selective scan (DESIGN.md's contract), channel-contiguous:
// u, delta, z: (B, L, D); Bm, Cm: (B, L, G, N); A: (D, N); D_skip, dt_bias: (D); h0: (B, D, N).
struct ScanInputs {
  Tensor u, delta, A, Bm, Cm, D_skip, z, dt_bias, h0;
  bool delta_softplus = true;
  // Or, with one group, Bm and Cm as column blocks of a (B, L, K) tensor read in place (x_proj's
  // output, with no copies): Bm = bc[..., bm_col, + N), Cm = bc[..., cm_col, + N). Used when bc
  // is defined, Bm and Cm then undefined.
  Tensor bc;
  int64_t bm_col = 0, cm_col = 0;
};

// Gradients of the scan: activation gradients shaped like their inputs; dA, dD_skip, ddt_bias
// overwritten (not accumulated) since the model maps them onto its parameters itself.
struct ScanGrads {
  Tensor du, ddelta, dA, dBm, dCm, dD_skip, dz, ddt_bias, dh0;
  // With ScanInputs::bc: dBm and dCm go to the same columns of dbc (shaped like bc) instead.
  Tensor dbc;
};

struct AdamWHyper {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.0;
  int64_t step = 1;  // 1-based, for bias correction
  // The step uses grad * grad_scale, multiplied in the param dtype (float(grad_scale) for fp32,
  // as a separate scaling pass would): the clipping coefficient.
  double grad_scale = 1.0;
};

// Device memory of a backend's tensors (process-wide for the device). The CPU backend reports
// zeros.
struct DeviceMemoryStats {
  size_t in_use = 0;               // bytes held by live tensors
  size_t peak_in_use = 0;          // high-water mark of in_use since the last reset
  size_t reserved = 0;             // bytes obtained from the device (in use + cached)
  size_t workspace = 0;            // of those, bytes in one-piece workspaces (ReserveWorkspace)
  int64_t device_allocations = 0;  // device allocation calls so far (steady-state steps add none)
};

// Thrown when a device allocation fails even after the cached blocks were given back: the one
// exception in the worker, because a step can run out of memory inside any op and ops return
// nothing. Trainer::Run turns it into RESOURCE_EXHAUSTED; nothing is updated or saved.
class DeviceOutOfMemory : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual Device device() const = 0;

  // Device time per op, for benchmarks: when enabled, each op is bracketed by timing events.
  virtual void EnableOpTiming(bool /*on*/) {}
  // Milliseconds per op name since the last call (waits for the device); empty when disabled.
  virtual std::vector<std::pair<std::string, double>> TakeOpTimes() { return {}; }
  // Hardware counters (profiling/cupti_counters.h) of the kernels of the ops named ("*": every
  // op) while enabled; ops run as before, slower. Returns "" when counting, else why it cannot.
  virtual std::string EnableOpCounters(const std::vector<std::string>& /*ops*/) {
    return "the " + name() + " backend has no hardware counters";
  }
  virtual void DisableOpCounters() {}
  // The counters per op name since the last call; *why says why counting stopped, if it did.
  virtual std::vector<std::pair<std::string, profiling::KernelCounters>> TakeOpCounters(
      std::string* /*why*/) {
    return {};
  }

  // Memory.
  virtual DeviceMemoryStats MemoryStats() const { return {}; }
  virtual void ResetPeakMemory() {}
  // Gives the device buffers held free for reuse back to the device, and the workspaces none of
  // whose buffers is in use.
  virtual void ReleaseCachedMemory() {}
  // Gathers the device buffers held free for reuse (after a probe step: all of that step's
  // buffers) into one allocation, carved into the same blocks, so that later steps of the same
  // shapes take every buffer from it. Returns its size: 0 when nothing was free, and on backends
  // without a device heap. Throws DeviceOutOfMemory when the one piece cannot be had.
  virtual size_t ReserveWorkspace() { return 0; }
  virtual Tensor Empty(const Shape& shape, DType dtype) = 0;
  virtual void Zero(Tensor& t) = 0;
  virtual Tensor FromHost(const Tensor& host) = 0;  // a device copy of a CPU tensor
  virtual Tensor ToHost(const Tensor& t) = 0;       // a CPU copy
  // A CPU tensor for staging device data through host memory (the MPI transport): page-locked
  // where the device copies faster from and to it, reused once the tensor is gone.
  virtual Tensor StagingHostEmpty(const Shape& shape, DType dtype) {
    return Tensor::Empty(shape, dtype);
  }
  // Copies device tensor t into an existing CPU tensor of the same shape and dtype.
  virtual void CopyToHost(const Tensor& t, Tensor& host) = 0;
  // Copies a CPU tensor into an existing device tensor of the same shape and dtype (its buffer,
  // and so every view of it, stays the same). The host tensor may be freed once this returns.
  virtual void CopyFromHost(const Tensor& host, Tensor& dst) = 0;
  // dst = src converted to dst's dtype, or copied when the dtypes match (same shape; bf16 rounds
  // to nearest even).
  virtual void Convert(const Tensor& src, Tensor& dst) = 0;
  // Waits until every op enqueued so far has finished (for timing).
  virtual void Synchronize() {}
  // The stream the ops run on (a cudaStream_t), for communication ordered after them; null on
  // backends that run ops synchronously.
  virtual void* compute_stream() const { return nullptr; }

  // The dtype the GEMMs (LinearForward/LinearBackward) want weights of `weight_dtype` in: the
  // model keeps shadow copies of its GEMM weights in it when it differs.
  virtual DType GemmOperandDType(DType weight_dtype) const { return weight_dtype; }

  // Embedding: out (T, C) = weight[ids]; dweight += scatter of dout.
  virtual void EmbeddingForward(const Tensor& ids, const Tensor& weight, Tensor& out) = 0;
  virtual void EmbeddingBackward(const Tensor& ids, const Tensor& dout, Tensor& dweight) = 0;

  // Fused residual add + RMSNorm: residual_out = residual_in + x; y = RMSNorm(residual_out) * w.
  virtual void AddRmsNormForward(const Tensor& residual_in, const Tensor& x, const Tensor& weight,
                                 double eps, Tensor& residual_out, Tensor& y, Tensor& rstd) = 0;
  // dx: gradient with respect to residual_out (and so to residual_in and x). dx_copy
  // (optional): dx again, in its own dtype (bf16 for the next GEMM), written in the same pass.
  virtual void AddRmsNormBackward(const Tensor& dy, const Tensor& dresidual_out,
                                  const Tensor& residual_out, const Tensor& weight,
                                  const Tensor& rstd, Tensor& dx, Tensor& dweight,
                                  Tensor& dx_copy) = 0;
  void AddRmsNormBackward(const Tensor& dy, const Tensor& dresidual_out, const Tensor& residual_out,
                          const Tensor& weight, const Tensor& rstd, Tensor& dx, Tensor& dweight) {
    Tensor none;
    AddRmsNormBackward(dy, dresidual_out, residual_out, weight, rstd, dx, dweight, none);
  }

  // y (M, N) = x (M, K) w (N, K)^T + bias. Backends may take bf16 x, w, dy and give bf16 y, dx
  // (the CUDA backend under GemmPrecision::kBf16); dw and dbias are in the param dtype.
  virtual void LinearForward(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& y) = 0;
  // accumulate_dx: dx += dy w instead of dx = dy w (the sum of two layers' input gradients
  // without a separate add).
  virtual void LinearBackward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor& dx,
                              Tensor& dw, Tensor& dbias, bool accumulate_dx) = 0;
  void LinearBackward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor& dx, Tensor& dw,
                      Tensor& dbias) {
    LinearBackward(dy, x, w, dx, dw, dbias, /*accumulate_dx=*/false);
  }

  // Depthwise causal conv1d along L with bias and optional fused SiLU. x, y: (B, L, C);
  // weight (C, 1, K) as HF stores it; prefix (B, K-1, C): the positions before x, or undefined.
  virtual void CausalConv1dForward(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                   const Tensor& prefix, bool silu, Tensor& y) = 0;
  virtual void CausalConv1dBackward(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                    const Tensor& prefix, bool silu, const Tensor& dy, Tensor& dx,
                                    Tensor& dweight, Tensor& dbias, Tensor& dprefix) = 0;

  virtual void SiluForward(const Tensor& x, Tensor& y) = 0;
  virtual void SiluBackward(const Tensor& x, const Tensor& dy, Tensor& dx) = 0;

  // out: (B, L, D); h_last (B, D, N) or undefined.
  virtual void SelectiveScanForward(const ScanInputs& in, Tensor& out, Tensor& h_last) = 0;
  virtual void SelectiveScanBackward(const ScanInputs& in, const Tensor& dout,
                                     const Tensor& dh_last, ScanGrads& grads) = 0;

  // A slice's affine state maps, for sequence parallelism (selective_scan_cpu.h):
  //   h_last = decay * h0 + state,  dh0 = decay * dh_last + dstate
  // decay, state, dstate: (B, D, N) in the scan state's dtype. in.h0 is ignored; dstate is the
  // state gradient that dout alone sends back to the slice's start. state may be undefined: the
  // decay alone (the step sizes summed, no recurrence).
  virtual void SelectiveScanStateMap(const ScanInputs& in, Tensor& decay, Tensor& state) = 0;
  virtual void SelectiveScanStateGrad(const ScanInputs& in, const Tensor& dout, Tensor& dstate) = 0;

  // Cross-entropy over rows of logits (M, V) against int32 targets; dlogits (optional, may alias
  // logits) is overwritten with grad_scale * d(sum of row losses)/dlogits.
  virtual kernels::CrossEntropyStats CrossEntropy(const Tensor& logits, const Tensor& targets,
                                                  int32_t ignore_index, double grad_scale,
                                                  Tensor& dlogits) = 0;
  // The same, with the statistics added to a running total on the device instead of returned, so
  // that a loop over row chunks waits for the device once: TakeCrossEntropyStats returns the
  // total of the calls since the last take (added in call order: deterministic) and resets it.
  virtual void AccumulateCrossEntropy(const Tensor& logits, const Tensor& targets,
                                      int32_t ignore_index, double grad_scale, Tensor& dlogits) = 0;
  virtual kernels::CrossEntropyStats TakeCrossEntropyStats() = 0;

  // Column blocks of row-major matrices, to split fused projections: dst (M, n) = src[:, c0:c0+n]
  // and back.
  virtual void CopyColumns(const Tensor& src, int64_t col0, Tensor& dst) = 0;
  virtual void WriteColumns(const Tensor& src, Tensor& dst, int64_t col0) = 0;

  // Elementwise helpers.
  virtual void NegExp(const Tensor& x, Tensor& y) = 0;                         // y = -exp(x)
  virtual void AddProduct(const Tensor& a, const Tensor& b, Tensor& dst) = 0;  // dst += a * b
  virtual void Add(const Tensor& src, Tensor& dst) = 0;                        // dst += src
  virtual void Scale(Tensor& x, double s) = 0;
  // The sum of the squares of every element of every tensor, accumulated in double: one wait for
  // the device in all.
  virtual double SumSquares(const std::vector<Tensor>& xs) = 0;

  // One AdamW step (torch.optim.AdamW semantics, decoupled weight decay) on fp32/fp64 params, of
  // any size (a whole parameter arena in one op). param_bf16, when defined, receives the updated
  // param rounded to bf16 (nearest even) in the same pass.
  virtual void AdamW(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, Tensor& param_bf16,
                     const AdamWHyper& hyper) = 0;
};

// The CPU backend (float32 and float64 tensors).
std::unique_ptr<Backend> MakeCpuBackend();

#ifdef MAMBA_HAS_CUDA
// How the CUDA backend's GEMMs (LinearForward/LinearBackward) multiply.
enum class GemmPrecision {
  kFp32,  // exact fp32 (no tensor cores): the debugging and test mode; fp32 tensors only
  kTf32,  // TF32 tensor cores on the fp32 operands: about 1e-3 relative error; fp32 tensors only
  // mamba_ssm's AMP: bf16 operands (fp32 ones are rounded to bf16 first), fp32 accumulation,
  // outputs fp32 or bf16 as their tensors are; GemmOperandDType is bf16.
  kBf16,
};

struct CudaBackendOptions {
  int device = 0;
  GemmPrecision gemm_precision = GemmPrecision::kFp32;
};

// Number of visible CUDA devices; 0 when there is no driver or no device.
int CudaDeviceCount();

// The CUDA backend (float32 tensors, bfloat16 activations; see the dtypes above). Aborts when
// the device does not exist: check CudaDeviceCount() first.
std::unique_ptr<Backend> MakeCudaBackend(const CudaBackendOptions& options = {});

#endif

}  // namespace mamba
