"""Bad input on every backend and both entry points (the Python functions and torch.ops.tauformer.*): a
ValueError or TypeError whose message names the argument, never a silent answer or a crash inside a backend.
Also the silent-wrong-number cases: NaN through the Triton λ, bf16 in the interpreter, float64 at long
context, negative slopes on the Triton fast path."""
import importlib.util

import pytest
import torch
from helpers import NUMBA, oracle_attention, per_head, random_heads, relative_error

from tauformer_kernels import (
    chain_laplacian,
    reference,
    taumode_attention,
    taumode_attention_from_lambda,
    taumode_lambda,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["reference", "loglinear", NUMBA] + (["triton"] if HAS_TRITON else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton backend's device (else the interpreter)


def _good():
    q, k, v = random_heads(2, 4, 2, 6, 6, 8, 8, dtype=torch.float32, device=DEVICE)
    return dict(q=q, k=k, v=v, laplacian=chain_laplacian(8).to(DEVICE), tau=torch.ones(2, device=DEVICE),
                temperature=torch.full((4,), 0.1, device=DEVICE), eps=1e-6, is_causal=True, alibi_slopes=None,
                check_finite=False)


def _nan_at(t):
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


# (id, changes to _good(), error type, the argument the message must name)
ATTENTION_CASES = [
    ("q 3-D", lambda a: dict(q=a["q"][0]), ValueError, "q"),
    ("q int", lambda a: dict(q=a["q"].int(), k=a["k"].int()), TypeError, "q"),
    ("k batch", lambda a: dict(k=a["k"][:1], v=a["v"][:1]), ValueError, "batch"),
    ("k heads", lambda a: dict(k=torch.randn(2, 3, 6, 8, device=DEVICE), v=torch.randn(2, 3, 6, 8, device=DEVICE)),
     ValueError, "kv heads"),
    ("k no heads", lambda a: dict(k=torch.randn(2, 0, 6, 8, device=DEVICE), v=torch.randn(2, 0, 6, 8, device=DEVICE)),
     ValueError, "kv heads"),
    ("k head dim", lambda a: dict(k=a["k"][..., :4]), ValueError, "head dim"),
    ("k dtype", lambda a: dict(k=a["k"].double()), TypeError, "dtype"),
    ("v length", lambda a: dict(v=a["v"][:, :, :5]), ValueError, "v"),
    ("v 3-D", lambda a: dict(v=a["v"][0]), ValueError, "v"),
    ("v dtype", lambda a: dict(v=a["v"].double()), TypeError, "dtype"),
    ("Tq > Tk", lambda a: dict(q=torch.randn(2, 4, 7, 8, device=DEVICE)), ValueError, "Tq <= Tk"),
    ("Tk = 0", lambda a: dict(k=torch.randn(2, 2, 0, 8, device=DEVICE), v=torch.randn(2, 2, 0, 8, device=DEVICE)),
     ValueError, "k has no keys but q has 6 queries per head"),
    ("laplacian size", lambda a: dict(laplacian=torch.eye(7, device=DEVICE)), ValueError, "laplacian"),
    ("laplacian 1-D", lambda a: dict(laplacian=torch.ones(8, device=DEVICE)), ValueError, "laplacian"),
    ("laplacian int", lambda a: dict(laplacian=torch.eye(8, dtype=torch.int64, device=DEVICE)),
     TypeError, "laplacian"),
    ("laplacian device", lambda a: dict(laplacian=torch.eye(8, device="meta")), ValueError, "laplacian on meta"),
    ("temperature 0", lambda a: dict(temperature=torch.zeros(4, device=DEVICE)), ValueError, "temperature must be > 0"),
    ("temperature < 0", lambda a: dict(temperature=torch.tensor([0.1, -1.0, 0.1, 0.1], device=DEVICE)),
     ValueError, "temperature must be > 0"),
    ("temperature nan", lambda a: dict(temperature=_nan_at(torch.ones(4, device=DEVICE))),
     ValueError, "temperature must be > 0"),
    ("temperature shape", lambda a: dict(temperature=torch.ones(3, device=DEVICE)),
     ValueError, "temperature must be a float or a tensor of shape (4,)"),
    ("temperature int", lambda a: dict(temperature=torch.ones(4, dtype=torch.int64, device=DEVICE)),
     TypeError, "temperature"),
    ("tau < 0", lambda a: dict(tau=torch.tensor([1.0, -0.5], device=DEVICE)), ValueError, "tau must be > 0"),
    ("tau nan", lambda a: dict(tau=_nan_at(torch.ones(4, device=DEVICE))[:2].contiguous() * float("nan")),
     ValueError, "tau must be > 0"),
    ("tau shape", lambda a: dict(tau=torch.ones(4, device=DEVICE)),
     ValueError, "tau must be a float or a tensor of shape (2,)"),
    ("eps < 0", lambda a: dict(eps=-1.0), ValueError, "eps"),
    ("eps nan", lambda a: dict(eps=float("nan")), ValueError, "eps"),
    ("eps inf", lambda a: dict(eps=float("inf")), ValueError, "eps"),
    ("alibi shape", lambda a: dict(alibi_slopes=torch.ones(3, device=DEVICE)), ValueError, "alibi_slopes"),
    ("alibi int", lambda a: dict(alibi_slopes=torch.ones(4, dtype=torch.int64, device=DEVICE)),
     TypeError, "alibi_slopes"),
    ("alibi device", lambda a: dict(alibi_slopes=torch.ones(4, device="meta")), ValueError, "alibi_slopes on meta"),
    ("q nan, checked", lambda a: dict(q=_nan_at(a["q"]), check_finite=True), ValueError, "q contains non-finite"),
    ("k inf, checked", lambda a: dict(k=a["k"] / 0, check_finite=True), ValueError, "k contains non-finite"),
    ("v nan, checked", lambda a: dict(v=_nan_at(a["v"]), check_finite=True), ValueError, "v contains non-finite"),
    ("laplacian nan, checked", lambda a: dict(laplacian=_nan_at(a["laplacian"]), check_finite=True),
     ValueError, "laplacian contains non-finite"),
    ("alibi inf, checked",
     lambda a: dict(alibi_slopes=torch.full((4,), float("inf"), device=DEVICE), check_finite=True),
     ValueError, "alibi_slopes contains non-finite"),
]
PYTHON_ONLY_CASES = [  # arguments that are not tensors: the ops' schemas refuse them themselves
    ("q not a tensor", lambda a: dict(q=a["q"].tolist()), TypeError, "q must be a torch.Tensor"),
    ("temperature float 0", lambda a: dict(temperature=0.0), ValueError, "temperature must be > 0"),
    ("temperature str", lambda a: dict(temperature="0.1"), TypeError, "temperature"),
    ("tau float < 0", lambda a: dict(tau=-1.0), ValueError, "tau must be > 0"),
    ("backend name", lambda a: dict(backend="cuda"), ValueError, "backend must be one of"),
    # issue #29: bool("False") is True
    ("is_causal str", lambda a: dict(is_causal="False"), TypeError, "is_causal must be a bool, got str 'False'"),
    ("check_finite int", lambda a: dict(check_finite=1), TypeError, "check_finite must be a bool"),
]


def _call(args, backend, via_ops):
    if via_ops:
        return torch.ops.tauformer.taumode_attention(
            args["q"], args["k"], args["v"], args["laplacian"], args["tau"], args["temperature"], args["eps"],
            args["is_causal"], args["alibi_slopes"], backend, args["check_finite"])
    return taumode_attention(**{**args, "backend": args.get("backend", backend)})


@pytest.mark.parametrize("via_ops", [False, True], ids=["function", "torch.ops"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ATTENTION_CASES + PYTHON_ONLY_CASES, ids=lambda c: c[0])
def test_bad_attention_input_names_the_argument(case, backend, via_ops):
    name, change, error, says = case
    if via_ops and case in PYTHON_ONLY_CASES:
        pytest.skip("not a tensor: the op's schema refuses it")
    args = _good()
    args.update(change(args))
    with pytest.raises(error) as info:
        _call(args, backend, via_ops)
    assert says in str(info.value), str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_lambda_and_from_lambda_input(backend):
    lq, lk, v = (torch.rand(1, 2, 4, device=DEVICE), torch.rand(1, 1, 4, device=DEVICE),
                 torch.randn(1, 1, 4, 3, device=DEVICE))
    cases = [
        (lambda: taumode_attention_from_lambda(lq[0], lk, v, backend=backend), ValueError, "lq must have 3 dimensions"),
        (lambda: taumode_attention_from_lambda(lq, lk.double(), v, backend=backend),
         TypeError, "lq and lk must share a dtype"),
        (lambda: taumode_attention_from_lambda(lq, lk / 0, v, backend=backend, check_finite=True),
         ValueError, "lk contains non-finite"),
        (lambda: taumode_attention_from_lambda(lq, lk, v, temperature=torch.tensor(-1.0), backend=backend),
         ValueError, "temperature must be > 0"),
        (lambda: torch.ops.tauformer.taumode_attention_from_lambda(lq, lk, v, torch.tensor(-2.0), True, None,
                                                                   backend, False),
         ValueError, "temperature must be > 0"),
        (lambda: taumode_lambda(torch.randn(2, 3, 4, 8), torch.eye(6), backend=backend),
         ValueError, "laplacian must be F×F with F = 8"),
        (lambda: taumode_lambda([1.0, 2.0], torch.eye(2), backend=backend), TypeError, "x must be a torch.Tensor"),
        (lambda: taumode_lambda(torch.randn(3, 8), chain_laplacian(8), tau=torch.tensor(-0.5), backend=backend),
         ValueError, "tau must be > 0"),
        (lambda: torch.ops.tauformer.taumode_lambda(torch.randn(3, 8), chain_laplacian(8), torch.tensor(-0.5), 1e-6,
                                                    backend, False),
         ValueError, "tau must be > 0"),
        (lambda: torch.ops.tauformer.taumode_lambda(torch.randn(3, 8), chain_laplacian(8), torch.tensor(1.0), -1.0,
                                                    backend, False),
         ValueError, "eps"),
        (lambda: taumode_lambda(_nan_at(torch.randn(3, 8)), chain_laplacian(8), backend=backend, check_finite=True),
         ValueError, "x contains non-finite"),
    ]
    for call, error, says in cases:
        with pytest.raises(error, match=None) as info:
            call()
        assert says in str(info.value), str(info.value)


def test_value_checks_and_check_finite_under_torch_compile():
    """The ops check values in their bodies, which run even inside a compiled graph: fullgraph=True traces
    (no graph break for check_finite), and a bad value still raises the wrapper's error."""
    a = _good()

    def attend(q, temperature, tau):
        return torch.ops.tauformer.taumode_attention(q, a["k"], a["v"], a["laplacian"], tau, temperature, 1e-6, True,
                                                     None, "auto", True)

    compiled = torch.compile(attend, fullgraph=True)
    torch.testing.assert_close(compiled(a["q"], a["temperature"], a["tau"]), attend(a["q"], a["temperature"], a["tau"]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        compiled(a["q"], -a["temperature"], a["tau"])
    with pytest.raises(ValueError, match="tau must be > 0"):
        compiled(a["q"], a["temperature"], -a["tau"])
    with pytest.raises(ValueError, match="q contains non-finite"):
        compiled(_nan_at(a["q"]), a["temperature"], a["tau"])
    public = torch.compile(lambda q: taumode_attention(q, a["k"], a["v"], a["laplacian"], temperature=0.1,
                                                       check_finite=True), fullgraph=True)
    with pytest.raises(ValueError, match="q contains non-finite"):
        public(_nan_at(a["q"]))


# ----------------------------------------------------------------------------------------------------
# Silent wrong numbers
# ----------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_lambda_keeps_nan_and_inf_rows_non_finite():
    x = torch.randn(1, 2, 70, 16, device=DEVICE)
    x[0, 0, 3, 5] = float("nan")
    x[0, 1, 60, 0] = float("inf")
    lap = chain_laplacian(16).to(DEVICE)
    lam, ref = (taumode_lambda(x, lap, backend=backend).cpu() for backend in ("triton", "reference"))
    assert torch.isnan(lam[0, 0, 3]) and torch.isnan(lam[0, 1, 60])
    assert torch.isnan(ref[0, 0, 3]) and torch.isnan(ref[0, 1, 60])
    finite = torch.isfinite(ref)
    assert finite.sum() == 138 and relative_error(lam[finite], ref[finite]) < 1e-6


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_bf16_in_the_interpreter_is_refused_without_the_emulation_and_right_with_it(monkeypatch):
    from tauformer_kernels import interpreter

    if torch.cuda.is_available():
        pytest.skip("the interpreter case")
    q, k, v = random_heads(1, 4, 2, 70, 70, 16, 16, dtype=torch.bfloat16)
    lap = chain_laplacian(16)
    assert interpreter.gpu_numerics_enabled()  # tests/conftest.py
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = taumode_attention(*leaves, lap, temperature=0.05, backend="triton")
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref = oracle_attention(*leaves64, lap.double(), per_head(1.0, 2), per_head(0.05, 4))
    assert out.dtype == torch.bfloat16 and relative_error(out, ref) < 1e-2
    dout = torch.randn_like(ref)
    grads = torch.autograd.grad(out, leaves, dout.bfloat16())
    grads64 = torch.autograd.grad(ref, leaves64, dout)
    for name, g, r in zip("qkv", grads, grads64):
        # q and k pass through sign(λq − λk): bf16 rounding of q, k moves λ by ~4e-3, so loosely
        assert relative_error(g, r) < (1e-2 if name == "v" else 0.1), name
    monkeypatch.setattr(interpreter, "_ENABLED", False)
    with pytest.raises(TypeError, match="enable_gpu_numerics"):
        taumode_attention(q, k, v, lap, temperature=0.05, backend="triton")


def test_float64_keeps_float64_accuracy_on_every_path():
    """auto takes loglinear from 1024 keys on CPU: in float64 it computes in float64 (1e-12, not fp32's 1e-7)."""
    t = 1100
    lq, lk = torch.rand(1, 2, t, dtype=torch.float64), torch.rand(1, 1, t, dtype=torch.float64)
    v = torch.randn(1, 1, t, 8, dtype=torch.float64)
    temp = torch.tensor([0.02, 0.3], dtype=torch.float64)
    slopes = torch.tensor([0.01, 0.0], dtype=torch.float64)
    ref = reference.attention_naive(lq, lk, v, temp, slopes)
    for backend in ("auto", "loglinear", "reference"):
        with torch.no_grad():
            out = taumode_attention_from_lambda(lq, lk, v, temperature=temp, alibi_slopes=slopes, backend=backend)
        assert out.dtype == torch.float64 and relative_error(out, ref) < 1e-12, backend
    leaves = [x.clone().requires_grad_() for x in (lq, lk, v, temp)]
    out = taumode_attention_from_lambda(*leaves[:3], temperature=leaves[3], backend="loglinear")
    leaves64 = [x.clone().requires_grad_() for x in (lq, lk, v, temp)]
    ref = reference.attention_naive(*leaves64)
    dout = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(out, leaves, dout), torch.autograd.grad(ref, leaves64, dout)):
        assert g.dtype == torch.float64 and relative_error(g, r) < 1e-10


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("slope", [-0.05, -1.0])
def test_negative_slopes_on_the_triton_fast_path(slope):
    """A negative slope rewards distance: |slope|·Tk past ~88 overflowed the factorised path's fixed
    reference (NaN); the kernel takes the factorised path only for slopes >= 0."""
    t = 200
    lq, lk = torch.rand(1, 2, t), torch.rand(1, 1, t)
    v = torch.randn(1, 1, t, 16)
    slopes = torch.tensor([slope, 0.02])
    on = (t.to(DEVICE) for t in (lq, lk, v, slopes))
    dlq, dlk, dv, dslopes = on
    out = taumode_attention_from_lambda(dlq, dlk, dv, temperature=0.5, alibi_slopes=dslopes, backend="triton")
    ref = reference.attention_naive(lq.double(), lk.double(), v.double(), per_head(0.5, 2), slopes.double())
    assert torch.isfinite(out).all() and relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_queries_is_an_empty_call(backend):
    """Tq = 0 or B = 0 (issue #29: an empty pack was refused with a message about a shape never passed): an
    empty output of the right shape."""
    for b, tq in ((2, 0), (0, 6)):
        q = torch.randn(b, 4, tq, 8, device=DEVICE)
        k, v = torch.randn(b, 2, 6, 8, device=DEVICE), torch.randn(b, 2, 6, 8, device=DEVICE)
        out = taumode_attention(q, k, v, chain_laplacian(8).to(DEVICE), temperature=0.1, backend=backend)
        assert out.shape == (b, 4, tq, 8)
