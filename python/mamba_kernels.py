"""ctypes bindings of libmamba_kernels.so: the fused CUDA selective scan for PyTorch users.

`selective_scan_fn` has mamba_ssm's signature (plus `h0`, the initial state) and layouts:
u, delta, z: (B, D, L); A: (D, N); B, C: (B, N, L) or (B, G, N, L); D, delta_bias: (D,).
Any strides work (they are passed through); the kernels are fastest when the channel dimension
is the contiguous one, e.g. `x.transpose(1, 2)` of a (B, L, D) tensor. Inputs are fp32 or bf16
(all activation tensors take u's dtype); A, D, delta_bias and the states are fp32.

The library is found through $MAMBA_KERNELS_LIB, else next to this file's repository build.
"""

import ctypes
import os

import torch

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


class _T3(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("stride_b", ctypes.c_int64),
                ("stride_l", ctypes.c_int64), ("stride_d", ctypes.c_int64)]


class _T4(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("stride_b", ctypes.c_int64),
                ("stride_l", ctypes.c_int64), ("stride_g", ctypes.c_int64),
                ("stride_n", ctypes.c_int64)]


_P = ctypes.c_void_p


class _FwdArgs(ctypes.Structure):
    _fields_ = [("batch", ctypes.c_int64), ("len", ctypes.c_int64), ("dim", ctypes.c_int64),
                ("dstate", ctypes.c_int64), ("groups", ctypes.c_int64),
                ("dtype", ctypes.c_int32), ("delta_softplus", ctypes.c_int32),
                ("u", _T3), ("delta", _T3), ("z", _T3), ("Bm", _T4), ("Cm", _T4),
                ("A", _P), ("D_skip", _P), ("dt_bias", _P), ("h0", _P),
                ("out", _T3), ("h_last", _P)]


class _BwdArgs(ctypes.Structure):
    _fields_ = [("fwd", _FwdArgs), ("dout", _T3), ("dh_last", _P),
                ("du", _T3), ("ddelta", _T3), ("dz", _T3), ("dBm", _T4), ("dCm", _T4),
                ("dA", _P), ("dD_skip", _P), ("ddt_bias", _P), ("dh0", _P)]


_lib = None


def _library():
    global _lib
    if _lib is None:
        path = os.environ.get("MAMBA_KERNELS_LIB")
        if not path:
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            path = os.path.join(root, "build", "libmamba_kernels.so")
        lib = ctypes.CDLL(path)
        lib.mamba_scan_fwd.argtypes = [ctypes.POINTER(_FwdArgs), ctypes.c_void_p]
        lib.mamba_scan_bwd.argtypes = [ctypes.POINTER(_BwdArgs), ctypes.c_void_p]
        lib.mamba_scan_fwd.restype = lib.mamba_scan_bwd.restype = ctypes.c_int
        lib.mamba_last_error.restype = ctypes.c_char_p
        _lib = lib
    return _lib


def _check(code):
    if code != 0:
        raise RuntimeError("mamba_kernels: " + _library().mamba_last_error().decode())


def _t3(x):
    """(B, D, L) tensor -> strides in (b, l, d) order."""
    if x is None:
        return _T3()
    return _T3(x.data_ptr(), x.stride(0), x.stride(2), x.stride(1))


def _t4(x):
    """(B, G, N, L) tensor -> strides in (b, l, g, n) order."""
    return _T4(x.data_ptr(), x.stride(0), x.stride(3), x.stride(1), x.stride(2))


def _ptr(x):
    return None if x is None else x.data_ptr()


def _f32(x):
    return None if x is None else x.detach().float().contiguous()


def _fwd_args(u, delta, A, Bm, Cm, D, z, delta_bias, softplus, h0):
    batch, dim, length = u.shape
    return _FwdArgs(batch, length, dim, A.shape[1], Bm.shape[1], _DTYPES[u.dtype], int(softplus),
                    _t3(u), _t3(delta), _t3(z), _t4(Bm), _t4(Cm), _ptr(A), _ptr(D),
                    _ptr(delta_bias), _ptr(h0), _T3(), None)


class SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, h0):
        if u.dtype not in _DTYPES:
            raise TypeError("u must be float32 or bfloat16, got %s" % u.dtype)
        dt = u.dtype
        delta = delta.to(dt)
        z = None if z is None else z.to(dt)
        squeeze_groups = B.dim() == 3
        Bm = (B.unsqueeze(1) if squeeze_groups else B).to(dt)
        Cm = (C.unsqueeze(1) if C.dim() == 3 else C).to(dt)
        A32, D32, bias32, h032 = _f32(A), _f32(D), _f32(delta_bias), _f32(h0)
        batch, dim, _ = u.shape
        out = torch.empty_like(u)
        h_last = torch.empty(batch, dim, A.shape[1], device=u.device, dtype=torch.float32)
        args = _fwd_args(u, delta, A32, Bm, Cm, D32, z, bias32, delta_softplus, h032)
        args.out = _t3(out)
        args.h_last = h_last.data_ptr()
        _check(_library().mamba_scan_fwd(ctypes.byref(args),
                                         torch.cuda.current_stream(u.device).cuda_stream))
        ctx.save_for_backward(u, delta, A32, Bm, Cm, D32, z, bias32, h032)
        ctx.softplus = delta_softplus
        ctx.squeeze_groups = squeeze_groups
        ctx.dtypes = (delta_bias.dtype if delta_bias is not None else None,
                      D.dtype if D is not None else None, A.dtype, B.dtype, C.dtype, delta.dtype)
        return (out, h_last) if return_last_state else out

    @staticmethod
    def backward(ctx, dout, *rest):
        u, delta, A, Bm, Cm, D, z, bias, h0 = ctx.saved_tensors
        dh_last = _f32(rest[0]) if rest and rest[0] is not None else None
        dout = dout.to(u.dtype)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = None if z is None else torch.empty_like(z)
        dBm, dCm = torch.empty_like(Bm), torch.empty_like(Cm)
        dA = torch.empty_like(A)
        dD = None if D is None else torch.empty_like(D)
        dbias = None if bias is None else torch.empty_like(bias)
        dh0 = None if h0 is None else torch.empty_like(h0)
        args = _BwdArgs()
        args.fwd = _fwd_args(u, delta, A, Bm, Cm, D, z, bias, ctx.softplus, h0)
        args.dout, args.dh_last = _t3(dout), _ptr(dh_last)
        args.du, args.ddelta, args.dz = _t3(du), _t3(ddelta), _t3(dz)
        args.dBm, args.dCm = _t4(dBm), _t4(dCm)
        args.dA, args.dD_skip, args.ddt_bias, args.dh0 = _ptr(dA), _ptr(dD), _ptr(dbias), _ptr(dh0)
        _check(_library().mamba_scan_bwd(ctypes.byref(args),
                                         torch.cuda.current_stream(u.device).cuda_stream))
        if ctx.squeeze_groups:
            dBm, dCm = dBm.squeeze(1), dCm.squeeze(1)
        bias_dt, D_dt, A_dt, B_dt, C_dt, delta_dt = ctx.dtypes
        return (du, ddelta.to(delta_dt), dA.to(A_dt), dBm.to(B_dt), dCm.to(C_dt),
                None if dD is None else dD.to(D_dt), dz,
                None if dbias is None else dbias.to(bias_dt), None, None, dh0)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, h0=None):
    """mamba_ssm's selective_scan_fn, plus h0 (B, D, N): the state before the first step."""
    return SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                 return_last_state, h0)
