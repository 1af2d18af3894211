"""The Triton attention backward's own machinery: poisoned buffers, launches, large heads, determinism.

What every backend's gradients must be is tests/kernels/test_attention_contract.py. Here the kernel is called
directly, with every output and partial buffer poisoned with NaN first (an element a launch forgets to
write fails), on the forward's (out, lse) from reference.attention_fwd_chunked (so these tests do not
depend on the forward kernel): key blocks spread over several launches adding into their dλq slots, fp32
Dv 256 as two launches (dV, then the rest), Dv past the fused sizes (the chunked fallback), and bitwise
determinism. Each result is held to the contract's criterion (helpers.flash_close).

Runs under TRITON_INTERPRET=1 on CPU (conftest sets it without CUDA), the GPU's numerics emulated.
"""
import pytest
import torch
from helpers import GRADIENTS, Attention, flash_close, oracle, relative_error

from tauformer_kernels import reference

triton = pytest.importorskip("triton")
from tauformer_kernels.attention_triton_backward import attention_bwd_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b, h, hkv, tq, tk, dv, temperature, *, dtype=torch.float32, alibi=False):
    """(lq, lk, v, temperature, slopes, dout) on the CPU: λ, temperatures and slopes fp32, v and dout in dtype."""
    temp = temperature * torch.linspace(1.0, 1.5, h)  # per-head temperatures around the nominal one
    slopes = 0.05 + 0.2 * torch.rand(b, h) if alibi else None
    return (torch.rand(b, h, tq), torch.rand(b, hkv, tk), torch.randn(b, hkv, tk, dv).to(dtype), temp, slopes,
            torch.randn(b, h, tq, dv).to(dtype))


def _run(lq, lk, v, temp, slopes, dout, is_causal):
    on = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    lq, lk, v, temp, slopes, dout = map(on, (lq, lk, v, temp, slopes, dout))
    out, lse = reference.attention_fwd_chunked(lq, lk, v, temp, slopes, is_causal)
    return attention_bwd_triton(dout, lq, lk, v, out, lse, temp, slopes, is_causal, poison=True)


def _check(args, is_causal):
    """The kernel's gradients (poisoned buffers) against the oracle's, by flash_close."""
    lq, lk, v, temp, slopes, dout = args
    grads = dict(zip(GRADIENTS, (None if g is None else g.cpu() for g in _run(*args, is_causal))))
    exact = oracle(lq, lk, v, temp, slopes, is_causal, dout)
    naive = oracle(lq, lk, v, temp, slopes, is_causal, dout, exact=False)
    failures = flash_close(Attention(exact.out, None, grads), exact, naive, dtype=v.dtype,
                           temperature=temp.min().item(), v=v, dout=dout, names=GRADIENTS)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape, alibi", [
    ((1, 2, 1, 1, 1, 64), False),  # one key: every λ and temperature gradient exactly 0
    ((1, 2, 2, 17, 17, 48), False),  # no GQA, Dv padded to 64
    ((2, 8, 2, 45, 77, 64), True),  # GQA 4, ALiBi, Tq < Tk
], ids=["one_token", "odd", "gqa_alibi"])
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
def test_every_output_written(shape, alibi, is_causal, dtype):
    _check(_inputs(*shape, 0.05, dtype=dtype, alibi=alibi), is_causal)


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
def test_key_blocks_over_several_launches(is_causal):
    """257 keys: 9 key blocks of the interpreter's 32, in launches of partial_slots (2 on the CPU) key blocks
    each adding into its slot of the dλq partials (KB_START = 0, 2, 4, 6, 8)."""
    _check(_inputs(1, 2, 1, 257, 257, 48, 0.05), is_causal)


@pytest.mark.parametrize("dv", [256, 512])
def test_non_contiguous_cache_and_large_head(dv):
    """λk and V as slices of a preallocated cache (decode's layout); Dv = 256 (the fp32 build with "ieee"
    products and DT_TILE off, backward_launches) and 512 (past fp32's fused sizes: the chunked backward)."""
    lq, _, _, temp, _, dout = _inputs(1, 2, 2, 5, 40, dv, 0.05)
    lk = torch.rand(1, 2, 64)[:, :, :40]
    v = torch.randn(1, 64, 2, dv).transpose(1, 2)[:, :, :40]  # (B, Hkv, 40, Dv), strided
    assert not lk.is_contiguous() and not v.is_contiguous()
    _check((lq, lk, v, temp, None, dout), True)


@pytest.mark.parametrize("dv, alibi, is_causal", [(256, False, True), (256, True, False), (200, True, True)])
def test_gqa_large_fp32_head_split_launches(dv, alibi, is_causal):
    """fp32 Dv 256 with GQA runs as two launches, dV and then the λ/temperature/slope gradients
    (backward_launches): every output written once and exact; Dv = 200 pads to 256."""
    from tauformer_kernels.attention_triton_backward import backward_launches

    launches = backward_launches(torch.float32, dv, tq=19, tk=23, has_alibi=alibi, group=2, is_causal=is_causal)
    assert len(launches) == 2
    _check(_inputs(2, 4, 2, 19, 23, dv, 0.05, alibi=alibi), is_causal)


def test_deterministic():
    """No atomics: two runs give bitwise identical gradients."""
    args = _inputs(1, 8, 2, 70, 70, 64, 0.05, alibi=True)
    first, second = _run(*args, True), _run(*args, True)
    for name, x, y in zip(GRADIENTS, first, second):
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
