"""Packs whose trusted offsets or max_seqlen are wrong (issue #29, items 1 and 2): every backend reads them the
same way (varlen.effective: sequence 0 from row 0, the running maximum of the offsets clamped into the rows;
rows that see no key get output 0), the Triton kernels write every row and nothing outside their outputs,
and max_seqlen < 1 with rows is a ValueError naming the argument.

The Triton launchers write into views of larger NaN-poisoned buffers whose guard regions hold a sentinel:
an unwritten row stays NaN, a write outside the output changes a guard. Each case runs with the interpreter's
small tiles and with the GPU's tiles (TAUFORMER_GPU_CONFIGS), forward and backward, against the float64
oracle on each sequence alone.
"""
import pytest
import torch
from helpers import NUMBA, NUMBA_INSTALLED, relative_error

from tauformer_kernels import reference, taumode_attention_from_lambda, varlen

pytest.importorskip("triton")
from tauformer_kernels.attention_triton import attention_fwd_triton  # noqa: E402
from tauformer_kernels.attention_triton_backward import attention_bwd_triton  # noqa: E402

H, HKV, DV, TEMPERATURE = 2, 1, 8, 0.3
GUARD, SENTINEL = 16, 12345.0
# fp32 against float64: outputs at 1e-5, gradients at 1e-4 (tests/kernels/test_gpu_configs.py's tolerances)
FWD_TOL, BWD_TOL = 1e-5, 1e-4

# (cu_q, cu_k, total_q, total_k, the effective offsets every backend reads: q, k). total_q <= total_k: a causal
# pack with more query than key rows is refused by its shapes on every backend (no valid pack has them)
CASES = {
    "issue-past-end": ([0, 3, 70], [0, 3, 70], 7, 7, [0, 3, 7], [0, 3, 7]),
    "short-of-end": ([0, 3, 5], [0, 3, 5], 7, 7, [0, 3, 5], [0, 3, 5]),
    "valid-70+3": ([0, 70, 73], [0, 70, 73], 73, 73, [0, 70, 73], [0, 70, 73]),
    "decreasing": ([0, 50, 20, 73], [0, 50, 20, 73], 73, 73, [0, 50, 50, 73], [0, 50, 50, 73]),
    "negative-and-late-start": ([4, -3, 40, 999], [-8, 2, 40, 45], 60, 60, [0, 4, 40, 60], [0, 2, 40, 45]),
    "no-sequences": ([0], [0], 5, 5, [0], [0]),
    "more-queries-than-keys": ([0, 40], [0, 3], 40, 40, [0, 40], [0, 3]),
}


def _inputs(total_q, total_k, alibi, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    lq, lk = torch.rand(1, H, total_q, generator=g), torch.rand(1, HKV, total_k, generator=g)
    v = torch.randn(total_k, HKV, DV, generator=g).permute(1, 0, 2).unsqueeze(0)
    dout = torch.randn(total_q, H, DV, generator=g).permute(1, 0, 2).unsqueeze(0)
    temp = TEMPERATURE * torch.linspace(1.0, 1.5, H)
    slopes = 0.05 + 0.1 * torch.rand(count, H, generator=g) if alibi else None
    return lq, lk, v, dout, temp, slopes


def _oracle(lq, lk, v, dout, temp, slopes, causal, eff_q, eff_k):
    """out, dlq, dlk, dv, dtemp in float64, each sequence alone (varlen.effective's offsets); rows that see no
    key: output 0, no gradient."""
    total_q, total_k = lq.shape[2], lk.shape[2]
    out, dlq = torch.zeros(1, H, total_q, DV, dtype=torch.float64), torch.zeros(1, H, total_q, dtype=torch.float64)
    dlk, dv = torch.zeros(1, HKV, total_k, dtype=torch.float64), torch.zeros(1, HKV, total_k, DV, dtype=torch.float64)
    dtemp = torch.zeros(H, dtype=torch.float64)
    for b, (q0, q1, k0, k1) in enumerate(zip(eff_q, eff_q[1:], eff_k, eff_k[1:])):
        if k1 == k0:
            continue
        if causal:  # bottom-right: only the last Tk queries see a key
            q0 = max(q0, q1 - (k1 - k0))
        if q1 <= q0:
            continue
        leaves = [lq[:, :, q0:q1].double(), lk[:, :, k0:k1].double(), v[:, :, k0:k1].double(), temp.double()]
        leaves = [t.clone().requires_grad_() for t in leaves]
        sl = None if slopes is None else slopes[b:b + 1].double()
        o = reference.attention_naive(*leaves, sl, causal)
        grads = torch.autograd.grad(o, leaves, dout[:, :, q0:q1].double())
        out[:, :, q0:q1], dlq[:, :, q0:q1], dlk[:, :, k0:k1], dv[:, :, k0:k1] = o.detach(), *grads[:3]
        dtemp += grads[3]
    return out, dlq, dlk, dv, dtemp


def _guarded(shape_packed, permute):
    """A NaN view of `shape_packed` memory inside a buffer with GUARD sentinel elements on each side."""
    n = torch.Size(shape_packed).numel()
    buf = torch.full((n + 2 * GUARD,), float("nan"))
    buf[:GUARD], buf[-GUARD:] = SENTINEL, SENTINEL
    view = buf[GUARD:GUARD + n].view(shape_packed)
    return buf, (view.permute(*permute).unsqueeze(0) if permute else view.unsqueeze(0))


def _guards_intact(buf, name):
    assert bool((buf[:GUARD] == SENTINEL).all() and (buf[-GUARD:] == SENTINEL).all()), \
        f"{name}: a write outside the output"


def _triton(lq, lk, v, dout, temp, slopes, causal, seqs):
    total_q, total_k = lq.shape[2], lk.shape[2]
    out_buf, out = _guarded((total_q, H, DV), (1, 0, 2))
    lse_buf, lse = _guarded((H, total_q), None)
    out, lse = attention_fwd_triton(lq, lk, v, temp, slopes, causal, seqs, out=out, lse=lse)
    _guards_intact(out_buf, "out")
    _guards_intact(lse_buf, "lse")
    assert not bool(torch.isnan(out).any() or torch.isnan(lse).any()), "out/lse: an unwritten row"
    dv_buf, dv = _guarded((total_k, HKV, DV), (1, 0, 2))
    dlk_buf, dlk = _guarded((HKV, total_k), None)
    grads = attention_bwd_triton(dout, lq, lk, v, out, lse, temp, slopes, causal, seqs, poison=True, dv=dv, dlk=dlk)
    _guards_intact(dv_buf, "dv")
    _guards_intact(dlk_buf, "dlk")
    dlq, dlk, dv, dtemp, _ = grads
    for name, g in (("dlq", dlq), ("dlk", dlk), ("dv", dv), ("dtemperature", dtemp)):
        assert not bool(torch.isnan(g).any()), f"{name}: an unwritten element"
    dlq, dlk = varlen.remove_translation(dlq, dlk, seqs)  # as the op does
    return out, dlq, dlk, dv, dtemp


def _compare(got, want, names=("out", "dlq", "dlk", "dv", "dtemperature")):
    for name, g, w in zip(names, got, want):
        tol = FWD_TOL if name == "out" else BWD_TOL
        # rows the oracle leaves at 0 must be exactly 0 (outputs and gradients of rows that see no key)
        assert bool((g.double()[w == 0] == 0).all()) or name in ("dlq", "dlk", "dtemperature"), name
        assert relative_error(g.double(), w, floor=1e-12) < tol, f"{name}: {relative_error(g.double(), w):.2e}"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(CASES))
def test_trusted_offsets_every_backend_agrees_and_stays_inside(case, causal, tiles):
    cu_q, cu_k, total_q, total_k, eff_q, eff_k = CASES[case]
    alibi = case in ("decreasing", "negative-and-late-start")
    count = len(cu_q) - 1
    lq, lk, v, dout, temp, slopes = _inputs(total_q, total_k, alibi, count)
    seqs = varlen.Seqs(torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32),
                       max(1, total_q), max(1, total_k))
    assert varlen.effective(cu_q, total_q) == eff_q and varlen.effective(cu_k, total_k) == eff_k
    want = _oracle(lq, lk, v, dout, temp, slopes, causal, eff_q, eff_k)
    _compare(_triton(lq, lk, v, dout, temp, slopes, causal, seqs), want)
    if tiles == "gpu-tiles":
        return
    # the PyTorch backends through the public op: the same answer
    for backend in ("reference", "loglinear") + (("numba",) if NUMBA_INSTALLED else ()):
        leaves = [lq[0].t().clone().requires_grad_(), lk[0].t().clone().requires_grad_(),
                  v[0].transpose(0, 1).clone().requires_grad_()]
        out = taumode_attention_from_lambda(*leaves, temperature=temp, is_causal=causal, backend=backend,
                                            alibi_slopes=slopes, cu_seqlens_q=seqs.cu_q, cu_seqlens_k=seqs.cu_k,
                                            max_seqlen_q=seqs.max_q, max_seqlen_k=seqs.max_k)
        grads = torch.autograd.grad(out, leaves, dout[0].transpose(0, 1))
        got = (out.transpose(0, 1).unsqueeze(0), grads[0].t().unsqueeze(0), grads[1].t().unsqueeze(0),
               grads[2].transpose(0, 1).unsqueeze(0))
        _compare(got, want[:4], names=("out", "dlq", "dlk", "dv"))


@pytest.mark.parametrize("case", ["valid-70+3", "issue-past-end", "short-of-end"])
def test_every_max_seqlen_from_minus_one(case, tiles):
    """max_seqlen_q = max_seqlen_k = m for m = -1 .. the longest sequence: m < 1 a ValueError naming it, every
    other m the right answer (the programs loop past a short grid), forward and backward."""
    cu_q, cu_k, total_q, total_k, eff_q, eff_k = CASES[case]
    lq, lk, v, dout, temp, slopes = _inputs(total_q, total_k, False, len(cu_q) - 1)
    want = _oracle(lq, lk, v, dout, temp, slopes, True, eff_q, eff_k)
    longest = max(b - a for a, b in zip(eff_q, eff_q[1:]))
    cu = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    for m in range(-1, longest + 1):
        seqs = varlen.Seqs(*cu, m, m)
        if m < 1:
            with pytest.raises(ValueError, match="max_seqlen_q must be >= 1"):
                attention_fwd_triton(lq, lk, v, temp, slopes, True, seqs)
            with pytest.raises(ValueError, match="max_seqlen_q must be >= 1"):
                attention_bwd_triton(dout, lq, lk, v, want[0].float(), lq, temp, slopes, True, seqs)
            continue
        # a sweep is long under the interpreter: the backward at the grid sizes that differ (1, 2 and 3
        # key blocks of 32 or 16 keys and the longest), the forward at every m
        backward = m in (1, 16, 17, 32, 33, 64, 65, longest)
        got = _triton(lq, lk, v, dout, temp, slopes, True, seqs) if backward else None
        if got is None:
            out, _ = attention_fwd_triton(lq, lk, v, temp, slopes, True, seqs, poison=True)
            _compare((out,), want[:1])
        else:
            _compare(got, want)


@pytest.mark.parametrize("backend", ["reference", "triton", "loglinear", NUMBA])
def test_max_seqlen_below_one_refused_on_every_backend(backend):
    lq, lk, v = torch.rand(7, 2), torch.rand(7, 1), torch.randn(7, 1, 4)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    for name, mq, mk in (("max_seqlen_q", 0, 4), ("max_seqlen_k", 4, -1)):
        with pytest.raises(ValueError, match=f"{name} must be >= 1"):
            taumode_attention_from_lambda(lq, lk, v, backend=backend, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                          max_seqlen_q=mq, max_seqlen_k=mk)


@pytest.mark.parametrize("backend", ["reference", "triton", "loglinear", NUMBA])
def test_issue_repro_past_the_end(backend):
    """Issue #29 item 1 verbatim: offsets past the rows with max_seqlen given (the interpreter's heap was
    corrupted): the rows past the offsets' last sequence are attended to as their own sequence's."""
    torch.manual_seed(0)
    lq, lk, v = torch.rand(7, 2), torch.rand(7, 1), torch.randn(7, 1, 4)
    cu = torch.tensor([0, 3, 70], dtype=torch.int32)
    out = taumode_attention_from_lambda(lq, lk, v, backend=backend, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                        max_seqlen_q=67, max_seqlen_k=67)
    fixed = torch.tensor([0, 3, 7], dtype=torch.int32)
    want = taumode_attention_from_lambda(lq, lk, v, backend="reference", cu_seqlens_q=fixed, cu_seqlens_k=fixed)
    assert torch.allclose(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton", "loglinear", NUMBA])
def test_offsets_short_of_the_rows(backend):
    """Read on the host (no max_seqlen): a ValueError naming the offsets; trusted: the rows past them get 0."""
    lq, lk, v = torch.rand(7, 2), torch.rand(7, 1), torch.randn(7, 1, 4)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q ends at 5, but its tensor has 7 rows"):
        taumode_attention_from_lambda(lq, lk, v, backend=backend, cu_seqlens_q=cu, cu_seqlens_k=cu)
    out = taumode_attention_from_lambda(lq, lk, v, backend=backend, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                        max_seqlen_q=3, max_seqlen_k=3)
    assert bool((out[5:] == 0).all()) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("backend", ["reference", "triton", "loglinear", NUMBA])
@pytest.mark.parametrize("offsets", [[0], [0, 0, 0, 0]], ids=["B=0", "all-empty"])
def test_empty_packs_accepted(backend, offsets):
    """Issue #29 item 11: valid packs with no tokens give empty outputs and gradients on every backend."""
    cu = torch.tensor(offsets, dtype=torch.int32)
    leaves = [torch.rand(0, 2).requires_grad_(), torch.rand(0, 1).requires_grad_(),
              torch.rand(0, 1, 4).requires_grad_()]
    for maxima in ((None, None), (1, 1)):
        out = taumode_attention_from_lambda(*leaves, backend=backend, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                            max_seqlen_q=maxima[0], max_seqlen_k=maxima[1])
        assert out.shape == (0, 2, 4)
        grads = torch.autograd.grad(out.sum(), leaves)
        assert [tuple(g.shape) for g in grads] == [(0, 2), (0, 1), (0, 1, 4)]
