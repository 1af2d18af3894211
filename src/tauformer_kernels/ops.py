"""The `torch.ops.tauformer.*` operators: what torch.compile, autograd and every caller go through.

Two layers:
- Backend ops (`custom_op`, each with a fake implementation and autograd): `lambda_fwd`/`lambda_bwd` and
  `attention_fwd`/`attention_bwd`. Their `backend` argument is already concrete ("reference", "triton",
  "loglinear"); their bodies check values (they need real tensors, and a body runs eagerly even inside a
  compiled graph) and call that backend's function (backends.implementation, docs/internal-contract.md).
- Public ops, CompositeImplicitAutograd: `taumode_lambda`, `taumode_attention`,
  `taumode_attention_from_lambda`. They check shapes, resolve `backend="auto"`, broadcast the per-head
  parameters and call the backend ops, so autograd and tracing see only the backend ops.

Layouts, as the fake implementations promise them (a compiled graph asserts them; tests/kernels/test_opcheck.py
checks every op with the layouts its callers pass): λ, the attention output and its logsumexp are contiguous
(a pack's output: packed (total, H, Dv) memory); each gradient has its input's layout (torch.empty_like:
a token-major view's gradient is token-major), whatever layout the backend allocated (`_like` copies).

`direct=True` (the public Python functions pass it in eager inference, `eager_inference`): the composites
check the same values and call the backend's function themselves, without the op layers: torch.library's
Python dispatch costs ~70 µs per layer on CPU, which is most of a decode step's λ projection and several
times its attention over a sorted cache.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import backends, reference, validation, varlen


def _like(result: Tensor, t: Tensor) -> Tensor:
    """`result` in the memory layout of torch.empty_like(t) (t's strides when t is dense, else contiguous):
    itself when it has that layout already, else a copy. A gradient takes its input's layout (as autograd's
    own do), which is what the fake implementations promise: the backends allocate their results as they
    like (a token-major view of q or v gets a contiguous gradient from most of them), and a compiled graph
    asserts the promised strides. Strides of size-1 dimensions are not compared (they address nothing); a
    sparse Laplacian's gradient is left as it is (no strides)."""
    if result.layout != torch.strided or t.layout != torch.strided:
        return result
    want = torch.empty_like(t, dtype=result.dtype, device="meta")
    if all(n <= 1 or a == b for n, a, b in zip(result.shape, result.stride(), want.stride())):
        return result
    return torch.empty_like(t, dtype=result.dtype).copy_(result)


def eager_inference(*tensors: Optional[Tensor]) -> bool:
    """True when a call records no autograd graph and no tracer (torch.compile, export, fake tensors)
    sees it: then the op layers add nothing but their dispatch cost."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) is torch.Tensor and not (grad and t.requires_grad)) for t in tensors)


# ----------------------------------------------------------------------------------------------------
# Backend ops
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("tauformer::lambda_fwd", mutates_args=())
def lambda_fwd(x: Tensor, laplacian: Tensor, tau: Tensor, eps: float, backend: str, check_finite: bool,
               name: str) -> Tensor:
    validation.check_lambda_values(name, x, laplacian, tau, check_finite)
    # contiguous, whatever x's layout (the reference's λ of a token-major x is token-major)
    return backends.implementation("lambda", backend)[0](x, laplacian, tau, eps).contiguous()


@lambda_fwd.register_fake
def _(x, laplacian, tau, eps, backend, check_finite, name):
    return x.new_empty(x.shape[:-1], dtype=reference.compute_dtype(x))


@torch.library.custom_op("tauformer::lambda_bwd", mutates_args=())
def lambda_bwd(
    dlam: Tensor, x: Tensor, laplacian: Tensor, tau: Tensor, eps: float, backend: str, laplacian_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dtau = backends.implementation("lambda", backend)[1](dlam, x, laplacian, tau, eps)
    if laplacian_grad:  # every backend's: the reference's (an F×F product over all vectors)
        dlap = reference.lambda_laplacian_grad(dlam, x, laplacian, tau, eps).to(laplacian.dtype)
    else:
        dlap = torch.zeros_like(laplacian)
    return _like(dx, x), _like(dtau, tau), _like(dlap, laplacian)


@lambda_bwd.register_fake
def _(dlam, x, laplacian, tau, eps, backend, laplacian_grad):
    return torch.empty_like(x), torch.empty_like(tau), torch.empty_like(laplacian)


def _lambda_fwd_setup_context(ctx, inputs, output):
    x, laplacian, tau, eps, backend, _, _ = inputs
    ctx.save_for_backward(x, laplacian, tau)
    ctx.eps, ctx.backend = eps, backend


def _lambda_fwd_backward(ctx, dlam):
    x, laplacian, tau = ctx.saved_tensors
    dx, dtau, dlap = lambda_bwd(dlam.contiguous(), x, laplacian, tau, ctx.eps, ctx.backend, ctx.needs_input_grad[1])
    return dx, (dlap if ctx.needs_input_grad[1] else None), dtau, None, None, None, None


lambda_fwd.register_autograd(_lambda_fwd_backward, setup_context=_lambda_fwd_setup_context)


def _seqs(cu_q: Optional[Tensor], cu_k: Optional[Tensor], max_q: int, max_k: int) -> Optional[varlen.Seqs]:
    return None if cu_q is None else varlen.Seqs(cu_q, cu_k, max_q, max_k)


@torch.library.custom_op("tauformer::attention_fwd", mutates_args=())
def attention_fwd(
    lq: Tensor, lk: Tensor, v: Tensor, temperature: Tensor, alibi_slopes: Optional[Tensor], is_causal: bool,
    backend: str, check_finite: bool, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int,
) -> tuple[Tensor, Tensor]:
    validation.check_attention_values(lq, lk, v, temperature, alibi_slopes, check_finite)
    seqs = _seqs(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out, lse = backends.implementation("attention", backend)[0](lq, lk, v, temperature, alibi_slopes, is_causal, seqs)
    return (out.contiguous() if seqs is None else varlen.as_packed(out)), lse.contiguous()


@attention_fwd.register_fake
def _(lq, lk, v, temperature, alibi_slopes, is_causal, backend, check_finite, cu_q, cu_k, max_q, max_k):
    b, h, tq = lq.shape
    out = v.new_empty(b, h, tq, v.shape[-1]) if cu_q is None else varlen.empty_packed(tq, h, v.shape[-1], v)
    return out, lq.new_empty(b, h, tq)


@torch.library.custom_op("tauformer::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor, lq: Tensor, lk: Tensor, v: Tensor, out: Tensor, lse: Tensor, temperature: Tensor,
    alibi_slopes: Optional[Tensor], is_causal: bool, backend: str, cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    seqs = _seqs(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dlq, dlk, dv, dtemp, dalibi = backends.implementation("attention", backend)[1](
        dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal, seqs
    )
    if seqs is None:
        dlq, dlk = reference.remove_translation(dlq, dlk)
    else:
        dlq, dlk = varlen.remove_translation(dlq, dlk, seqs)
    # each gradient in its input's layout (like); custom ops cannot return None: without slopes the slope
    # gradient is an empty tensor
    dalibi = lq.new_empty(0) if dalibi is None else _like(dalibi, alibi_slopes)
    return _like(dlq, lq), _like(dlk, lk), _like(dv, v), _like(dtemp, temperature), dalibi


@attention_bwd.register_fake
def _(dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal, backend, cu_q, cu_k, max_q, max_k):
    dalibi = lq.new_empty(0) if alibi_slopes is None else torch.empty_like(alibi_slopes)
    return torch.empty_like(lq), torch.empty_like(lk), torch.empty_like(v), torch.empty_like(temperature), dalibi


def _attention_fwd_setup_context(ctx, inputs, output):
    lq, lk, v, temperature, alibi_slopes, is_causal, backend, _, cu_q, cu_k, max_q, max_k = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(lq, lk, v, out, lse, temperature, alibi_slopes, cu_q, cu_k)
    ctx.is_causal, ctx.backend, ctx.max_lengths = is_causal, backend, (max_q, max_k)


def _attention_fwd_backward(ctx, dout, _dlse):
    lq, lk, v, out, lse, temperature, alibi_slopes, cu_q, cu_k = ctx.saved_tensors
    dlq, dlk, dv, dtemp, dalibi = attention_bwd(
        dout.contiguous(), lq, lk, v, out, lse, temperature, alibi_slopes, ctx.is_causal, ctx.backend, cu_q, cu_k,
        *ctx.max_lengths,
    )
    return (dlq, dlk, dv, dtemp, (dalibi if alibi_slopes is not None else None)) + (None,) * 7


attention_fwd.register_autograd(_attention_fwd_backward, setup_context=_attention_fwd_setup_context)


# ----------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------

_lib = torch.library.Library("tauformer", "FRAGMENT")

_lib.define("taumode_lambda(Tensor x, Tensor laplacian, Tensor tau, float eps=1e-06, str backend='auto', "
            "bool check_finite=False) -> Tensor")
_lib.define(
    "taumode_attention_from_lambda(Tensor lq, Tensor lk, Tensor v, Tensor temperature, bool is_causal=True, "
    "Tensor? alibi_slopes=None, str backend='auto', bool check_finite=False, Tensor? cu_seqlens_q=None, "
    "Tensor? cu_seqlens_k=None, int? max_seqlen_q=None, int? max_seqlen_k=None) -> Tensor"
)
_lib.define(
    "taumode_attention(Tensor q, Tensor k, Tensor v, Tensor laplacian, Tensor tau, Tensor temperature, "
    "float eps=1e-06, bool is_causal=True, Tensor? alibi_slopes=None, str backend='auto', "
    "bool check_finite=False, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, int? max_seqlen_q=None, "
    "int? max_seqlen_k=None) -> Tensor"
)


def per_head(value: Tensor, heads: int, dtype: torch.dtype) -> Tensor:
    """A 0-dim or (heads,) tensor as a contiguous (heads,) tensor of `dtype` (differentiable)."""
    return value.to(dtype).expand(heads).contiguous()


def _lambda_inputs(x: Tensor, laplacian: Tensor, backend: str) -> tuple[Tensor, str]:
    """The Laplacian in x's compute dtype and the λ backend for x. A sparse Laplacian stays sparse (CSR) for
    the reference backend (the CPU default: for large F, nnz·T work instead of F²·T) and becomes dense for
    the Triton kernels (their x·L runs on the tensor cores)."""
    dt = reference.compute_dtype(x)
    lam_backend = backends.resolve("lambda", backend, x.device, x.dtype)
    if lam_backend == "numba" and (laplacian.layout != torch.strided or (
            backend != "numba" and x.shape[-1] > backends.CPU_NUMBA_LAMBDA_MAX_FEATURES)):
        lam_backend = "reference"  # numba's loop is dense, F² per vector: a sparse or wide L is the GEMM's
    if laplacian.layout != torch.strided:
        laplacian = laplacian.to_sparse_csr() if lam_backend == "reference" else laplacian.to_dense()
    return (laplacian if laplacian.dtype == dt else laplacian.to(dt)), lam_backend


def _attention_call(lq: Tensor, lk: Tensor, v: Tensor, temperature: Tensor, alibi_slopes: Optional[Tensor],
                    is_causal: bool, backend: str, check_finite: bool, direct: bool,
                    seqs: Optional[varlen.Seqs]) -> tuple[Callable, tuple]:
    """The checked attention call, as (function, arguments) whose first result is (B, H, Tq, Dv) (for a pack
    (1, H, total_q, Dv)): the backend's function itself when `direct` (its value checks done here), else the
    backend op. Returned rather than called, so that the caller calls the backend (docs/internal-contract.md)."""
    validation.check_attention_shapes(lq, lk, v, names=("lq", "lk"), is_causal=is_causal, head_dim=False)
    b, h = lq.shape[:2]
    batch = b if seqs is None else seqs.count  # a pack's slopes: one row per sequence
    validation.check_per_head("temperature", temperature, h, "one per query head")
    validation.check_alibi(alibi_slopes, batch, h)
    validation.check_same_device(lq=lq, temperature=temperature, alibi_slopes=alibi_slopes)
    dt = reference.compute_dtype(lq)
    needs_grad = not direct and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (lq, lk, v, temperature, alibi_slopes))
    attn_backend = backends.resolve("attention", backend, v.device, v.dtype, lk.shape[-1], needs_grad)
    slopes = None if alibi_slopes is None else alibi_slopes.to(dt).expand(batch, h).contiguous()
    args = (lq.to(dt), lk.to(dt), v, per_head(temperature, h, dt), slopes, is_causal)
    if direct:
        validation.check_attention_values(*args[:5], check_finite)
        return backends.implementation("attention", attn_backend)[0], args + (seqs,)
    lengths = (None, None, 0, 0) if seqs is None else tuple(seqs)
    return attention_fwd, args + (attn_backend, check_finite) + lengths


def _as_one_row(packed: Tensor) -> Tensor:
    """A packed (total, H[, D]) tensor as the one-row batch (1, H, total[, D]) the backends take (a view)."""
    return packed.movedim(0, 1).unsqueeze(0)


def _pack(names: tuple[str, str], q: Tensor, k: Tensor, v: Tensor, cu_q, cu_k, max_q, max_k, is_causal: bool,
          head_dim: bool) -> Optional[varlen.Seqs]:
    """The Seqs of a pack (None without offsets), after its checks: the shapes always, the offsets' values
    where max_seqlen_* is not given (one read to the host, which also finds the maxima)."""
    if cu_q is None and cu_k is None:
        return None
    validation.require(cu_q is not None and cu_k is not None, "cu_seqlens_q and cu_seqlens_k are given together")
    for name, t, ndim in ((names[0], q, 2 + head_dim), (names[1], k, 2 + head_dim), ("v", v, 3)):
        validation.check_tensor(name, t, ndim=ndim)
    validation.require(v.shape[0] == k.shape[0], lambda: f"packed v has {v.shape[0]} rows and {names[1]} "
                       f"{k.shape[0]}: they must match")
    varlen.check_offsets_shape(cu_q, cu_k, q.shape[0], k.shape[0], q.device)
    if max_q is None or max_k is None:
        max_q, max_k = varlen.check_offsets_values(cu_q, cu_k, q.shape[0], k.shape[0], is_causal)
    return varlen.Seqs(cu_q, cu_k, int(max_q), int(max_k))


def taumode_lambda_composite(x, laplacian, tau, eps=1e-6, backend="auto", check_finite=False, *, direct=False):
    validation.check_tensor("x", x)
    validation.check_eps(eps)
    validation.require(x.dim() >= 1, "x must have at least one dimension (the head dim F)")
    validation.check_laplacian(laplacian, x.shape[-1])
    validation.check_same_device(x=x, laplacian=laplacian, tau=tau)
    dt = reference.compute_dtype(x)
    per_vector = isinstance(tau, Tensor) and tau.dim() > 0 and tuple(tau.shape) == tuple(x.shape[:-1])
    if x.dim() >= 3:  # (..., H, T, F): tau is a scalar, one per head or one per vector
        heads = x.shape[-3]
        if not per_vector:
            validation.check_per_head("tau", tau, heads, f"one per head of x, or {tuple(x.shape[:-1])}: one per vector")
        x4 = x if x.dim() == 4 else x.reshape(-1, heads, x.shape[-2], x.shape[-1])
    else:
        if not per_vector:
            validation.check_per_head("tau", tau, 1, f"a scalar, or {tuple(x.shape[:-1])}: one per vector")
        x4 = x.reshape(1, 1, -1, x.shape[-1])
        heads = 1
    tau = tau if tau.dtype == dt else tau.to(dt)
    # per head: expanded, not copied (the references broadcast it, the Triton launcher makes it contiguous)
    tau_heads = tau.reshape(x4.shape[:-1]) if per_vector else tau.expand(heads)
    laplacian, lam_backend = _lambda_inputs(x4, laplacian, backend)
    if direct:
        validation.check_lambda_values("x", x4, laplacian, tau_heads, check_finite)
        lam = backends.implementation("lambda", lam_backend)[0](x4, laplacian, tau_heads, eps)
    else:
        lam = lambda_fwd(x4, laplacian, tau_heads, eps, lam_backend, check_finite, "x")
    return lam if x4 is x else lam.reshape(x.shape[:-1])


def taumode_attention_from_lambda_composite(lq, lk, v, temperature, is_causal=True, alibi_slopes=None, backend="auto",
                                            check_finite=False, cu_seqlens_q=None, cu_seqlens_k=None,
                                            max_seqlen_q=None, max_seqlen_k=None, *, direct=False):
    seqs = _pack(("lq", "lk"), lq, lk, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, False)
    if seqs is not None:
        lq, lk, v = _as_one_row(lq), _as_one_row(lk), _as_one_row(v)
    attention, args = _attention_call(lq, lk, v, temperature, alibi_slopes, is_causal, backend, check_finite, direct,
                                      seqs)
    out = attention(*args)[0]
    return out if seqs is None else out[0].movedim(1, 0)  # (total_q, H, Dv), packed memory


def taumode_attention_composite(q, k, v, laplacian, tau, temperature, eps=1e-6, is_causal=True, alibi_slopes=None,
                                backend="auto", check_finite=False, cu_seqlens_q=None, cu_seqlens_k=None,
                                max_seqlen_q=None, max_seqlen_k=None, *, direct=False):
    seqs = _pack(("q", "k"), q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, True)
    if seqs is not None:
        q, k, v = _as_one_row(q), _as_one_row(k), _as_one_row(v)
    validation.check_attention_shapes(q, k, v, names=("q", "k"), is_causal=is_causal, head_dim=True)
    validation.check_eps(eps)
    validation.check_laplacian(laplacian, q.shape[-1])
    h, hkv = q.shape[1], k.shape[1]
    validation.check_per_head("tau", tau, hkv, "one per kv head, shared by the query heads of its group")
    validation.check_same_device(q=q, laplacian=laplacian, tau=tau)
    tau_kv = per_head(tau, hkv, reference.compute_dtype(q))
    tau_q = tau_kv.repeat_interleave(h // hkv)
    laplacian, lam_backend = _lambda_inputs(q, laplacian, backend)
    if direct:
        validation.check_lambda_values("q", q, laplacian, tau_q, check_finite)
        validation.check_lambda_values("k", k, laplacian, tau_kv, check_finite)
        lam_forward = backends.implementation("lambda", lam_backend)[0]
        lq, lk = lam_forward(q, laplacian, tau_q, eps), lam_forward(k, laplacian, tau_kv, eps)
    else:
        lq = lambda_fwd(q, laplacian, tau_q, eps, lam_backend, check_finite, "q")
        lk = lambda_fwd(k, laplacian, tau_kv, eps, lam_backend, check_finite, "k")
    attention, args = _attention_call(lq, lk, v, temperature, alibi_slopes, is_causal, backend, check_finite, direct,
                                      seqs)
    out = attention(*args)[0]
    return out if seqs is None else out[0].movedim(1, 0)  # (total_q, H, Dv), packed memory


_lib.impl("taumode_lambda", taumode_lambda_composite, "CompositeImplicitAutograd")
_lib.impl("taumode_attention_from_lambda", taumode_attention_from_lambda_composite, "CompositeImplicitAutograd")
_lib.impl("taumode_attention", taumode_attention_composite, "CompositeImplicitAutograd")
