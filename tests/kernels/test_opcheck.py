"""torch.library.opcheck on every op of ops.py, with the layouts its callers really pass.

opcheck runs an op eagerly and through its fake implementation and compares the two (shapes, strides and
storage offsets: a compiled graph asserts the strides the fake promises, and `--compile` training died on
a mismatch, #29), checks its schema and autograd registration, and traces it with AOT autograd
(dynamic shapes) to compare outputs and gradients with eager. Layouts:

- contiguous: (B, H, T, F) tensors of their own;
- token_major: q.transpose(1, 2) of a (B, T, H, F) tensor, as TauGPT and Hugging Face's attention modules
  hand q, k and v over (and λ computed from them);
- cache: decode's slices of a preallocated token-major cache, (B, C, H, F)[:, :T].transpose(1, 2) (not
  dense: a gradient of it is contiguous);
- packed: (N, H, F) rows with int32 cu_seqlens and the max_seqlen a compiled model passes (the public
  ops), or the (1, H, N, ·) views of them the public ops hand the backend ops.

Every backend runs on the CPU: "reference", "loglinear" and "numba" as they are, "triton" in Triton's interpreter
(its body runs on real tensors; opcheck's tracing goes through the fake implementation, not the kernel).
"""
import pytest
import torch
from helpers import NUMBA

from tauformer_kernels import chain_laplacian, ops
from tauformer_kernels.backends import triton_available, triton_interpreting

B, H, HKV, T, F = 2, 4, 2, 7, 8
LENGTHS = (3, 5, 1)  # the packed rows: three sequences of N = 9 tokens
LAYOUTS = ("contiguous", "token_major", "cache", "packed")

triton_runs = triton_available() and (torch.cuda.is_available() or triton_interpreting())
LAMBDA_BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(not triton_runs, reason="no triton"))]
ATTENTION_BACKENDS = LAMBDA_BACKENDS + ["loglinear", NUMBA]


def heads(layout: str, heads: int, *feature: int, grad: bool = False) -> torch.Tensor:
    """A (B, heads, T, *feature) tensor in `layout` (packed: (N, heads, *feature)), random, a leaf."""
    if layout == "contiguous":
        t = torch.randn(B, heads, T, *feature)
    elif layout == "token_major":
        t = torch.randn(B, T, heads, *feature).transpose(1, 2)
    elif layout == "cache":
        t = torch.randn(B, T + 5, heads, *feature)[:, :T].transpose(1, 2)
    else:
        t = torch.randn(sum(LENGTHS), heads, *feature)
    if layout in ("token_major", "cache"):
        assert not t.is_contiguous()
    return t.detach().requires_grad_(grad)


def lambdas(layout: str, heads_: int, grad: bool = False) -> torch.Tensor:
    """λ in [0, 1), shaped and laid out as heads() makes them."""
    return heads(layout, heads_, grad=False).uniform_().requires_grad_(grad)


def offsets() -> dict:
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return dict(cu_seqlens_q=cu, cu_seqlens_k=cu.clone(), max_seqlen_q=max(LENGTHS), max_seqlen_k=max(LENGTHS))


def one_row(t: torch.Tensor) -> torch.Tensor:
    """The public ops' view of a packed (N, H, ·) tensor for the backend ops (ops._as_one_row)."""
    return ops._as_one_row(t)


def per_head(value: float, n: int, grad: bool) -> torch.Tensor:
    return (value * torch.linspace(1.0, 1.5, n)).requires_grad_(grad)


def slopes(count: int, grad: bool) -> torch.Tensor:
    return (0.05 + 0.2 * torch.rand(count, H)).requires_grad_(grad)


def opcheck(op, args, kwargs=None, backend="reference"):
    """All of opcheck's tests; for the Triton backend all but the AOT trace (which runs the op a few times
    more: minutes of interpreted kernels), so Triton's results are compared with the fake's in eager."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op, args, kwargs or {}, test_utils=utils if backend == "triton" else
                          utils + ("test_aot_dispatch_dynamic",))


# ----------------------------------------------------------------------------------------------------
# Backend ops
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", LAMBDA_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_lambda_ops(layout, backend):
    x = heads(layout, H, F, grad=True)
    x4 = one_row(x) if layout == "packed" else x
    lap, tau = chain_laplacian(F), per_head(0.5, H, grad=True)
    opcheck(torch.ops.tauformer.lambda_fwd.default, (x4, lap, tau, 1e-6, backend, False, "x"), backend=backend)
    dlam = torch.randn(x4.shape[:-1])
    for laplacian_grad in (False, True):
        # backward: dx in x's layout (the fake's torch.empty_like), whatever the backend allocated
        opcheck(torch.ops.tauformer.lambda_bwd.default,
                (dlam, x4.detach(), lap, tau.detach(), 1e-6, backend, laplacian_grad), backend=backend)


def _attention_inputs(layout: str, alibi: bool, grad: bool):
    """(lq, lk, v, temperature, slopes, offsets-as-backend-arguments) for the backend ops."""
    lq, lk, v = lambdas(layout, H, grad), lambdas(layout, HKV, grad), heads(layout, HKV, F, grad=grad)
    lengths = (None, None, 0, 0)
    if layout == "packed":
        lq, lk, v = one_row(lq), one_row(lk), one_row(v)
        lengths = tuple(offsets().values())
    count = len(LENGTHS) if layout == "packed" else B  # a pack's slopes: one row per sequence
    return lq, lk, v, per_head(0.05, H, grad), (slopes(count, grad) if alibi else None), lengths


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("layout, alibi", [("contiguous", False), ("token_major", True), ("cache", False),
                                           ("packed", True)])
def test_attention_ops(layout, alibi, backend):
    lq, lk, v, temp, sl, lengths = _attention_inputs(layout, alibi, grad=True)
    fwd = torch.ops.tauformer.attention_fwd.default
    opcheck(fwd, (lq, lk, v, temp, sl, True, backend, False, *lengths), backend=backend)
    with torch.no_grad():
        out, lse = fwd(lq, lk, v, temp, sl, True, backend, False, *lengths)
    detached = [None if t is None else t.detach() for t in (lq, lk, v, temp, sl)]
    dout = torch.randn_like(out)  # the autograd function passes dout.contiguous()
    opcheck(torch.ops.tauformer.attention_bwd.default,
            (dout, *detached[:3], out, lse, *detached[3:], True, backend, *lengths), backend=backend)


# ----------------------------------------------------------------------------------------------------
# Public ops (CompositeImplicitAutograd: opcheck traces them down to the backend ops)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", LAMBDA_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "token_major", "cache"])
def test_public_lambda(layout, backend):
    x = heads(layout, H, F, grad=True)
    opcheck(torch.ops.tauformer.taumode_lambda.default, (x, chain_laplacian(F), per_head(0.5, H, grad=True)),
            dict(eps=1e-6, backend=backend), backend=backend)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_public_attention(layout, backend):
    q, k, v = heads(layout, H, F, grad=True), heads(layout, HKV, F, grad=True), heads(layout, HKV, F, grad=True)
    count = len(LENGTHS) if layout == "packed" else B
    kwargs = dict(eps=1e-6, is_causal=True, alibi_slopes=slopes(count, True), backend=backend,
                  **(offsets() if layout == "packed" else {}))
    opcheck(torch.ops.tauformer.taumode_attention.default,
            (q, k, v, chain_laplacian(F), per_head(0.5, HKV, grad=True), per_head(0.05, H, grad=True)), kwargs,
            backend=backend)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_public_attention_from_lambda(layout, backend):
    lq, lk, v = lambdas(layout, H, grad=True), lambdas(layout, HKV, grad=True), heads(layout, HKV, F, grad=True)
    kwargs = dict(is_causal=True, backend=backend, **(offsets() if layout == "packed" else {}))
    opcheck(torch.ops.tauformer.taumode_attention_from_lambda.default, (lq, lk, v, per_head(0.05, H, grad=True)),
            kwargs, backend=backend)


def test_every_op_is_checked():
    """The ops this file checks are every op the package registers in the tauformer namespace: a new op
    without an opcheck here fails this test."""
    checked = {"lambda_fwd", "lambda_bwd", "attention_fwd", "attention_bwd", "taumode_lambda", "taumode_attention",
               "taumode_attention_from_lambda"}
    registered = {name for name in dir(torch.ops.tauformer) if isinstance(getattr(torch.ops.tauformer, name),
                                                                          torch._ops.OpOverloadPacket)}
    assert registered == checked
