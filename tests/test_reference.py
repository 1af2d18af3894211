"""The two references against each other, against a hand computation, and under gradcheck (float64)."""
import math

import pytest
import torch

from helpers import per_head, random_heads, random_lambdas, relative_error
from tauformer_kernels import chain_laplacian, reference, taumode_attention, taumode_attention_from_lambda, taumode_lambda


def test_hand_computed_three_tokens():
    lq = torch.tensor([[[0.1, 0.5, 0.9]]], dtype=torch.float64)
    lk = torch.tensor([[[0.2, 0.4, 0.8]]], dtype=torch.float64)
    v = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).view(1, 1, 3, 1)
    w1 = [math.exp(-0.3), math.exp(-0.1)]
    w2 = [math.exp(-0.7), math.exp(-0.5), math.exp(-0.1)]
    expected = torch.tensor([1.0, (w1[0] + 2 * w1[1]) / sum(w1), (w2[0] + 2 * w2[1] + 3 * w2[2]) / sum(w2)], dtype=torch.float64)
    for out in (
        reference.attention_naive(lq, lk, v, per_head(1.0, 1)),
        reference.attention_fwd_chunked(lq, lk, v, per_head(1.0, 1), None, True)[0],
        taumode_attention_from_lambda(lq, lk, v, temperature=1.0),
    ):
        torch.testing.assert_close(out.view(3), expected, rtol=1e-14, atol=0)


def test_hand_computed_lambda():
    x = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    lap = chain_laplacian(3, dtype=torch.float64)  # xᵀLx = Σ_edges (x_i − x_j)² = 1 + 1 = 2; xᵀx = 2
    energy = 2.0 / (2.0 + 1e-6)
    assert taumode_lambda(x.view(1, 1, 1, 3), lap, tau=0.5).item() == pytest.approx(energy / (energy + 0.5), rel=1e-14)


@pytest.mark.parametrize("tq,tk", [(1, 1), (37, 37), (13, 50), (300, 300)])
@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("alibi", [False, True])
def test_chunked_matches_naive(tq, tk, is_causal, alibi, monkeypatch):
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 4096)  # force many chunks at these small sizes
    b, h, hkv, dv = 2, 8, 2, 24
    lq, lk = random_lambdas(b, h, hkv, tq, tk)
    v = torch.randn(b, hkv, tk, dv, dtype=torch.float64)
    temp = torch.rand(h, dtype=torch.float64) * 0.2 + 1e-3
    slopes = torch.rand(b, h, dtype=torch.float64) if alibi else None
    ref = reference.attention_naive(lq, lk, v, temp, slopes, is_causal)
    out, lse = reference.attention_fwd_chunked(lq, lk, v, temp, slopes, is_causal)
    assert relative_error(out, ref) < 1e-12
    # backward: chunked against autograd through the oracle
    dout = torch.randn_like(ref)
    leaves = [t.clone().requires_grad_() for t in (lq, lk, v, temp)] + ([slopes.clone().requires_grad_()] if alibi else [])
    ref_out = reference.attention_naive(*leaves[:4], leaves[4] if alibi else None, is_causal)
    grads_ref = torch.autograd.grad(ref_out, leaves, dout)
    grads = reference.attention_bwd_chunked(dout, lq, lk, v, out, lse, temp, slopes, is_causal)
    # a row with one visible key has zero λ/temperature gradients; rounding there is measured against
    # each gradient's natural scale (1/T for λ, 1/T² for the temperature)
    inv_t = 1.0 / temp.min().item()
    floors = {"lq": inv_t, "lk": inv_t, "v": 1.0, "temperature": inv_t**2, "slopes": 1.0}
    for name, g, gr in zip(floors, grads, grads_ref):
        assert relative_error(g, gr, floor=floors[name]) < 1e-12, name


def test_lambda_reference_matches_naive_and_its_gradient():
    x = torch.randn(2, 3, 11, 16, dtype=torch.float64)
    lap = chain_laplacian(16, dtype=torch.float64) + 0.1 * torch.randn(16, 16, dtype=torch.float64)  # non-symmetric: tests L_sym
    tau = torch.rand(3, dtype=torch.float64) + 0.1
    assert relative_error(reference.lambda_fwd_reference(x, lap, tau, 1e-6), reference.lambda_naive(x, lap, tau)) < 1e-14
    leaves = [t.clone().requires_grad_() for t in (x, lap, tau)]
    lam = reference.lambda_naive(leaves[0], leaves[1], leaves[2])
    dlam = torch.randn_like(lam)
    gx, glap, gtau = torch.autograd.grad(lam, leaves, dlam)
    dx, dtau = reference.lambda_bwd_reference(dlam, x, lap, tau, 1e-6)
    assert relative_error(dx, gx) < 1e-12
    assert relative_error(dtau, gtau) < 1e-12
    assert relative_error(reference.lambda_laplacian_grad(dlam, x, lap, tau, 1e-6), glap) < 1e-12


def test_gradcheck_taumode_attention_all_inputs():
    """gradcheck through the public op (chunked forward and backward): q, k, v, tau, temperature, slopes, L."""
    q, k, v = random_heads(1, 4, 2, 5, 7, 6, 3)
    lap = chain_laplacian(6, dtype=torch.float64)
    tau = torch.rand(2, dtype=torch.float64) + 0.5
    temp = torch.rand(4, dtype=torch.float64) * 0.5 + 0.05
    slopes = torch.rand(1, 4, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (q, k, v, lap, tau, temp, slopes)]

    def fn(q, k, v, lap, tau, temp, slopes):
        return taumode_attention(q, k, v, lap, tau=tau, temperature=temp, alibi_slopes=slopes, backend="reference")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("is_causal", [True, False])
def test_gradcheck_from_lambda(is_causal):
    lq, lk = random_lambdas(2, 4, 4, 6, 9)
    v = torch.randn(2, 4, 9, 5, dtype=torch.float64)
    temp = torch.rand(4, dtype=torch.float64) + 0.05
    inputs = [t.requires_grad_() for t in (lq, lk, v, temp)]
    fn = lambda lq, lk, v, t: taumode_attention_from_lambda(lq, lk, v, temperature=t, is_causal=is_causal)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8)


def test_gradcheck_lambda_with_laplacian():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    lap = chain_laplacian(5, dtype=torch.float64).requires_grad_()
    tau = (torch.rand(3, dtype=torch.float64) + 0.2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, l, t: taumode_lambda(x, l, tau=t), (x, lap, tau), eps=1e-6, atol=1e-8)
