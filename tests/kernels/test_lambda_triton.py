"""The Triton λ projection forward against the float64 oracle (docs/math.md §The λ projection).

Under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py), bf16 on a GPU only. The Laplacians are random
PSD matrices (not only the chain), F from 1 to 384 (padded to powers of two inside), tau per head.
λ is fp32 from any input dtype; x·L runs as tf32x3 for fp32 x and as two fp16/bf16 products (L = hi + lo)
for half-precision x, so λ keeps ~1e-6 relative accuracy against the float64 oracle on the same rounded x.
"""

import pytest
import torch

pytest.importorskip("triton")

from helpers import relative_error  # noqa: E402

from tauformer_kernels import chain_laplacian, reference  # noqa: E402
from tauformer_kernels.lambda_triton import lambda_fwd_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# fp32: tf32x3 products; fp16: exact x times L to ~22 bits; bf16: L to ~16 bits
TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-4}


def random_laplacian(f):
    """A dense symmetric PSD matrix with zero row sums, like an arrowspace Laplacian: D − W, W >= 0."""
    w = torch.rand(f, f, device=DEVICE)
    w = (w + w.T) / 2 * (torch.rand(f, f, device=DEVICE) < 0.3)
    w.fill_diagonal_(0)
    return torch.diag(w.sum(1)) - w


def check(x, laplacian, tau, eps=1e-6):
    lam = lambda_fwd_triton(x, laplacian, tau, eps, poison=True)
    assert lam.dtype == torch.float32 and lam.shape == x.shape[:-1]
    assert not lam.isnan().any()
    ref = reference.lambda_naive(x.double(), laplacian.double(), tau.double(), eps)
    assert relative_error(lam, ref) < TOL[x.dtype]
    assert (lam >= 0).all() and (lam < 1).all()
    return lam


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("f", [64, 32, 48, 1])
@pytest.mark.parametrize("t", [1, 17, 257])
def test_matches_oracle(t, f, dtype):
    x = torch.randn(2, 3, t, f, device=DEVICE).to(dtype)
    tau = torch.rand(3, device=DEVICE) + 0.05
    check(x, random_laplacian(f), tau)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wide_heads_f384(dtype):
    """The reference system's head size: L is 384×384, tiled over column and contraction chunks."""
    x = torch.randn(1, 2, 40, 384, device=DEVICE).to(dtype)
    check(x, random_laplacian(384), torch.tensor([0.5, 2.0], device=DEVICE))


def test_chain_laplacian_non_contiguous_and_zero_vectors():
    """Strided x (a transposed (B, T, H, F) tensor) and all-zero vectors (λ = 0, no NaN: eps guards)."""
    x = torch.randn(2, 33, 4, 64, device=DEVICE).transpose(1, 2)
    x[:, :, 5] = 0
    assert not x.is_contiguous()
    lam = check(x, chain_laplacian(64).to(DEVICE), torch.full((4,), 0.3, device=DEVICE))
    assert (lam[:, :, 5] == 0).all()


def test_clamp_of_negative_energy():
    """A Laplacian with a negative direction (not PSD): E is clamped at 0, as in the oracle."""
    x = torch.randn(1, 1, 20, 16, device=DEVICE)
    check(x, -torch.eye(16, device=DEVICE), torch.ones(1, device=DEVICE))
