"""The Triton attention backward against the float64 oracle (autograd through reference.attention_naive).

Runs under TRITON_INTERPRET=1 on CPU (conftest sets it without CUDA). The kernel gets the forward's (out, lse)
from reference.attention_fwd_chunked, so these tests do not depend on the forward kernel. Inputs are made in
the test dtype and the oracle runs on exactly those values in float64, so the error measured is the kernel's.
Every output is poisoned with NaN first (an element the kernels forget to write fails the test).

Tolerances (relative norms): fp32 1e-4·max(1, 0.01/temperature): λ rounding is amplified by 1/temperature
and the sign-weighted sums of dS cancel; fp16 2e-2: P, dO and dS enter the tensor cores in fp16, as in
FlashAttention. bf16 runs on the GPU only (the interpreter multiplies its bit patterns).
"""
import pytest
import torch

from helpers import relative_error, temperature_tolerance
from tauformer_kernels import reference

triton = pytest.importorskip("triton")
from tauformer_kernels.attention_triton_backward import attention_bwd_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("dlq", "dlk", "dv", "dtemperature", "dalibi")


def _tolerance(dtype, temperature):
    return temperature_tolerance(1e-4, temperature) if dtype == torch.float32 else 2e-2


def _inputs(b, h, hkv, tq, tk, dv, temperature, *, dtype, alibi=False, lam=None):
    """Fresh inputs in the test dtype (λ, temperature, slopes fp32), on DEVICE."""
    if lam is None:
        lq = torch.rand(b, h, tq)
        lk = torch.rand(b, hkv, tk)
    else:
        lq, lk = lam
    v = torch.randn(b, hkv, tk, dv).to(dtype)
    # per-head temperatures around the nominal one
    temp = temperature * torch.linspace(1.0, 1.5, h)
    slopes = 0.05 + 0.2 * torch.rand(b, h) if alibi else None
    dout = torch.randn(b, h, tq, dv).to(dtype)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return tuple(map(to, (lq.float(), lk.float(), v, temp.float(), slopes, dout)))


def _oracle(lq, lk, v, temp, slopes, dout, is_causal):
    leaves = [t.detach().double().requires_grad_(True) for t in (lq, lk, v, temp)]
    sl = None if slopes is None else slopes.detach().double().requires_grad_(True)
    out = reference.attention_naive(*leaves, sl, is_causal)
    grads = torch.autograd.grad(out, leaves + ([sl] if sl is not None else []), dout.double())
    return list(grads) + ([None] if sl is None else [])


def _run(lq, lk, v, temp, slopes, dout, is_causal):
    out, lse = reference.attention_fwd_chunked(lq, lk, v, temp, slopes, is_causal)
    return attention_bwd_triton(dout, lq, lk, v, out, lse, temp, slopes, is_causal, poison=True)


def _check(args, is_causal, tol, temperature):
    """The kernel's gradients from args = _inputs(...) against the oracle's, each by relative error."""
    got, want = _run(*args, is_causal), _oracle(*args, is_causal)
    v, dout = args[2], args[5]
    # the size of a dP entry (dO_i·v_j over Dv features): what the rounding of dS = P (dP − D) is relative to
    dp_scale = (dout.double().pow(2).mean().sqrt() * v.double().pow(2).mean().sqrt() * v.shape[-1] ** 0.5).item()
    for name, g, w in zip(NAMES, got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.shape == w.shape, (name, g.shape, w.shape)
        assert torch.isfinite(g).all(), f"{name}: non-finite values (an unwritten element?)"
        # a gradient that is exactly zero in the reference (a single visible key: softmax is constant) is
        # measured against its natural scale: dS ~ |dP| per entry, times 1/T for dλ, 1/T² for dT
        scale = {"dlq": 1 / temperature, "dlk": 1 / temperature, "dtemperature": temperature ** -2}.get(name, 1.0)
        floor = 1e-2 * max(1.0, scale) * dp_scale * w.numel() ** 0.5
        err = relative_error(g, w, floor=floor)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.1e}"


# shapes: (B, H, Hkv, Tq, Tk, Dv); odd lengths, one token, Tq < Tk, GQA
SHAPES = [
    (1, 2, 1, 1, 1, 64),
    (1, 2, 2, 17, 17, 48),
    (1, 2, 1, 128, 128, 64),
    (1, 2, 1, 257, 257, 48),
    (1, 8, 2, 33, 70, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Hkv{}Tq{}Tk{}D{}".format(*s))
@pytest.mark.parametrize("temperature", [1e-3, 0.05, 1.0, 10.0])
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
def test_fp32_matches_oracle(shape, temperature, is_causal):
    b, h, hkv, tq, tk, dv = shape
    args = _inputs(b, h, hkv, tq, tk, dv, temperature, dtype=torch.float32)
    _check(args, is_causal, _tolerance(torch.float32, temperature), temperature)


@pytest.mark.parametrize("shape", [(1, 8, 2, 128, 128, 64), (2, 4, 4, 17, 40, 48)],
                         ids=lambda s: "B{}H{}Hkv{}Tq{}Tk{}D{}".format(*s))
@pytest.mark.parametrize("temperature", [1e-3, 0.05, 1.0, 10.0])
def test_fp16_matches_oracle(shape, temperature):
    b, h, hkv, tq, tk, dv = shape
    args = _inputs(b, h, hkv, tq, tk, dv, temperature, dtype=torch.float16)
    _check(args, True, _tolerance(torch.float16, temperature), temperature)


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_alibi_gqa(is_causal, dtype):
    args = _inputs(2, 8, 2, 45, 77, 64, 0.05, dtype=dtype, alibi=True)
    _check(args, is_causal, _tolerance(dtype, 0.05), 0.05)


@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_lambda_outside_unit_interval(temperature):
    """Any finite λ: large, negative, spread over several units."""
    b, h, hkv, tq, tk = 1, 4, 2, 40, 90
    lam = (3.0 * torch.randn(b, h, tq) - 1.0, 3.0 * torch.randn(b, hkv, tk) + 2.0)
    args = _inputs(b, h, hkv, tq, tk, 32, temperature, dtype=torch.float32, lam=lam)
    _check(args, True, _tolerance(torch.float32, temperature), temperature)


def test_ties_carry_no_gradient():
    """λ = scaled positions: every query ties with its diagonal key (sign(0) = 0, as autograd's abs)."""
    b, h, hkv, tq, tk = 1, 2, 1, 50, 70
    pos_q = (torch.arange(tq) + (tk - tq)).float() * 1e-3
    lam = (pos_q.expand(b, h, tq).clone(), (torch.arange(tk).float() * 1e-3).expand(b, hkv, tk).clone())
    assert (lam[0][0, 0, :, None] == lam[1][0, 0, None, :]).any()
    args = _inputs(b, h, hkv, tq, tk, 64, 2e-3, dtype=torch.float32, lam=lam)
    _check(args, True, _tolerance(torch.float32, 2e-3), 2e-3)


@pytest.mark.parametrize("dv", [256, 512])
def test_non_contiguous_cache_and_large_head(dv):
    """λk and V as slices of a preallocated cache (decode's layout); Dv = 256 (the fp32 build with "ieee"
    products and DT_TILE off, backward_config) and 512 (past fp32's fused sizes: the chunked backward)."""
    b, h, hkv, tq, tk = 1, 2, 2, 5, 40
    lq, _, _, temp, _, dout = _inputs(b, h, hkv, tq, tk, dv, 0.05, dtype=torch.float32)
    lk_cache = torch.rand(b, hkv, 64, device=DEVICE)
    v_cache = torch.randn(b, 64, hkv, dv, device=DEVICE).transpose(1, 2)  # (B, Hkv, 64, Dv), strided
    lk, v = lk_cache[:, :, :tk], v_cache[:, :, :tk]
    assert not lk.is_contiguous() and not v.is_contiguous()
    args = (lq, lk, v, temp, None, dout)
    _check(args, True, _tolerance(torch.float32, 0.05), 0.05)


@pytest.mark.parametrize("dv, alibi, is_causal", [(256, False, True), (256, True, False), (200, True, True)])
def test_gqa_large_fp32_head_split_launches(dv, alibi, is_causal):
    """fp32 Dv 256 with GQA runs as two launches, dV and then the λ/temperature/slope gradients
    (backward_config's "launches"): every output written once and exact; Dv = 200 pads to 256."""
    from tauformer_kernels.attention_triton_backward import backward_config

    assert len(backward_config(torch.float32, dv, has_alibi=alibi, group=2, is_causal=is_causal)["launches"]) == 2
    args = _inputs(2, 4, 2, 19, 23, dv, 0.05, dtype=torch.float32, alibi=alibi)
    _check(args, is_causal, _tolerance(torch.float32, 0.05), 0.05)


def test_deterministic():
    """No atomics: two runs give bitwise identical gradients."""
    args = _inputs(1, 8, 2, 70, 70, 64, 0.05, dtype=torch.float32, alibi=True)
    first, second = _run(*args, True), _run(*args, True)
    for name, x, y in zip(NAMES, first, second):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("is_causal,alibi", [(True, True), (False, False)])
def test_public_api_end_to_end_matches_reference(is_causal, alibi):
    """The public API with backend="triton" (Triton λ forward/backward, attention forward/backward) against
    backend="reference": gradients of q, k, v, tau (Hkv,), temperature (H,) and the ALiBi slopes, fp32, GQA
    with odd lengths (Tq < Tk, bottom-right causal)."""
    from tauformer_kernels import chain_laplacian, taumode_attention

    b, h, hkv, tq, tk, f, dv = 2, 4, 2, 13, 21, 16, 24
    lap = chain_laplacian(f)
    q0 = torch.randn(b, h, tq, f)
    k0 = torch.randn(b, hkv, tk, f)
    v0 = torch.randn(b, hkv, tk, dv)
    tau0 = torch.tensor([0.3, 0.7])
    temp0 = torch.tensor([0.05, 0.08, 0.1, 0.2])
    slopes0 = (0.05 + 0.2 * torch.rand(b, h)) if alibi else None
    dout = torch.randn(b, h, tq, dv)

    def run(backend):
        leaves = [t.clone().to(DEVICE).requires_grad_(True) for t in (q0, k0, v0, tau0, temp0)]
        sl = None if slopes0 is None else slopes0.clone().to(DEVICE).requires_grad_(True)
        q, k, v, tau, temp = leaves
        out = taumode_attention(q, k, v, lap.to(DEVICE), tau=tau, temperature=temp, is_causal=is_causal,
                                alibi_slopes=sl, backend=backend)
        grads = torch.autograd.grad(out, leaves + ([sl] if sl is not None else []), dout.to(DEVICE))
        return out.detach(), grads

    out_t, g_t = run("triton")
    out_r, g_r = run("reference")
    assert relative_error(out_t, out_r) < 1e-4
    names = ("dq", "dk", "dv", "dtau", "dtemperature", "dslopes")
    for name, gt, gr in zip(names, g_t, g_r):
        assert torch.isfinite(gt).all(), name
        assert relative_error(gt, gr) < 1e-4, (name, relative_error(gt, gr))
