"""The `torch.ops.tauformer.*` operators: what torch.compile, autograd and every caller go through.

Two layers:
- Backend ops (`custom_op`, each with a fake implementation and autograd): `lambda_fwd`/`lambda_bwd`
  and `attention_fwd`/`attention_bwd`. Their `backend` argument is already concrete ("reference",
  "triton", "loglinear") and picks that backend's pair of functions (docs/internal-contract.md).
- Public ops, CompositeImplicitAutograd: `taumode_lambda`, `taumode_attention`,
  `taumode_attention_from_lambda`. They check shapes, resolve `backend="auto"`, broadcast the per-head
  parameters and call the backend ops, so autograd and tracing see only the backend ops.

Eager inference (no input needs a gradient, nothing traces) skips the op layers and calls the same
functions directly (`eager_inference`): torch.library's Python dispatch costs ~70 µs per layer on CPU,
which is most of a decode step's λ projection and several times its attention over a sorted cache.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends, reference, validation


# ----------------------------------------------------------------------------------------------------
# Backend functions, imported lazily so that the package imports without triton
# ----------------------------------------------------------------------------------------------------

def _lambda_forward(backend: str):
    if backend == "triton":
        from .lambda_triton import lambda_fwd_triton

        return lambda_fwd_triton
    return reference.lambda_fwd_reference


def _lambda_backward_fn(backend: str):
    if backend == "triton":
        from .lambda_triton_backward import lambda_bwd_triton

        return lambda_bwd_triton
    return reference.lambda_bwd_reference


def _attention_forward(backend: str):
    if backend == "triton":
        from .attention_triton import attention_fwd_triton

        return attention_fwd_triton
    if backend == "loglinear":
        from .loglinear import attention_fwd_loglinear

        return attention_fwd_loglinear
    return reference.attention_fwd_chunked


def _attention_backward_fn(backend: str):
    if backend == "triton":
        from .attention_triton_backward import attention_bwd_triton

        return attention_bwd_triton
    if backend == "loglinear":
        from .loglinear import attention_bwd_loglinear

        return attention_bwd_loglinear
    return reference.attention_bwd_chunked


def lambda_forward(x: Tensor, laplacian: Tensor, tau: Tensor, eps: float, backend: str, check_finite: bool = False,
                   name: str = "x") -> Tensor:
    """Every λ forward runs this, through the op or directly: the checks that read values (they need real
    tensors, so they live here and not in the traced composite: under torch.compile the op's body still
    runs eagerly), then the backend's function."""
    validation.check_lambda_values(name, x, laplacian, tau, check_finite)
    return _lambda_forward(backend)(x, laplacian, tau, eps)


def attention_forward(lq: Tensor, lk: Tensor, v: Tensor, temperature: Tensor, alibi_slopes: Optional[Tensor],
                      is_causal: bool, backend: str, check_finite: bool = False) -> tuple[Tensor, Tensor]:
    """Every attention forward runs this: the value checks (as in lambda_forward), then the backend."""
    validation.check_attention_values(lq, lk, v, temperature, alibi_slopes, check_finite)
    return _attention_forward(backend)(lq, lk, v, temperature, alibi_slopes, is_causal)


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
    return lambda_forward(x, laplacian, tau, eps, backend, check_finite, name)


@lambda_fwd.register_fake
def _(x, laplacian, tau, eps, backend, check_finite, name):
    return x.new_empty(x.shape[:-1], dtype=reference.compute_dtype(x))


@torch.library.custom_op("tauformer::lambda_bwd", mutates_args=())
def lambda_bwd(
    dlam: Tensor, x: Tensor, laplacian: Tensor, tau: Tensor, eps: float, backend: str, laplacian_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dtau = _lambda_backward_fn(backend)(dlam, x, laplacian, tau, eps)
    if laplacian_grad:
        dlap = reference.lambda_laplacian_grad(dlam, x, laplacian, tau, eps).to(laplacian.dtype)
    else:
        dlap = torch.zeros_like(laplacian)
    return dx, dtau, dlap


@lambda_bwd.register_fake
def _(dlam, x, laplacian, tau, eps, backend, laplacian_grad):
    return torch.empty_like(x), torch.empty_like(tau), torch.empty_like(laplacian)


def _lambda_setup_context(ctx, inputs, output):
    x, laplacian, tau, eps, backend, _, _ = inputs
    ctx.save_for_backward(x, laplacian, tau)
    ctx.eps, ctx.backend = eps, backend


def _lambda_backward(ctx, dlam):
    x, laplacian, tau = ctx.saved_tensors
    dx, dtau, dlap = lambda_bwd(dlam.contiguous(), x, laplacian, tau, ctx.eps, ctx.backend, ctx.needs_input_grad[1])
    return dx, (dlap if ctx.needs_input_grad[1] else None), dtau, None, None, None, None


lambda_fwd.register_autograd(_lambda_backward, setup_context=_lambda_setup_context)


@torch.library.custom_op("tauformer::attention_fwd", mutates_args=())
def attention_fwd(
    lq: Tensor, lk: Tensor, v: Tensor, temperature: Tensor, alibi_slopes: Optional[Tensor], is_causal: bool, backend: str,
    check_finite: bool,
) -> tuple[Tensor, Tensor]:
    return attention_forward(lq, lk, v, temperature, alibi_slopes, is_causal, backend, check_finite)


@attention_fwd.register_fake
def _(lq, lk, v, temperature, alibi_slopes, is_causal, backend, check_finite):
    b, h, tq = lq.shape
    return v.new_empty(b, h, tq, v.shape[-1]), lq.new_empty(b, h, tq)


@torch.library.custom_op("tauformer::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor, lq: Tensor, lk: Tensor, v: Tensor, out: Tensor, lse: Tensor, temperature: Tensor,
    alibi_slopes: Optional[Tensor], is_causal: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dlq, dlk, dv, dtemp, dalibi = _attention_backward_fn(backend)(
        dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal
    )
    dlq, dlk = reference.remove_translation(dlq, dlk)
    # custom ops cannot return None: without slopes the slope gradient is an empty tensor
    return dlq, dlk, dv, dtemp, (lq.new_empty(0) if dalibi is None else dalibi)


@attention_bwd.register_fake
def _(dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal, backend):
    dalibi = lq.new_empty(0) if alibi_slopes is None else torch.empty_like(alibi_slopes)
    return torch.empty_like(lq), torch.empty_like(lk), torch.empty_like(v), torch.empty_like(temperature), dalibi


def _attention_setup_context(ctx, inputs, output):
    lq, lk, v, temperature, alibi_slopes, is_causal, backend, _ = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(lq, lk, v, out, lse, temperature, alibi_slopes)
    ctx.is_causal, ctx.backend = is_causal, backend


def _attention_backward(ctx, dout, _dlse):
    lq, lk, v, out, lse, temperature, alibi_slopes = ctx.saved_tensors
    dlq, dlk, dv, dtemp, dalibi = attention_bwd(
        dout.contiguous(), lq, lk, v, out, lse, temperature, alibi_slopes, ctx.is_causal, ctx.backend
    )
    return dlq, dlk, dv, dtemp, (dalibi if alibi_slopes is not None else None), None, None, None


attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup_context)


# ----------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------

_lib = torch.library.Library("tauformer", "FRAGMENT")

_lib.define("taumode_lambda(Tensor x, Tensor laplacian, Tensor tau, float eps=1e-06, str backend='auto', "
            "bool check_finite=False) -> Tensor")
_lib.define(
    "taumode_attention_from_lambda(Tensor lq, Tensor lk, Tensor v, Tensor temperature, bool is_causal=True, "
    "Tensor? alibi_slopes=None, str backend='auto', bool check_finite=False) -> Tensor"
)
_lib.define(
    "taumode_attention(Tensor q, Tensor k, Tensor v, Tensor laplacian, Tensor tau, Tensor temperature, "
    "float eps=1e-06, bool is_causal=True, Tensor? alibi_slopes=None, str backend='auto', "
    "bool check_finite=False) -> Tensor"
)


def per_head(value: Tensor, heads: int, dtype: torch.dtype) -> Tensor:
    """A 0-dim or (heads,) tensor as a contiguous (heads,) tensor of `dtype` (differentiable)."""
    return value.to(dtype).expand(heads).contiguous()


def _lambda_of_heads(x: Tensor, laplacian: Tensor, tau_heads: Tensor, eps: float, backend: str,
                     check_finite: bool, name: str) -> Tensor:
    """λ of x (B, Hx, T, F) with one tau per head of x."""
    lam_backend = backends.resolve_lambda_backend(backend, x.device, x.dtype)
    dt = reference.compute_dtype(x)
    if laplacian.dtype != dt:
        laplacian = laplacian.to(dt)
    if eager_inference(x, laplacian, tau_heads):
        return lambda_forward(x, laplacian, tau_heads, eps, lam_backend, check_finite, name)
    return lambda_fwd(x, laplacian, tau_heads, eps, lam_backend, check_finite, name)


def taumode_lambda_composite(x, laplacian, tau, eps=1e-6, backend="auto", check_finite=False):
    validation.check_tensor("x", x)
    validation.check_eps(eps)
    validation.require(x.dim() >= 1, "x must have at least one dimension (the head dim F)")
    validation.check_laplacian(laplacian, x.shape[-1])
    validation.check_same_device(x=x, laplacian=laplacian, tau=tau)
    dt = reference.compute_dtype(x)
    if x.dim() >= 3:  # (..., H, T, F): tau is a scalar or one per head
        heads = x.shape[-3]
        validation.check_per_head("tau", tau, heads, "one per head of x")
        x4 = x if x.dim() == 4 else x.reshape(-1, heads, x.shape[-2], x.shape[-1])
    else:
        validation.check_per_head("tau", tau, 1, "a scalar for x with fewer than 3 dimensions")
        x4 = x.reshape(1, 1, -1, x.shape[-1])
        heads = 1
    # expanded, not copied: the references broadcast it, the Triton launcher makes it contiguous
    tau_heads = (tau if tau.dtype == dt else tau.to(dt)).expand(heads)
    lam = _lambda_of_heads(x4, laplacian, tau_heads, eps, backend, check_finite, "x")
    return lam if x4 is x else lam.reshape(x.shape[:-1])


def taumode_attention_from_lambda_composite(lq, lk, v, temperature, is_causal=True, alibi_slopes=None, backend="auto",
                                            check_finite=False):
    validation.check_attention_shapes(lq, lk, v, names=("lq", "lk"), is_causal=is_causal, head_dim=False)
    b, h = lq.shape[:2]
    validation.check_per_head("temperature", temperature, h, "one per query head")
    validation.check_alibi(alibi_slopes, b, h)
    validation.check_same_device(lq=lq, temperature=temperature, alibi_slopes=alibi_slopes)
    dt = reference.compute_dtype(lq)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (lq, lk, v, temperature, alibi_slopes))
    attn_backend = backends.resolve_attention_backend(backend, v.device, v.dtype, lk.shape[-1], needs_grad)
    slopes = None if alibi_slopes is None else alibi_slopes.to(dt).expand(b, h).contiguous()
    args = (lq.to(dt), lk.to(dt), v, per_head(temperature, h, dt), slopes, is_causal)
    if eager_inference(*args[:5]):
        return attention_forward(*args, attn_backend, check_finite)[0]
    return attention_fwd(*args, attn_backend, check_finite)[0]


def taumode_attention_composite(q, k, v, laplacian, tau, temperature, eps=1e-6, is_causal=True, alibi_slopes=None,
                                backend="auto", check_finite=False):
    validation.check_attention_shapes(q, k, v, names=("q", "k"), is_causal=is_causal, head_dim=True)
    validation.check_eps(eps)
    validation.check_laplacian(laplacian, q.shape[-1])
    h, hkv = q.shape[1], k.shape[1]
    validation.check_per_head("tau", tau, hkv, "one per kv head, shared by the query heads of its group")
    validation.check_same_device(q=q, laplacian=laplacian, tau=tau)
    tau_kv = per_head(tau, hkv, reference.compute_dtype(q))
    lq = _lambda_of_heads(q, laplacian, tau_kv.repeat_interleave(h // hkv), eps, backend, check_finite, "q")
    lk = _lambda_of_heads(k, laplacian, tau_kv, eps, backend, check_finite, "k")
    return taumode_attention_from_lambda_composite(lq, lk, v, temperature, is_causal, alibi_slopes, backend,
                                                   check_finite)


_lib.impl("taumode_lambda", taumode_lambda_composite, "CompositeImplicitAutograd")
_lib.impl("taumode_attention_from_lambda", taumode_attention_from_lambda_composite, "CompositeImplicitAutograd")
_lib.impl("taumode_attention", taumode_attention_composite, "CompositeImplicitAutograd")
