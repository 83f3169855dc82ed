#include "profiling/traffic_model.h"

namespace mamba::profiling {

Traffic& Traffic::operator+=(const Traffic& o) {
  read_bytes += o.read_bytes;
  write_bytes += o.write_bytes;
  flops += o.flops;
  special += o.special;
  return *this;
}

Traffic GemmForward(int64_t M, int64_t N, int64_t K, int x_bytes, int w_bytes, int y_bytes) {
  Traffic t;
  t.read_bytes = double(M) * K * x_bytes + double(N) * K * w_bytes;
  t.write_bytes = double(M) * N * y_bytes;
  t.flops = 2.0 * M * N * K;
  return t;
}

Traffic GemmBackward(int64_t M, int64_t N, int64_t K, int act_bytes, int w_bytes) {
  Traffic t;
  // dx = dy w: dy (M, N), w (N, K) in, dx (M, K) out. dw += dy^T x: dy, x (M, K) in, dw (N, K)
  // fp32 in and out.
  t.read_bytes = 2.0 * M * N * act_bytes + double(N) * K * w_bytes + double(M) * K * act_bytes +
                 double(N) * K * 4;
  t.write_bytes = double(M) * K * act_bytes + double(N) * K * 4;
  t.flops = 4.0 * M * N * K;
  return t;
}

namespace {

// The scan's parameters: A (D, N), D_skip, dt_bias (D), fp32.
double ScanParameterBytes(const ScanShape& s) { return 4.0 * (s.dim * s.dstate + 2 * s.dim); }

}  // namespace

Traffic ScanForward(const ScanShape& s, int act_bytes) {
  const double bld = double(s.batch) * s.len * s.dim,
               blgn = double(s.batch) * s.len * s.groups * s.dstate;
  Traffic t;
  t.read_bytes = (3 * bld + 2 * blgn) * act_bytes + ScanParameterBytes(s);
  t.write_bytes = bld * act_bytes;
  t.flops = bld * (6.0 * s.dstate + 10);
  t.special = bld * s.dstate;
  return t;
}

Traffic ScanBackward(const ScanShape& s, int act_bytes) {
  const double bld = double(s.batch) * s.len * s.dim,
               blgn = double(s.batch) * s.len * s.groups * s.dstate;
  Traffic t;
  t.read_bytes = (4 * bld + 2 * blgn) * act_bytes + ScanParameterBytes(s);
  t.write_bytes = (3 * bld + 2 * blgn) * act_bytes + ScanParameterBytes(s);  // and their grads
  t.flops = bld * (16.0 * s.dstate + 30);
  t.special = 2 * bld * s.dstate;
  return t;
}

double ScanForwardSramBytes(const ScanShape& s) {
  return s.dstate == 16 ? 224.0 * s.batch * s.len * s.dim : 0;
}

double ScanBackwardSramBytes(const ScanShape& s) {
  return s.dstate == 16 ? 576.0 * s.batch * s.len * s.dim : 0;
}

Traffic Conv1dForward(int64_t B, int64_t L, int64_t C, int64_t K, int act_bytes) {
  const double n = double(B) * L * C;
  Traffic t;
  t.read_bytes = n * act_bytes + 4.0 * C * (K + 1);
  t.write_bytes = n * act_bytes;
  t.flops = n * (2.0 * K + 4);
  t.special = n;  // the SiLU's exponential
  return t;
}

Traffic AddRmsNormForward(int64_t rows, int64_t dim, int act_bytes) {
  const double n = double(rows) * dim;
  Traffic t;
  t.read_bytes = n * 4 + n * act_bytes + 4.0 * dim;
  t.write_bytes = n * 4 + n * act_bytes + 4.0 * rows;
  t.flops = 5 * n;
  t.special = double(rows);  // one reciprocal square root a row
  return t;
}

}  // namespace mamba::profiling
