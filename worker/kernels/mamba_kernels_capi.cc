// The C ABI of libmamba_kernels.so: argument validation (a clear message, never a crash) in
// front of the CUDA launchers.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "worker/kernels/mamba_kernels.h"
#include "worker/kernels/selective_scan_cuda.h"

namespace {

using mamba::kernels::cuda::DType;
using mamba::kernels::cuda::ScanProblem;
using mamba::kernels::cuda::Strided3;
using mamba::kernels::cuda::Strided4;

thread_local std::string g_error;

int Fail(int code, std::string message) {
  g_error = std::move(message);
  return code;
}

Strided3 S3(const mamba_tensor3& t) { return {t.data, t.stride_b, t.stride_l, t.stride_d}; }
Strided4 S4(const mamba_tensor4& t) {
  return {t.data, t.stride_b, t.stride_l, t.stride_g, t.stride_n};
}

// Returns an empty string when the forward arguments are valid, else what is wrong.
std::string CheckForward(const mamba_scan_fwd_args& a, bool need_out) {
  if (a.batch < 1) return "batch must be >= 1";
  if (a.len < 1) return "len must be >= 1";
  if (a.dim < 1) return "dim must be >= 1";
  if (a.dstate < 1 || a.dstate > 256) return "dstate must be in [1, 256]";
  if (a.groups < 1 || a.dim % a.groups != 0) return "groups must be >= 1 and divide dim";
  if (a.dtype != MAMBA_DTYPE_F32 && a.dtype != MAMBA_DTYPE_BF16) return "dtype must be F32 or BF16";
  if (a.batch * a.len * a.dim > (int64_t{1} << 40)) return "batch * len * dim is too large";
  if (!a.u.data) return "u is required";
  if (!a.delta.data) return "delta is required";
  if (!a.Bm.data) return "Bm is required";
  if (!a.Cm.data) return "Cm is required";
  if (!a.A) return "A is required";
  if (need_out && !a.out.data) return "out is required";
  return "";
}

cudaStream_t Stream(void* s) { return static_cast<cudaStream_t>(s); }

ScanProblem Problem(const mamba_scan_fwd_args& a) {
  ScanProblem p;
  p.batch = a.batch;
  p.len = a.len;
  p.dim = a.dim;
  p.dstate = a.dstate;
  p.groups = a.groups;
  p.dtype = a.dtype == MAMBA_DTYPE_F32 ? DType::kF32 : DType::kBF16;
  p.softplus = a.delta_softplus != 0;
  p.u = S3(a.u);
  p.delta = S3(a.delta);
  p.z = S3(a.z);
  p.Bm = S4(a.Bm);
  p.Cm = S4(a.Cm);
  p.A = a.A;
  p.D_skip = a.D_skip;
  p.dt_bias = a.dt_bias;
  p.h0 = a.h0;
  p.out = S3(a.out);
  p.h_last = a.h_last;
  return p;
}

int FromCuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return MAMBA_OK;
  return Fail(MAMBA_ERR_CUDA, std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace

extern "C" {

int mamba_scan_fwd(const mamba_scan_fwd_args* args, void* stream) {
  if (!args) return Fail(MAMBA_ERR_INVALID_ARGUMENT, "mamba_scan_fwd: args is NULL");
  if (std::string e = CheckForward(*args, true); !e.empty()) {
    return Fail(MAMBA_ERR_INVALID_ARGUMENT, "mamba_scan_fwd: " + e);
  }
  return FromCuda(mamba::kernels::cuda::LaunchScanForward(Problem(*args), Stream(stream)),
                  "mamba_scan_fwd");
}

int mamba_scan_bwd(const mamba_scan_bwd_args* args, void* stream) {
  if (!args) return Fail(MAMBA_ERR_INVALID_ARGUMENT, "mamba_scan_bwd: args is NULL");
  if (std::string e = CheckForward(args->fwd, false); !e.empty()) {
    return Fail(MAMBA_ERR_INVALID_ARGUMENT, "mamba_scan_bwd: " + e);
  }
  const auto bad = [](const char* what) {
    return Fail(MAMBA_ERR_INVALID_ARGUMENT, std::string("mamba_scan_bwd: ") + what);
  };
  if (!args->dout.data) return bad("dout is required");
  if (!args->du.data) return bad("du is required");
  if (!args->ddelta.data) return bad("ddelta is required");
  if (!args->dBm.data) return bad("dBm is required");
  if (!args->dCm.data) return bad("dCm is required");
  if (!args->dA) return bad("dA is required");
  if (args->dz.data && !args->fwd.z.data) return bad("dz given without z");
  if (args->dD_skip && !args->fwd.D_skip) return bad("dD_skip given without D_skip");
  ScanProblem p = Problem(args->fwd);
  p.dout = S3(args->dout);
  p.dh_last = args->dh_last;
  p.du = S3(args->du);
  p.ddelta = S3(args->ddelta);
  p.dz = S3(args->dz);
  p.dBm = S4(args->dBm);
  p.dCm = S4(args->dCm);
  p.dA = args->dA;
  p.dD_skip = args->dD_skip;
  p.ddt_bias = args->ddt_bias;
  p.dh0 = args->dh0;
  return FromCuda(mamba::kernels::cuda::LaunchScanBackward(p, Stream(stream)), "mamba_scan_bwd");
}

const char* mamba_last_error(void) { return g_error.c_str(); }

int mamba_abi_version(void) { return 1; }

}  // extern "C"
