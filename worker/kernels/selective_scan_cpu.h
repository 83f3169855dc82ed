// Selective scan, CPU reference (the contract in DESIGN.md, "The selective scan").
//
//   delta_t = softplus(delta_t + dt_bias)            (softplus(x) = x for x > 20)
//   h_t     = exp(delta_t * A) * h_{t-1} + delta_t * Bm_t * u_t,   h_{-1} = h0
//   y_t     = sum_n Cm_t[n] h_t[n] + D_skip * u_t
//   out_t   = y_t * silu(z_t)
//
// CPU layout is channel-contiguous, as the GEMMs around the scan produce it:
//   u, delta, z, out, du, ddelta, dz: (B, L, D)      Bm, Cm, dBm, dCm: (B, L, G, N)
//   A, dA: (D, N)     D_skip, dt_bias and their grads: (D)     h0, h_last, dh0, dh_last: (B, D, N)
// Channel d belongs to group g = d / (D / G). Optional pointers may be null (z, D_skip, dt_bias,
// h0, h_last, dh_last; gradient outputs of absent inputs are then ignored).
//
// Templated on the element type: float for the model, double for finite-difference tests. The
// backward is deterministic: a fixed partition of channels (independent of the thread count), and
// dBm/dCm partial sums added in a fixed order.
#pragma once

#include <cstdint>

namespace mamba::kernels {

struct ScanShape {
  int64_t batch = 0, len = 0, dim = 0, dstate = 0, groups = 1;
};

template <typename T>
struct ScanForwardArgs {
  const T* u = nullptr;
  const T* delta = nullptr;
  const T* A = nullptr;
  const T* Bm = nullptr;
  const T* Cm = nullptr;
  const T* D_skip = nullptr;
  const T* z = nullptr;
  const T* dt_bias = nullptr;
  const T* h0 = nullptr;
  bool delta_softplus = true;
  T* out = nullptr;
  T* h_last = nullptr;
};

template <typename T>
struct ScanBackwardArgs {
  ScanForwardArgs<T> fwd;  // the forward's inputs (its outputs are not needed)
  const T* dout = nullptr;
  const T* dh_last = nullptr;
  // Activation gradients are overwritten; parameter gradients (dA, dD_skip, ddt_bias) too.
  T* du = nullptr;
  T* ddelta = nullptr;
  T* dA = nullptr;
  T* dBm = nullptr;
  T* dCm = nullptr;
  T* dD_skip = nullptr;
  T* dz = nullptr;
  T* ddt_bias = nullptr;
  T* dh0 = nullptr;
};

template <typename T>
void SelectiveScanForwardCpu(const ScanShape& s, const ScanForwardArgs<T>& a);

template <typename T>
void SelectiveScanBackwardCpu(const ScanShape& s, const ScanBackwardArgs<T>& a);

// The affine maps of a slice of the sequence, for sequence parallelism (DESIGN.md, "Sequence
// parallelism"): per (b, d, n),
//   forward:  h_last = decay * h0 + state          decay = exp(A * sum_t delta_t) (after softplus),
//                                                  state = h_last from h0 = 0 (a.h0 is ignored)
//   backward: dh0 = decay * dh_last + dstate       dstate = dh0 from dh_last = 0 and dout
// so that ranks holding consecutive slices find their true h0 and dh_last by composing their
// neighbours' maps. Only the recurrence runs: no outputs, no D_skip (z enters dstate as the gate).
// state may be null: the decay alone, from the step sizes (the last slice's state reaches no one).
template <typename T>
void SelectiveScanStateMapCpu(const ScanShape& s, const ScanForwardArgs<T>& a, T* decay, T* state);
template <typename T>
void SelectiveScanStateGradCpu(const ScanShape& s, const ScanForwardArgs<T>& a, const T* dout,
                               T* dstate);

}  // namespace mamba::kernels
