"""The Triton λ-projection backward against the float64 oracle (autograd through reference.lambda_naive).

Runs under TRITON_INTERPRET=1 on CPU. Inputs are made in the test dtype and the oracle sees exactly those
values in float64. Outputs are poisoned with NaN first. Tolerances: fp32 1e-4, fp16 2e-2 (relative norms).
"""
import pytest
import torch
from helpers import relative_error

from tauformer_kernels import reference
from tauformer_kernels.laplacian import chain_laplacian

triton = pytest.importorskip("triton")
from tauformer_kernels.lambda_triton_backward import lambda_bwd_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-2}


def _laplacian(kind, f):
    if kind == "chain":
        return chain_laplacian(f).float()
    # a general matrix: not symmetric (L_sym matters) and not PSD (E_raw < 0 for some x: the clamp's zero gradient)
    a = torch.randn(f, f)
    return (a @ a.T / f + 0.5 * torch.randn(f, f)).float()


def _check(b, h, t, f, dtype, kind, eps=1e-6):
    x = torch.randn(b, h, t, f).to(dtype)
    lap = _laplacian(kind, f)
    tau = 0.5 + torch.rand(h)
    dlam = torch.randn(b, h, t)
    xd, taud = x.double().requires_grad_(True), tau.double().requires_grad_(True)
    lam = reference.lambda_naive(xd, lap.double(), taud, eps)
    want_dx, want_dtau = torch.autograd.grad(lam, [xd, taud], dlam.double())
    dx, dtau = lambda_bwd_triton(dlam.to(DEVICE), x.to(DEVICE), lap.to(DEVICE), tau.to(DEVICE), eps, poison=True)
    assert dx.dtype == dtype and dx.shape == x.shape and dtau.shape == (h,)
    assert torch.isfinite(dx).all() and torch.isfinite(dtau).all()
    assert relative_error(dx, want_dx) < TOL[dtype]
    assert relative_error(dtau, want_dtau) < TOL[dtype]
    return lam


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("t", [1, 17, 128, 257])
@pytest.mark.parametrize("f", [64, 32, 48])
def test_matches_oracle(dtype, t, f):
    _check(1, 2, t, f, dtype, "chain" if f == 64 else "general")


@pytest.mark.parametrize("f", [200, 512])
def test_large_heads(f):
    """F above one L_sym tile: the two-pass path (F = 384 is the reference system's head)."""
    _check(1, 2, 20, f, torch.float32, "general")


def test_clamp_active():
    """A non-PSD L gives E_raw < 0 for some vectors; there λ = 0 and the gradient is 0."""
    torch.manual_seed(1)
    lam = _check(2, 3, 40, 32, torch.float32, "general")
    assert (lam == 0).any()


def test_non_contiguous_x():
    b, h, t, f = 2, 3, 30, 64
    x = torch.randn(b, t, h, f, device=DEVICE).transpose(1, 2)  # (B, H, T, F) with strided heads
    lap, tau = chain_laplacian(f).float().to(DEVICE), 0.5 + torch.rand(h, device=DEVICE)
    dlam = torch.randn(b, h, t, device=DEVICE)
    dx, dtau = lambda_bwd_triton(dlam, x, lap, tau, 1e-6, poison=True)
    want_dx, want_dtau = reference.lambda_bwd_reference(dlam, x, lap, tau, 1e-6)
    assert relative_error(dx, want_dx) < 1e-5 and relative_error(dtau, want_dtau) < 1e-5
