"""The O(T log T) backend's own machinery: its divide and conquer over many levels, and real lengths.

What every backend must compute is tests/kernels/test_attention_contract.py (it runs this backend with small
blocks, a few levels deep). Here attention_fwd_loglinear / attention_bwd_loglinear are called directly,
on slices of a larger cache (non-contiguous λk and v): deep level stacks with tiny blocks (many levels,
a deep recursive scan, few queries against many keys), and the default blocks at 4096 and 8193 tokens
and on the retrieval setup (docs/math.md §Sorted (loglinear) attention). Each result is held to the
contract's criterion (helpers.flash_close).
"""
import pytest
import torch
from helpers import GRADIENTS, Attention, flash_close, loglinear_small_blocks, oracle

from tauformer_kernels import loglinear


def _inputs(b, h, hkv, tq, tk, dv, temperature, slopes, lam_k=None, lam_q=None):
    lq = torch.rand(b, h, tq) if lam_q is None else lam_q
    lk = torch.rand(b, hkv, tk) if lam_k is None else lam_k
    # v and λk as slices of a larger cache: the backend must accept non-contiguous inputs
    cache = torch.randn(b, hkv, tk + 3, dv + 5)
    v = cache[:, :, 1: tk + 1, 2: dv + 2]
    lk = torch.cat([lk, torch.zeros(b, hkv, 2)], dim=-1)[..., :tk]
    temp = torch.full((h,), float(temperature)) * torch.linspace(0.5, 2.0, h)  # per-head temperatures
    sl = None if slopes is None else torch.rand(b, h) * slopes
    return lq, lk, v, temp, sl


def _check(b, h, hkv, tq, tk, dv, temperature, slopes, causal, lam_k=None, lam_q=None, device="cpu", bound_only=()):
    """The backend on `device` against the float64 oracle on the CPU: out, lse and every gradient
    (those in `bound_only` by the bound alone)."""
    lq, lk, v, temp, sl = _inputs(b, h, hkv, tq, tk, dv, temperature, slopes, lam_k, lam_q)
    dout = torch.randn(b, h, tq, dv)
    on = lambda *ts: [None if t is None else t.to(device) for t in ts]  # noqa: E731
    out, lse = loglinear.attention_fwd_loglinear(*on(lq, lk, v, temp, sl), causal)
    assert out.dtype == v.dtype and lse.dtype == torch.float32
    grads = loglinear.attention_bwd_loglinear(*on(dout, lq, lk, v, out, lse, temp, sl), causal)
    assert (grads[4] is None) == (sl is None)
    got = Attention(out.cpu(), lse.cpu(), dict(zip(GRADIENTS, (None if g is None else g.cpu() for g in grads))))
    exact = oracle(lq, lk, v, temp, sl, causal, dout)
    naive = oracle(lq, lk, v, temp, sl, causal, dout, exact=False)
    failures = flash_close(got, exact, naive, dtype=v.dtype, temperature=temp.min().item(), v=v, dout=dout,
                           bound_only=bound_only)
    assert not failures, "\n".join(failures)


@pytest.fixture
def small_blocks(monkeypatch):
    loglinear_small_blocks(monkeypatch)


@pytest.mark.parametrize("temperature", [1e-4, 10.0])
@pytest.mark.parametrize("slopes", [None, 1.0])
@pytest.mark.parametrize("causal", [True, False])
def test_deep_levels(small_blocks, temperature, slopes, causal):
    """300 positions in leaves of 16: five levels of halves, each scan four chunks deep."""
    _check(2, 4, 2, 300, 300, 12, temperature, slopes, causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("slopes", [None, 0.5])
@pytest.mark.parametrize("tq,tk", [(100, 333), (65, 1000), (257, 260)])
def test_gqa_and_short_queries(small_blocks, tq, tk, slopes, causal):
    """Queries starting deep inside the key axis (q_start) over many levels, GQA 4."""
    _check(2, 8, 2, tq, tk, 20, 0.05, slopes, causal)


@pytest.mark.parametrize("slopes", [None, 0.1])
def test_lambda_outside_unit_interval(slopes):
    """The retrieval setup of the reference crate: λk = key position, temperature 1e-3, λ up to 3000.

    Here the scans form |λq − λk| from differences to reference keys thousands apart. Every result meets
    the contract's criterion but the temperature gradient (a sum that cancels), which comes out at several
    times twice plain fp32 autograd's error: it is held to the bound alone. Known, stated in
    kernels/NOTES.md: the temperature of such a retrieval head is a fixed hyper-parameter, not learned."""
    t = 3000
    lam_k = torch.arange(t, dtype=torch.float32).view(1, 1, t)
    lam_q = (torch.randint(0, t, (1, 2, t)).float() + torch.rand(1, 2, t) * 0.9 + 0.05)
    _check(1, 2, 1, t, t, 16, 1e-3, slopes, True, lam_k=lam_k, lam_q=lam_q, bound_only=("dtemperature",))


@pytest.mark.parametrize("temperature", [1e-3, 1.0])
def test_long_4096(temperature):
    _check(1, 2, 1, 4096, 4096, 16, temperature, None, True)


def test_long_4096_slopes_gqa():
    _check(1, 2, 1, 4096, 4096, 16, 0.05, 1.0, True)


@pytest.mark.slow
@pytest.mark.parametrize("temperature,slopes", [(1e-4, None), (1e-3, 1.0), (10.0, 0.05)])
def test_long_8193(temperature, slopes):
    _check(1, 1, 1, 8193, 8193, 16, temperature, slopes, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the same torch ops as on the CPU)")
@pytest.mark.parametrize("temperature", [1e-3, 0.05, 10.0])
@pytest.mark.parametrize("slopes", [None, 0.1])
def test_cuda(temperature, slopes):
    """The loglinear backend on a GPU, GQA and an odd length, forward and gradients."""
    _check(2, 4, 2, 1000, 1000, 24, temperature, slopes, True, device="cuda")


@pytest.mark.parametrize("causal, alibi", [(True, False), (False, False), (True, True)],
                         ids=["causal", "full", "alibi"])
def test_infinite_key_lambdas_get_weight_zero(causal, alibi, small_blocks):
    """Issue #29: λk = ±inf (check_finite=False) is a key no query sees (logit -inf); the scans gave NaN rows
    where the reference gives the finite limit. Now the same as the reference, forward and backward."""
    from tauformer_kernels import reference

    g = torch.Generator().manual_seed(3)
    t = 300
    lq, lk, v = torch.rand(1, 2, t, generator=g), torch.rand(1, 1, t, generator=g), torch.randn(1, 1, t, 4, generator=g)
    lk[0, 0, [1, 7, 150, 151, 299]] = torch.tensor([float("inf"), float("-inf"), float("inf"), float("inf"),
                                                    float("inf")])
    temp = torch.tensor([0.2, 0.3])
    slopes = torch.tensor([[0.01, 0.02]]) if alibi else None
    want, want_lse = reference.attention_fwd_chunked(lq, lk, v, temp, slopes, causal)
    got, lse = loglinear.attention_fwd_loglinear(lq, lk, v, temp, slopes, causal)
    assert bool(torch.isfinite(got).all()) and torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    dout = torch.randn(1, 2, t, 4, generator=g)
    grads = loglinear.attention_bwd_loglinear(dout, lq, lk, v, got, lse, temp, slopes, causal)
    want_grads = reference.attention_bwd_chunked(dout, lq, lk, v, want, want_lse, temp, slopes, causal)
    for name, a, b in zip(("dlq", "dlk", "dv"), grads[:3], want_grads[:3]):
        finite = torch.isfinite(b)  # the reference's dλk of an infinite key is NaN (inf - inf)
        assert bool(torch.isfinite(a).all()), name
        assert torch.allclose(a[finite], b[finite], rtol=1e-3, atol=1e-4), name
