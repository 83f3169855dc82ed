/* Stable C ABI of the CUDA selective scan (libmamba_kernels.so). Plain C, so that ctypes, C and
 * C++ callers (and mamba_ssm users) can call it without building against anything.
 *
 * Math: the contract in DESIGN.md, "The selective scan". Logical shapes:
 *   u, delta, z, out, dout, du, ddelta, dz: (B, L, D)      Bm, Cm, dBm, dCm: (B, L, G, N)
 *   A, dA: (D, N) fp32 contiguous    D_skip, dt_bias, dD_skip, ddt_bias: (D) fp32 contiguous
 *   h0, h_last, dh0, dh_last: (B, D, N) fp32 contiguous
 * Activation tensors are given with element strides in the logical dimension order above, so
 * any layout works; the fast layout is channel-contiguous (stride_d == 1 for (B, L, D) tensors,
 * stride_n == 1 for Bm/Cm), as the GEMMs around the scan produce it. mamba_ssm's layout
 * (B, D, L) is accepted through strides, and is slower (uncoalesced). All activation tensors of
 * one call share one dtype (fp32 or bf16); the state and all math are fp32. Channel d belongs to
 * group d / (D / G); G must divide D. 1 <= N <= 256, L >= 1, B >= 1, D >= 1.
 *
 * Pointers are device pointers. Optional ones may be NULL: z, D_skip, dt_bias, h0, h_last
 * (forward); dh_last, dz, dD_skip, ddt_bias, dh0 (backward). Work is enqueued on `stream`;
 * scratch comes from the stream-ordered allocator (cudaMallocAsync). The backward is
 * deterministic: no floating-point atomics; the same inputs give the same bits.
 *
 * Every function returns 0 on success, or an error code; mamba_last_error() then returns a
 * message for this thread naming the argument and the rule. */
#ifndef MAMBA_KERNELS_H_
#define MAMBA_KERNELS_H_

#include <stdint.h>

#if defined(__GNUC__)
#define MAMBA_API __attribute__((visibility("default")))
#else
#define MAMBA_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

enum {
  MAMBA_OK = 0,
  MAMBA_ERR_INVALID_ARGUMENT = 1,
  MAMBA_ERR_CUDA = 2,
};

enum { MAMBA_DTYPE_F32 = 0, MAMBA_DTYPE_BF16 = 1 };

/* A (B, L, D) tensor: element strides for b, l, d. */
typedef struct {
  void* data;
  int64_t stride_b, stride_l, stride_d;
} mamba_tensor3;

/* A (B, L, G, N) tensor: element strides for b, l, g, n. */
typedef struct {
  void* data;
  int64_t stride_b, stride_l, stride_g, stride_n;
} mamba_tensor4;

typedef struct {
  int64_t batch, len, dim, dstate, groups;
  int32_t dtype;          /* MAMBA_DTYPE_* of every activation tensor */
  int32_t delta_softplus; /* nonzero: delta <- softplus(delta + dt_bias) */
  mamba_tensor3 u, delta, z;
  mamba_tensor4 Bm, Cm;
  const float* A;
  const float* D_skip;
  const float* dt_bias;
  const float* h0;
  mamba_tensor3 out; /* forward output; ignored by the backward */
  float* h_last;
} mamba_scan_fwd_args;

typedef struct {
  mamba_scan_fwd_args fwd; /* the forward's inputs */
  mamba_tensor3 dout;
  const float* dh_last;
  mamba_tensor3 du, ddelta, dz;
  mamba_tensor4 dBm, dCm;
  float* dA;
  float* dD_skip;
  float* ddt_bias;
  float* dh0;
} mamba_scan_bwd_args;

MAMBA_API int mamba_scan_fwd(const mamba_scan_fwd_args* args, void* cuda_stream);
MAMBA_API int mamba_scan_bwd(const mamba_scan_bwd_args* args, void* cuda_stream);
MAMBA_API const char* mamba_last_error(void);
/* ABI version, bumped on any change of the structs above. */
MAMBA_API int mamba_abi_version(void);

#ifdef __cplusplus
}
#endif

#endif /* MAMBA_KERNELS_H_ */
