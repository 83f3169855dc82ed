"""python/mamba_kernels.selective_scan_fn against a float64 PyTorch reference of the same math.

Run on a GPU machine: `python3 tests/gpu/test_mamba_kernels.py` (or under pytest), with
MAMBA_KERNELS_LIB pointing at libmamba_kernels.so when it is not in build/.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))
import mamba_kernels  # noqa: E402


def reference(u, delta, A, B, C, D, z, bias, softplus, h0):
    """The contract in DESIGN.md, in float64, mamba_ssm layouts; returns (out, h_last)."""
    batch, dim, length = u.shape
    groups = B.shape[1]
    rep = dim // groups
    Bx = B.repeat_interleave(rep, dim=1)  # (B, D, N, L)
    Cx = C.repeat_interleave(rep, dim=1)
    dt = delta + bias[None, :, None]
    if softplus:
        dt = torch.where(dt <= 20, torch.nn.functional.softplus(dt), dt)
    h = h0.clone()
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * Bx[..., t]
        ys.append((h * Cx[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1) + D[None, :, None] * u
    return y * torch.nn.functional.silu(z), h


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def run_case(batch, dim, length, nstate, groups, dtype, channel_last, seed):
    torch.manual_seed(seed)
    dev = "cuda"

    def act(lo, hi):
        if channel_last:  # (B, L, D) storage seen as (B, D, L)
            x = torch.empty(batch, length, dim, device=dev).uniform_(lo, hi).transpose(1, 2)
        else:
            x = torch.empty(batch, dim, length, device=dev).uniform_(lo, hi)
        return x.to(dtype)

    u, delta, z = act(-1, 1), act(-3, 0.5), act(-2, 2)
    B = torch.empty(batch, groups, nstate, length, device=dev).uniform_(-1, 1).to(dtype)
    C = torch.empty(batch, groups, nstate, length, device=dev).uniform_(-1, 1).to(dtype)
    if groups == 1:
        B, C = B[:, 0], C[:, 0]  # mamba_ssm's (B, N, L) form
    A = torch.empty(dim, nstate, device=dev).uniform_(-2, -0.1)
    D = torch.empty(dim, device=dev).uniform_(-1, 1)
    bias = torch.empty(dim, device=dev).uniform_(-1, 0)
    h0 = torch.empty(batch, dim, nstate, device=dev).uniform_(-1, 1)
    inputs = [u, delta, A, B, C, D, z, bias, h0]
    for x in inputs:
        x.requires_grad_(True)
    out, last = mamba_kernels.selective_scan_fn(u, delta, A, B, C, D, z, bias, True, True, h0)
    dout = torch.randn_like(out)
    dlast = torch.randn_like(last)
    grads = torch.autograd.grad((out, last), inputs, (dout, dlast))

    ref_in = [x.detach().double().requires_grad_(True) for x in inputs]
    r_u, r_delta, r_A, r_B, r_C, r_D, r_z, r_bias, r_h0 = ref_in
    rB = r_B if r_B.dim() == 4 else r_B[:, None]
    rC = r_C if r_C.dim() == 4 else r_C[:, None]
    r_out, r_last = reference(r_u, r_delta, r_A, rB, rC, r_D, r_z, r_bias, True, r_h0)
    r_grads = torch.autograd.grad((r_out, r_last), ref_in, (dout.double(), dlast.double()))

    f32 = dtype == torch.float32
    tol_out, tol_grad = (1e-5, 1e-4) if f32 else (1e-2, 1e-2)
    errors = {"out": (rel(out, r_out), tol_out), "h_last": (rel(last, r_last), tol_out)}
    for name, g, rg in zip(["du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddt_bias", "dh0"],
                           grads, r_grads):
        assert g.shape == rg.shape, (name, g.shape, rg.shape)
        errors[name] = (rel(g, rg), tol_grad)
    bad = {k: v for k, v in errors.items() if not (v[0] <= v[1])}
    label = "B=%d D=%d L=%d N=%d G=%d %s %s" % (batch, dim, length, nstate, groups,
                                                "fp32" if f32 else "bf16",
                                                "(B,L,D) storage" if channel_last else "(B,D,L)")
    worst = max(errors.items(), key=lambda kv: kv[1][0] / kv[1][1])
    print("%-45s worst %s rel err %.2e (tol %.0e) %s" % (label, worst[0], worst[1][0], worst[1][1],
                                                         "OK" if not bad else "FAIL %s" % bad))
    return not bad


def test_selective_scan_fn():
    ok = True
    ok &= run_case(2, 8, 200, 16, 1, torch.float32, False, 0)
    ok &= run_case(2, 8, 131, 16, 2, torch.float32, True, 1)
    ok &= run_case(1, 4, 70, 4, 1, torch.float32, False, 2)
    ok &= run_case(2, 8, 200, 16, 1, torch.bfloat16, True, 3)
    ok &= run_case(1, 6, 97, 32, 2, torch.bfloat16, False, 4)
    assert ok


def test_bad_arguments_raise():
    u = torch.zeros(1, 4, 8, device="cuda")
    A = torch.zeros(4, 300, device="cuda")  # N > 256
    B = torch.zeros(1, 300, 8, device="cuda")
    try:
        mamba_kernels.selective_scan_fn(u, u, A, B, B)
    except RuntimeError as e:
        assert "dstate" in str(e), e
        print("bad arguments raise:", e)
        return
    raise AssertionError("no error for N > 256")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device")
        sys.exit(0)
    test_selective_scan_fn()
    test_bad_arguments_raise()
    print("python tests passed")
