// The traffic model: for each kernel of a training step, from its shapes and dtypes, the bytes it
// must move through device memory (every input read once, every output written once: the floor a
// kernel can reach, as DESIGN.md's HBM floors) and the floating-point operations it must do. With
// a measured time these give achieved bandwidth, arithmetic intensity and the share of the
// roofline bound min(peak FLOP/s, intensity x bandwidth) (the profiling report).
//
//   Traffic t = ScanForward({8, 2048, 1536, 16, 1}, 2);   // bf16 activations
//   double floor_ms = t.bytes() / bandwidth * 1e3;
#pragma once

#include <cstdint>

namespace mamba::profiling {

struct Traffic {
  double read_bytes = 0, write_bytes = 0;
  double flops = 0;
  // Exponentials (and other special functions) the kernel evaluates: the scan's binding unit.
  double special = 0;
  double bytes() const { return read_bytes + write_bytes; }
  // FLOPs per byte of memory traffic.
  double intensity() const { return bytes() > 0 ? flops / bytes() : 0; }
  Traffic& operator+=(const Traffic& o);
};

struct ScanShape {
  int64_t batch = 0, len = 0, dim = 0, dstate = 0, groups = 1;
};

// y (M, N) = x (M, K) w (N, K)^T, operands of x_bytes / w_bytes / y_bytes per element.
Traffic GemmForward(int64_t M, int64_t N, int64_t K, int x_bytes, int w_bytes, int y_bytes);
// dx = dy w and dw += dy^T x (dw in fp32, read and written: it accumulates).
Traffic GemmBackward(int64_t M, int64_t N, int64_t K, int act_bytes, int w_bytes);

// The selective scan (DESIGN.md's contract) on activations of `act_bytes` (u, delta, z, Bm, Cm and
// out or their gradients; A, D_skip, dt_bias fp32). Forward reads u, delta, z, Bm, Cm, writes out:
// (4 B D L + 2 B G N L) elements; backward reads those and dout, writes du, ddelta, dz, dBm, dCm:
// (7 B D L + 4 B G N L) elements (DESIGN.md, "Numbers to beat"). FLOPs: forward 6 a (b, l, d, n)
// (the decay's argument, the state's two multiply-adds, the output's) and 10 a (b, l, d)
// (softplus, the skip, the gate); backward recomputes the forward and adds 10 a (b, l, d, n) and
// 20 a (b, l, d). One exponential a (b, l, d, n) forward, two backward.
Traffic ScanForward(const ScanShape& s, int act_bytes);
Traffic ScanBackward(const ScanShape& s, int act_bytes);

// Shared-memory bytes of the tiled scan kernels (N = 16: a block of 32 channels, 4 lanes a
// channel, 4 states a lane; tiles of steps staged in shared memory as fp32). Per (b, l, d),
// forward: u, delta and z staged (12 B) and B, C once per 32-channel block (4 B), read by the
// channel's 4 lanes (48 B) and B, C by each lane for its 4 states (128 B); the lanes' partial
// sums written and gathered (32 B): 224 B. Backward: twice the forward's staging and reads (it
// recomputes the forward) plus each lane's state history written and read (128 B): 576 B. Other N
// run the untiled kernels, which keep the state in registers: 0 (their small per-block scratch
// is left out).
double ScanForwardSramBytes(const ScanShape& s);
double ScanBackwardSramBytes(const ScanShape& s);

// Depthwise causal conv1d of K taps over (B, L, C) with bias and SiLU: reads x, writes y, reads
// the fp32 weight and bias; 2 K + 4 FLOPs an element (the taps, the bias, the SiLU).
Traffic Conv1dForward(int64_t B, int64_t L, int64_t C, int64_t K, int act_bytes);

// Fused residual add + RMSNorm over (rows, dim): reads the fp32 residual and x (act), the weight;
// writes the fp32 residual, y (act) and the fp32 rstd; 5 FLOPs an element.
Traffic AddRmsNormForward(int64_t rows, int64_t dim, int act_bytes);

}  // namespace mamba::profiling
