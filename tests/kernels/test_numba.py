"""The numba CPU backend beyond the contract matrix (test_attention_contract.py runs its attention on every
case): the λ projection against the float64 oracle, the sorted attention at lengths where its Fenwick trees
are deep, NaN and infinite λ as the reference treats them, and the dense/sorted switch."""
import pytest
import torch
from helpers import relative_error

from tauformer_kernels import chain_laplacian, reference, taumode_attention, taumode_attention_from_lambda

numba_backend = pytest.importorskip("tauformer_kernels.attention_numba", reason="needs numba (the cpu extra)")

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def random_laplacian(f, dtype=torch.float32):
    """Symmetric PSD with zero row sums (D − W, W >= 0), as the builders make them."""
    w = torch.rand(f, f)
    w = (w + w.T) / 2 * (torch.rand(f, f) < 0.3)
    w.fill_diagonal_(0)
    return (torch.diag(w.sum(1)) - w).to(dtype)


def lambda_grads(x, laplacian, tau, backend):
    leaves = [x.detach().clone().requires_grad_(), tau.detach().clone().requires_grad_()]
    from tauformer_kernels import taumode_lambda

    lam = taumode_lambda(leaves[0], laplacian, tau=leaves[1], backend=backend)
    # drawn in float64 and rounded: the same gradient for both calls (draws of two dtypes differ)
    dlam = torch.randn(lam.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(lam.dtype)
    return (lam,) + torch.autograd.grad(lam, leaves, dlam)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("f", [1, 16, 48, 64])
@pytest.mark.parametrize("t", [1, 17])
@pytest.mark.parametrize("per_vector", [False, True], ids=["per-head", "per-vector"])
def test_lambda_matches_the_oracle(dtype, f, t, per_vector):
    x = torch.randn(2, 3, t, f).to(dtype)
    tau = torch.rand(2, 3, t) + 0.05 if per_vector else torch.rand(3) + 0.05
    tau = tau.double() if dtype == torch.float64 else tau
    lap = random_laplacian(f, torch.float64 if dtype == torch.float64 else torch.float32)
    got = lambda_grads(x, lap, tau, "numba")
    exact = lambda_grads(x.double(), lap.double(), tau.double(), "reference")
    assert got[0].dtype == reference.compute_dtype(x) and got[1].dtype == x.dtype and got[2].shape == tau.shape
    for name, g, e in zip(("λ", "dx", "dtau"), got, exact):
        # dx of a half-precision x is rounded to its dtype once
        tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(dtype, TOL[dtype]) if name == "dx" else TOL[dtype]
        assert relative_error(g, e, floor=1e-30) < tol, (name, relative_error(g, e))


def test_lambda_strided_zero_vectors_and_clamp():
    """A token-major view of x (as the model hands q over), all-zero vectors (λ = 0, no NaN) and a Laplacian
    with negative energies (the clamp at 0 passes no gradient), against the reference backend."""
    x = torch.randn(2, 9, 4, 8).transpose(1, 2)
    x[0, 1, 3] = 0.0
    lap = -random_laplacian(8)  # xᵀLx <= 0: every E clamped to 0
    tau = torch.rand(4) + 0.1
    for laplacian in (random_laplacian(8), lap):
        got = lambda_grads(x, laplacian, tau, "numba")
        want = lambda_grads(x, laplacian, tau, "reference")
        assert torch.isfinite(got[0]).all() and float(got[0][0, 1, 3].detach()) == 0.0
        for g, w in zip(got, want):
            assert relative_error(g, w, floor=1e-30) < 1e-6
    got = lambda_grads(x, lap, torch.ones(4), "numba")
    assert float(got[0].detach().abs().max()) == 0.0 and float(got[1].abs().max()) == 0.0


def test_sparse_laplacian_keeps_the_reference_path():
    """A sparse L is multiplied sparse (nnz per vector) by the reference; numba's loop would densify it."""
    x = torch.randn(1, 2, 5, 32)
    lap = chain_laplacian(32)
    dense = taumode_attention(x, x, x, lap, backend="numba")
    sparse = taumode_attention(x, x, x, lap.to_sparse_csr(), backend="numba")
    assert relative_error(sparse, dense) < 1e-6


@pytest.mark.parametrize("causal, alibi, hkv", [(True, False, 2), (True, True, 1), (False, False, 4)])
def test_sorted_attention_at_depth(causal, alibi, hkv):
    """700 and 1,100 keys: Fenwick trees ten levels deep, against the float64 oracle, forward and backward."""
    torch.manual_seed(0)
    tq, tk = (700, 700) if causal else (300, 1100)
    lq, lk = torch.rand(1, 4, tq), torch.rand(1, hkv, tk)
    v = torch.randn(1, hkv, tk, 24)
    temperature = torch.tensor([0.01, 0.05, 0.2, 1.0])
    slopes = torch.rand(4) * 0.05 if alibi else None
    leaves = [t.clone().requires_grad_() for t in (lq, lk, v, temperature)]
    sl = None if slopes is None else slopes.clone().requires_grad_()
    out = taumode_attention_from_lambda(*leaves[:3], temperature=leaves[3], is_causal=causal, alibi_slopes=sl,
                                        backend="numba")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves + ([sl] if sl is not None else []), dout)
    exact_leaves = [t.double().requires_grad_() for t in (lq, lk, v, temperature)]
    exact_slopes = None if slopes is None else slopes.double().expand(1, 4).requires_grad_()
    exact = reference.attention_naive(*exact_leaves, exact_slopes, causal)
    exact_grads = torch.autograd.grad(exact, exact_leaves + ([exact_slopes] if sl is not None else []), dout.double())
    assert relative_error(out, exact) < 1e-6
    for name, g, e in zip(("dlq", "dlk", "dv", "dT", "dslope"), grads, exact_grads):
        assert relative_error(g, e) < 1e-5, (name, relative_error(g, e))


def test_nan_and_infinite_lambda_as_the_reference():
    """A NaN λk poisons the rows that see it (causal: from its position on); a key at λ = ±inf has weight 0."""
    lq, lk, v = torch.rand(1, 2, 12), torch.rand(1, 2, 12), torch.randn(1, 2, 12, 4)
    temperature = torch.full((2,), 0.1)
    for dense in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(numba_backend, "DENSE_MAX_QUERIES", 1 << 30 if dense else 0)
            bad = lk.clone()
            bad[0, 0, 5] = float("inf")
            bad[0, 1, 7] = float("-inf")
            out, _ = numba_backend.attention_fwd_numba(lq, bad, v, temperature, None, True)
            want = reference.attention_naive(lq.double(), bad.double(), v.double(), temperature.double())
            assert relative_error(out, want) < 1e-6
            bad = lk.clone()
            bad[0, 0, 5] = float("nan")
            out, _ = numba_backend.attention_fwd_numba(lq, bad, v, temperature, None, True)
            want = reference.attention_fwd_chunked(lq, bad, v, temperature, None, True)[0]
            assert torch.isnan(out[0, 0]).any() and torch.isfinite(out[0, 1]).all()
            if dense:  # the dense loop poisons exactly the rows that see the key, as the reference does
                assert torch.equal(torch.isnan(out), torch.isnan(want))


def test_dense_and_sorted_forward_agree():
    """The two forward loops of the backend on the same calls (each is checked against the oracle in the
    contract test; here at a length where the sorted one is deep and the dense one is the decode loop)."""
    lq, lk, v = torch.rand(2, 4, 40), torch.rand(2, 2, 600), torch.randn(2, 2, 600, 16)
    temperature, slopes = torch.full((4,), 0.05), torch.rand(2, 4) * 0.01
    sorted_out = numba_backend.attention_fwd_numba(lq, lk, v, temperature, slopes, True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(numba_backend, "DENSE_MAX_QUERIES", 1 << 30)
        dense_out = numba_backend.attention_fwd_numba(lq, lk, v, temperature, slopes, True)
    assert relative_error(sorted_out[0], dense_out[0]) < 1e-6
    assert relative_error(sorted_out[1], dense_out[1]) < 1e-6


def test_auto_takes_numba_lambda_up_to_its_crossover(monkeypatch):
    """auto's λ backend on CPU: numba up to CPU_NUMBA_LAMBDA_MAX_FEATURES, the reference's GEMM beyond; an
    explicit backend="numba" keeps numba at any F."""
    from tauformer_kernels import backends, ops

    limit = backends.CPU_NUMBA_LAMBDA_MAX_FEATURES
    for f, want in ((limit, "numba"), (limit + 1, "reference")):
        x, lap = torch.randn(1, 2, 3, f), chain_laplacian(f)
        assert ops._lambda_inputs(x, lap, "auto")[1] == want
        assert ops._lambda_inputs(x, lap, "numba")[1] == "numba"


def test_torch_keeps_its_thread_count():
    """numba's OpenMP layer shares libgomp with torch: a call must leave torch's thread count as it was (a
    process told to use 1 thread ran its torch ops on all cores after the first numba launch)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        lq, lk, v = torch.rand(1, 8, 2048), torch.rand(1, 8, 2048), torch.randn(1, 8, 2048, 64)  # parallel work
        numba_backend.attention_fwd_numba(lq, lk, v, torch.ones(8), None, True)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
