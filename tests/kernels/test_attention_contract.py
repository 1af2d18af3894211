"""Every attention backend against one float64 oracle: the output, the logsumexp and every gradient.

The contract (docs/math.md §Attention logits, docs/internal-contract.md): out = softmax_j(s_ij)·V with
s_ij = −|λq_i − λk_j| / T_h − m_bh·|i + Tk − Tq − j|, causal bottom-right; lse the natural-log logsumexp
of each row; the gradients of λq, λk, v, the temperatures and the slopes. Each backend runs through the
public API, `taumode_attention_from_lambda(..., backend=b)` (out and the gradients, ALiBi slopes of shape
(H,) or (B, H)), and through its forward function `attention_fwd_<b>` for the logsumexp (the Triton
kernel's outputs poisoned with NaN first). The sorted decode cache (`SortedCache`) runs the causal
forward cases one query at a time, appending each key as decode does.

Criterion (helpers.flash_close): flash-attention's, the error against the float64 oracle at most 2× that
of the naive attention in the same precision (fp32, or fp16 / bf16 P·V) plus a floor of a few ulps, and
below the specification's bounds (fp32 1e-5 forward, bf16 1e-2; helpers.BOUNDS).

Shapes are small (the Triton kernels run in the interpreter on a CPU); the loglinear backend and the
sorted cache get small blocks so that these short sequences cross several of their levels; the numba
backend runs twice, as it is (its Fenwick trees for more than DENSE_MAX_QUERIES queries, the dense loop for
fewer) and with the dense forward everywhere ("numba_dense"). Their own
machinery at real sizes is tested in test_loglinear.py and test_sorted_cache.py, the Triton launches in
test_attention_triton*.py.
"""
import dataclasses
import functools
import importlib.util

import pytest
import torch
from helpers import GRADIENTS, Attention, flash_close, loglinear_small_blocks, oracle

from tauformer_kernels import SortedCache, reference, taumode_attention_from_lambda

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None


@dataclasses.dataclass(frozen=True)
class Case:
    """(B, H, Hkv, Tq, Tk, Dv); per-head temperatures temperature·[1 … 2]; slopes None, "h" (H,), "bh"
    (B, H) or "steep" (H,) = 1, 1/2, 1/16, 1/256; λ drawn as `lam` (_lambdas); grads: check the gradients
    too; cache: λk and v are slices of a larger preallocated cache."""
    name: str
    b: int
    h: int
    hkv: int
    tq: int
    tk: int
    dv: int
    temperature: float = 0.05
    alibi: str | None = None
    causal: bool = True
    lam: str = "unit"
    grads: bool = True
    cache: bool = False

    def __str__(self):
        return self.name


CASES = [
    Case("odd", 1, 2, 2, 67, 67, 24),  # several query and key blocks, lengths of no block size
    Case("one_token", 1, 2, 1, 1, 1, 16),  # one key: P = 1, the λ and temperature gradients are 0
    Case("decode_from_cache", 2, 4, 2, 1, 57, 48, cache=True),  # Tq = 1 against strided cache slices
    Case("prefill_chunk", 1, 4, 2, 13, 50, 16),  # Tq < Tk, bottom-right causal
    Case("mqa", 1, 4, 1, 37, 37, 64),  # GQA with one kv head
    Case("alibi_steep", 1, 4, 2, 29, 70, 16, alibi="steep"),  # slopes (H,) from 1 down to 2^-8
    Case("alibi_per_batch_full", 2, 4, 2, 29, 70, 16, alibi="bh", causal=False),  # slopes (B, H)
    Case("full_more_queries", 1, 2, 1, 80, 33, 16, causal=False),  # Tq > Tk (non-causal only)
    Case("full_more_queries_alibi", 1, 2, 1, 80, 33, 16, alibi="bh", causal=False),
    Case("cold", 1, 2, 1, 67, 67, 16, temperature=1e-3),
    Case("cold_alibi_full", 1, 2, 1, 67, 67, 16, temperature=1e-3, alibi="bh", causal=False),
    Case("coldest", 1, 2, 1, 67, 67, 16, temperature=1e-4),
    Case("hot", 1, 2, 1, 67, 67, 16, temperature=10.0),
    Case("hot_alibi", 1, 2, 1, 67, 67, 16, temperature=10.0, alibi="h"),
    Case("lambda_normal", 1, 4, 2, 40, 90, 32, lam="normal"),  # any finite λ, spread over units
    Case("lambda_normal_warm", 1, 4, 2, 40, 90, 32, temperature=1.0, lam="normal"),
    Case("lambda_wide", 1, 2, 1, 150, 150, 32, temperature=1.0, lam="wide", grads=False),  # λ in [−700, 1300)
    Case("lambda_wide_cold", 1, 2, 1, 150, 150, 32, temperature=1e-3, lam="wide", grads=False),
    Case("retrieval", 1, 2, 1, 200, 200, 32, temperature=1e-3, lam="positions", grads=False),
    Case("retrieval_full", 1, 2, 1, 200, 200, 32, temperature=1e-3, lam="positions", causal=False, grads=False),
    Case("retrieval_warm_full", 1, 2, 1, 200, 200, 32, temperature=1.0, lam="positions", causal=False, grads=False),
    Case("ties", 1, 2, 1, 67, 67, 8, lam="ties"),  # λq = λk exactly: sign(0) = 0
    Case("ties_alibi_full", 1, 2, 1, 67, 67, 8, lam="ties", alibi="h", causal=False),
    Case("empty_batch", 0, 4, 2, 5, 7, 8),
    Case("head_dim_one", 3, 3, 1, 5, 9, 1),
    Case("head_dim_one_full", 3, 3, 1, 5, 9, 1, causal=False),
    Case("many_blocks", 1, 2, 1, 130, 130, 16),
]
LOW_PRECISION = ["odd", "one_token", "decode_from_cache", "mqa", "alibi_per_batch_full", "full_more_queries_alibi",
                 "cold", "hot_alibi", "lambda_wide", "lambda_wide_cold", "retrieval_full", "ties"]
BACKENDS = ("reference", "triton", "loglinear", "numba", "numba_dense", "sorted_cache")
BY_NAME = {case.name: case for case in CASES}
DTYPE_CASES = [(torch.float32, "fp32", case) for case in CASES] + [
    (dtype, tag, BY_NAME[name]) for dtype, tag in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"))
    for name in LOW_PRECISION]
# the sorted cache decodes: causal cases with a batch, one query at a time
PARAMS = [pytest.param(backend, dtype, case, id=f"{backend}-{tag}-{case}")
          for backend in BACKENDS for dtype, tag, case in DTYPE_CASES
          if backend != "sorted_cache" or (case.causal and case.b > 0)]


def _lambdas(case: Case):
    b, h, hkv, tq, tk = case.b, case.h, case.hkv, case.tq, case.tk
    if case.lam == "unit":  # as the projection makes them
        return torch.rand(b, h, tq), torch.rand(b, hkv, tk)
    if case.lam == "normal":
        return 3.0 * torch.randn(b, h, tq) - 1.0, 3.0 * torch.randn(b, hkv, tk) + 2.0
    if case.lam == "wide":
        return -700.0 + 2000.0 * torch.rand(b, h, tq), -700.0 + 2000.0 * torch.rand(b, hkv, tk)
    if case.lam == "positions":  # λk = key position, λq = a position plus noise (the reference crate's retrieval)
        lk = torch.arange(tk, dtype=torch.float32).expand(b, hkv, tk).clone()
        return torch.randint(0, tk, (b, h, tq)).float() + 0.05 + 0.9 * torch.rand(b, h, tq), lk
    assert case.lam == "ties"  # a coarse grid: many exact ties λq = λk
    return torch.randint(0, 8, (b, h, tq)) / 8.0, torch.randint(0, 8, (b, hkv, tk)) / 8.0


def inputs(case: Case, dtype):
    """(lq, lk, v, temperature, alibi_slopes, dout) on the CPU: λ, temperatures and slopes fp32, v and dout
    in `dtype`."""
    lq, lk = _lambdas(case)
    v = torch.randn(case.b, case.hkv, case.tk, case.dv).to(dtype)
    if case.cache:  # λk and v as the first Tk positions of a (B, Hkv, Tk + 9, ·) cache, V stored time-major
        lk = torch.cat([lk, torch.rand(case.b, case.hkv, 9)], dim=-1)[..., : case.tk]
        store = torch.randn(case.b, case.tk + 9, case.hkv, case.dv).to(dtype).transpose(1, 2)
        store[:, :, : case.tk] = v
        v = store[:, :, : case.tk]
        assert not lk.is_contiguous() and not v.is_contiguous()
    temperature = case.temperature * torch.linspace(1.0, 2.0, case.h)
    slopes = {None: lambda: None, "h": lambda: 0.05 + 0.2 * torch.rand(case.h),
              "bh": lambda: 0.05 + 0.2 * torch.rand(case.b, case.h),
              "steep": lambda: torch.tensor([1.0, 0.5, 0.0625, 2.0**-8])[: case.h]}[case.alibi]()
    dout = torch.randn(case.b, case.h, case.tq, case.dv).to(dtype)
    return lq, lk, v, temperature, slopes, dout


def _forward_function(backend):
    """attention_fwd_<backend> (docs/internal-contract.md), the Triton kernel with its outputs poisoned."""
    if backend == "triton":
        from tauformer_kernels.attention_triton import attention_fwd_triton

        return functools.partial(attention_fwd_triton, poison=True)
    if backend == "loglinear":
        from tauformer_kernels.loglinear import attention_fwd_loglinear

        return attention_fwd_loglinear
    if backend == "numba":
        from tauformer_kernels.attention_numba import attention_fwd_numba

        return attention_fwd_numba
    return reference.attention_fwd_chunked


def _run_backend(backend, case, lq, lk, v, temperature, slopes, dout):
    """Out and the gradients through the public API; lse (and out again) from the forward function."""
    on = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    leaves = [on(t).detach().requires_grad_(case.grads) for t in (lq, lk, v, temperature)]
    sl = None if slopes is None else on(slopes).detach().requires_grad_(case.grads)
    out = taumode_attention_from_lambda(*leaves[:3], temperature=leaves[3], is_causal=case.causal, alibi_slopes=sl,
                                        backend=backend)
    assert out.dtype == v.dtype and out.shape == (case.b, case.h, case.tq, case.dv)
    grads = dict.fromkeys(GRADIENTS)
    if case.grads:
        found = torch.autograd.grad(out, leaves + ([sl] if sl is not None else []), on(dout))
        grads.update(zip(GRADIENTS, (g.cpu() for g in found)))
        assert [g.dtype for g in found[:4]] == [torch.float32, torch.float32, v.dtype, torch.float32]
    b, h = case.b, case.h
    slopes_bh = None if sl is None else sl.detach().expand(b, h).contiguous()
    fwd_out, lse = _forward_function(backend)(*(t.detach() for t in leaves), slopes_bh, case.causal)
    assert lse.dtype == torch.float32
    return Attention(out.detach().cpu(), lse.cpu(), grads), fwd_out.cpu()


def _run_sorted_cache(case, lq, lk, v, temperature, slopes):
    """Decode: the keys query 0 sees, then one key per query; small blocks, so sealing and merging
    (fanout 2, three levels) happen within these lengths."""
    b, h = case.b, case.h
    slopes_bh = None if slopes is None else slopes.expand(b, h).to(DEVICE)
    temperature, lq, lk, v = (t.to(DEVICE) for t in (temperature, lq, lk, v))
    cache = SortedCache(temperature, case.hkv, slopes_bh, block=4, fanout=2, levels=3)
    seen = case.tk - case.tq + 1
    cache.append(lk[..., :seen], v[..., :seen, :])
    steps = []
    for i in range(case.tq):
        if i:
            cache.append(lk[..., seen + i - 1: seen + i], v[..., seen + i - 1: seen + i, :])
        steps.append(cache.attend(lq[..., i: i + 1], temperature, slopes_bh))
    out = torch.cat(steps, dim=2)
    assert out.dtype == v.dtype and cache.length == case.tk
    return Attention(out.cpu(), None, dict.fromkeys(GRADIENTS))


@pytest.mark.parametrize("backend, dtype, case", PARAMS)
def test_contract(backend, dtype, case, monkeypatch):
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("the triton package is not installed")
    if backend == "loglinear":
        loglinear_small_blocks(monkeypatch)
    if backend.startswith("numba"):
        pytest.importorskip("numba", reason="the numba package (the cpu extra) is not installed")
        if backend == "numba_dense":
            from tauformer_kernels import attention_numba

            monkeypatch.setattr(attention_numba, "DENSE_MAX_QUERIES", 1 << 30)
            backend = "numba"
    lq, lk, v, temperature, slopes, dout = inputs(case, dtype)
    dout = dout if case.grads and backend != "sorted_cache" else None
    exact = oracle(lq, lk, v, temperature, slopes, case.causal, dout)
    naive = oracle(lq, lk, v, temperature, slopes, case.causal, dout, exact=False)
    check = functools.partial(flash_close, exact=exact, naive=naive, dtype=dtype, temperature=case.temperature, v=v,
                              dout=dout)
    if backend == "sorted_cache":
        failures = check(_run_sorted_cache(case, lq, lk, v, temperature, slopes), names=("out",))
    else:
        got, fwd_out = _run_backend(backend, case, lq, lk, v, temperature, slopes, dout)
        failures = check(got) + [f"forward function {f}" for f in check(got._replace(out=fwd_out), names=("out",))]
    assert not failures, "\n".join(failures)
