"""The reference crate's per-vector tau (tau="vector-median" / "vector-mean", docs/math.md §Per-vector tau).

Against a float64 restatement of the crate's two functions (its sparse path: tau from the vector's own
finite entries, median or mean, floored at 1e-10 and then at eps; λ = E / (E + tau) with the Rayleigh
quotient over a CSR Laplacian), through every path that takes tau: the reference and the Triton λ
(per-vector tau tensor, forward and backward), taumode_attention, the model.
"""
import math

import pytest
import torch
from helpers import relative_error

from tauformer_kernels import (
    TAU_RULES,
    chain_laplacian,
    knn_laplacian,
    reference,
    taumode_attention,
    taumode_attention_from_lambda,
    taumode_lambda,
    vector_tau,
)

TAU_FLOOR = 1e-10


def crate_tau(x: list[float], rule: str) -> float:
    """The crate's select_tau_from_vector, restated in Python floats (float64)."""
    v = sorted(float(a) for a in x if math.isfinite(a))
    if not v:
        return TAU_FLOOR
    n = len(v)
    if rule == "vector-median":
        value = v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])
    else:
        value = sum(v) / n
    return max(value, TAU_FLOOR)


def crate_lambda(x: list[float], lap: list[list[float]], rule: str, eps: float) -> float:
    """The crate's taumode_bounded_csr with the per-vector tau (eps as the crate clamps it)."""
    eps = max(eps, 1e-12)
    f = len(x)
    numerator = sum(x[i] * sum(lap[i][j] * x[j] for j in range(f)) for i in range(f))
    denom = eps + sum(a * a for a in x)
    energy = max(numerator / denom, 0.0) if denom > eps else 0.0
    tau = max(crate_tau(x, rule), eps)
    return energy / (energy + tau)


def rms_normed(*shape, dtype=torch.float64):
    x = torch.randn(*shape, dtype=dtype)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))


@pytest.mark.parametrize("rule", TAU_RULES)
@pytest.mark.parametrize("f", [7, 8, 16, 33])
def test_tau_matches_the_crate_on_random_vectors(rule, f):
    x = torch.randn(40, f, dtype=torch.float64) + 0.3  # a positive shift, so most taus are above the floor
    got = vector_tau(x, rule, eps=0.0)
    want = torch.tensor([crate_tau(row.tolist(), rule) for row in x], dtype=torch.float64)
    assert (want > TAU_FLOOR).any() and torch.allclose(got, want, rtol=1e-12, atol=0)
    # float32 x: tau in float32, the same to rounding
    assert relative_error(vector_tau(x.float(), rule, eps=0.0), want) < 1e-6


@pytest.mark.parametrize("rule", TAU_RULES)
def test_tau_edge_cases(rule):
    nan, inf = float("nan"), float("inf")
    rows = [
        [-3.0, -1.0, -2.0, -0.5],  # all negative: the floor
        [-3.0, -1.0, -2.0],  # odd length, all negative
        [1.0, nan, 3.0, 2.0],  # NaN entries are left out: median of 3 finite
        [nan, 4.0, -inf, 2.0],  # inf too: 2 finite
        [nan, nan, nan, nan],  # nothing finite: the floor
        [5.0, 1.0, 4.0, 2.0],  # even length: mean of the two middle ones
        [0.0, 0.0, 0.0, 0.0],  # zero vector
        [2.0, 2.0, 1.0, 2.0],  # ties
    ]
    want = [crate_tau(r, rule) for r in rows]
    assert [vector_tau(torch.tensor(r, dtype=torch.float64), rule, eps=0.0).item() for r in rows] == want
    # then the eps floor (the crate's tau.max(eps)); a batch of the even rows at once
    even = [r for r in rows if len(r) == 4]
    got = vector_tau(torch.tensor(even, dtype=torch.float64), rule, eps=1e-6)
    assert got.tolist() == [max(crate_tau(r, rule), 1e-6) for r in even]
    if rule == "vector-median":
        assert want[:6] == [TAU_FLOOR, TAU_FLOOR, 2.0, 3.0, TAU_FLOOR, 3.0]


@pytest.mark.parametrize("rule", TAU_RULES)
@pytest.mark.parametrize("f", [8, 9])
def test_lambda_matches_the_crate(rule, f):
    lap = knn_laplacian(torch.randn(60, f), k=3, dtype=torch.float64)
    x = torch.randn(2, 3, 5, f, dtype=torch.float64) + 0.2
    x[0, 0, 0] = -x[0, 0, 0].abs()  # an all-negative vector: tau at the floor, λ → 1
    lam = taumode_lambda(x, lap, tau=rule, eps=1e-6, backend="reference")
    want = torch.tensor([crate_lambda(v.tolist(), lap.tolist(), rule, 1e-6) for v in x.reshape(-1, f)],
                        dtype=torch.float64).reshape(lam.shape)
    assert torch.allclose(lam, want, rtol=1e-10, atol=1e-13)
    assert lam[0, 0, 0] > 0.999


@pytest.mark.parametrize("rule", TAU_RULES)
def test_gradcheck(rule):
    """The gradient flows through the tau rule to x (the middle entries of the median, every entry of the
    mean); random inputs have no ties, so the median is differentiable there."""
    lap = chain_laplacian(6, dtype=torch.float64)
    x = (torch.randn(1, 2, 3, 6, dtype=torch.float64) + 1.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: taumode_lambda(t, lap, tau=rule, backend="reference"), (x,))
    assert torch.autograd.gradcheck(lambda t: vector_tau(t, rule, 1e-6), (x,))


def test_median_gradient_picks_the_middle_entries():
    x = torch.tensor([4.0, 1.0, 3.0, 2.0], dtype=torch.float64, requires_grad=True)
    vector_tau(x, "vector-median", 1e-6).backward()
    assert x.grad.tolist() == [0.0, 0.0, 0.5, 0.5]  # the middle two of 1, 2, 3, 4
    y = torch.tensor([-4.0, -1.0, -3.0], dtype=torch.float64, requires_grad=True)
    vector_tau(y, "vector-median", 1e-6).backward()
    assert y.grad.tolist() == [0.0, 0.0, 0.0]  # at the floor


def test_bad_rule_and_bad_shape_name_tau():
    x = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="tau rule"):
        taumode_lambda(x, chain_laplacian(4), tau="vector-max")
    with pytest.raises(ValueError, match="tau"):
        taumode_lambda(x, chain_laplacian(4), tau=torch.ones(1, 2, 4))  # neither per head nor per vector


def test_rms_normed_heads_often_hit_the_floor():
    """What the rule does to λ (docs/math.md §Per-vector tau): with the weightless RMS norm the entries
    centre on 0, so about half the vectors have a median <= 0, tau = eps and λ ≈ 1."""
    x = rms_normed(4096, 64)
    tau = vector_tau(x, "vector-median", 1e-6)
    floored = (tau == 1e-6).double().mean().item()
    assert 0.45 < floored < 0.55
    lam = taumode_lambda(x, chain_laplacian(64, dtype=torch.float64), tau="vector-median")
    assert ((lam > 0.999).double().mean().item()) > 0.45


@pytest.mark.parametrize("rule", TAU_RULES)
def test_attention_with_the_rule_is_attention_from_its_lambdas(rule):
    """tau=rule in taumode_attention: λq, λk each from its own vectors' taus; GQA, odd lengths, T = 1."""
    lap = chain_laplacian(8, dtype=torch.float64)
    for tq, tk in ((7, 7), (1, 5)):
        q = torch.randn(2, 4, tq, 8, dtype=torch.float64)
        k, v = torch.randn(2, 2, tk, 8, dtype=torch.float64), torch.randn(2, 2, tk, 5, dtype=torch.float64)
        out = taumode_attention(q, k, v, lap, tau=rule, temperature=1e-3, backend="reference")
        lq = reference.lambda_naive(q, lap, vector_tau(q, rule, 1e-6), 1e-6)
        lk = reference.lambda_naive(k, lap, vector_tau(k, rule, 1e-6), 1e-6)
        want = reference.attention_naive(lq, lk, v, torch.full((4,), 1e-3, dtype=torch.float64))
        assert relative_error(out, want) < 1e-12
        packed = taumode_attention_from_lambda(lq, lk, v, temperature=1e-3, backend="reference")
        assert relative_error(packed, want) < 1e-12


def test_model_with_the_crate_rule_trains_and_decodes():
    from tauformer_model.config import TauGPTConfig
    from tauformer_model.model import TauGPT

    torch.manual_seed(0)
    model = TauGPT(TauGPTConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, block_size=16, vocab_size=40,
                                tau_rule="vector-median"))
    idx = torch.randint(0, 40, (2, 12))
    loss = model(idx, targets=idx)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="tau_rule"):
        TauGPTConfig(tau_rule="median")


# ----------------------------------------------------------------------------------------------------
# Triton: the per-vector tau tensor through the λ kernels (TRITON_INTERPRET=1 on CPU)
# ----------------------------------------------------------------------------------------------------

triton_cases = pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="triton is not installed")


@triton_cases
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("t", [1, 19])
@pytest.mark.parametrize("f", [16, 96])
def test_triton_per_vector_tau(f, t, dtype):
    from tauformer_kernels.lambda_triton import lambda_fwd_triton
    from tauformer_kernels.lambda_triton_backward import lambda_bwd_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lap = knn_laplacian(torch.randn(80, f), k=4).to(device)
    x = (torch.randn(2, 3, t, f, device=device) + 0.2).to(dtype)
    tau = vector_tau(x, "vector-median", 1e-6).float()
    lam = lambda_fwd_triton(x, lap, tau, 1e-6, poison=True)
    want = reference.lambda_naive(x.double(), lap.double(), tau.double(), 1e-6)
    assert relative_error(lam, want) < 1e-5
    dlam = torch.randn_like(lam)
    dx, dtau = lambda_bwd_triton(dlam, x, lap, tau, 1e-6, poison=True)
    dx_ref, dtau_ref = reference.lambda_bwd_reference(dlam.double(), x.double(), lap.double(), tau.double(), 1e-6)
    # fp16 x: the backward's products round L_sym to tf32 (2^-11), as test_lambda_triton_backward states
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert dtau.shape == tau.shape and relative_error(dtau, dtau_ref) < tol
    assert relative_error(dx, dx_ref) < tol


@triton_cases
def test_triton_rule_end_to_end_gradient():
    """tau="vector-median" on the Triton backend: λ and dx (through the kernel and the rule) as the reference."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lap = chain_laplacian(32).to(device)
    x = (torch.randn(1, 2, 9, 32, device=device) + 0.1).requires_grad_()
    grads = {}
    for backend in ("reference", "triton"):
        lam = taumode_lambda(x, lap, tau="vector-median", backend=backend)
        (grads[backend],) = torch.autograd.grad((lam * torch.arange(lam.numel(), device=device).view_as(lam)).sum(), x)
    assert relative_error(grads["triton"], grads["reference"]) < 1e-5
