"""Argument checks: messages name the argument and the shapes.

Shape, dtype and device checks work on fake tensors too: the public ops run them, so they also run while
`torch.compile` traces. Checks that read values (tau and temperature > 0, finiteness) need real tensors:
the backend ops' bodies run them (ops.lambda_fwd / ops.attention_fwd; the public functions' direct path
too), which run eagerly even inside a compiled graph, so `torch.ops.tauformer.*` called directly or
compiled checks what the Python functions check. Each value check reads one bool back from the device.
"""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def require(condition: bool, message, error=ValueError) -> None:
    """Raise `error` unless `condition`; `message` is a string, or a callable that builds it only on failure
    (the checks run on every call, and formatting shapes or reading a min would cost more than the check)."""
    if not condition:
        raise error(message() if callable(message) else message)


def check_tensor(name: str, t, *, ndim: int | None = None, floating: bool = True) -> None:
    require(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if ndim is not None:
        require(t.dim() == ndim, lambda: f"{name} must have {ndim} dimensions, got shape {_shape(t)}")
    if floating:
        require(t.dtype in FLOAT_DTYPES,
                lambda: f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}",
                TypeError)


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_laplacian(laplacian, features: int) -> None:
    check_tensor("laplacian", laplacian, ndim=2)
    require(
        laplacian.shape[0] == laplacian.shape[1] == features,
        lambda: f"laplacian must be F×F with F = {features} (the head dim of the inputs), "
                f"got shape {_shape(laplacian)}",
    )


def check_per_head(name: str, value, heads: int, what: str) -> None:
    """A float, a 0-dim tensor, or a tensor of shape (heads,)."""
    if isinstance(value, (int, float)):
        require(value > 0, lambda: f"{name} must be > 0, got {value}")
        return
    check_tensor(name, value)
    require(
        value.dim() == 0 or tuple(value.shape) == (heads,),
        lambda: f"{name} must be a float or a tensor of shape ({heads},) ({what}), got shape {_shape(value)}",
    )


def check_positive_values(name: str, value: torch.Tensor) -> None:
    require(bool((value > 0).all()), lambda: f"{name} must be > 0 everywhere, got min {value.min().item():.3g}")


def check_eps(eps) -> None:
    require(isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= 0 and math.isfinite(eps),
            lambda: f"eps must be a finite float >= 0, got {eps!r}")


def check_bool(name: str, value) -> None:
    """A flag must be a bool: bool("False") is True, and 0/1 tensors would need a host read."""
    require(isinstance(value, bool), lambda: f"{name} must be a bool, got {type(value).__name__} {value!r}", TypeError)


def check_finite(**tensors) -> None:
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            require(bool(torch.isfinite(t).all()), lambda: f"{name} contains non-finite values (inf or nan)")


def check_lambda_values(name: str, x, laplacian, tau, check_finite_values: bool) -> None:
    """Values of a λ projection's inputs: tau > 0; with check_finite_values, no inf or nan anywhere."""
    if check_finite_values:
        check_finite(**{name: x, "laplacian": laplacian, "tau": tau})
    check_positive_values("tau", tau)


def check_attention_values(lq, lk, v, temperature, alibi_slopes, check_finite_values: bool) -> None:
    """Values of an attention's inputs: temperature > 0; with check_finite_values, no inf or nan anywhere."""
    if check_finite_values:
        check_finite(lq=lq, lk=lk, v=v, temperature=temperature, alibi_slopes=alibi_slopes)
    check_positive_values("temperature", temperature)


def check_alibi(alibi_slopes, batch: int, heads: int) -> None:
    if alibi_slopes is None:
        return
    check_tensor("alibi_slopes", alibi_slopes)
    require(
        tuple(alibi_slopes.shape) in ((heads,), (batch, heads)),
        lambda: f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}), got {_shape(alibi_slopes)}",
    )


def check_attention_shapes(lq_or_q, lk_or_k, v, *, names, is_causal: bool, head_dim: bool) -> None:
    """Shared B/H/T checks for (q, k, v) (head_dim=True: 4-D q and k) and (lq, lk, v) (3-D λ)."""
    qn, kn = names
    rank = 4 if head_dim else 3
    check_tensor(qn, lq_or_q, ndim=rank)
    check_tensor(kn, lk_or_k, ndim=rank)
    check_tensor("v", v, ndim=4)
    b, h, tq = lq_or_q.shape[:3]
    bk, hkv, tk = lk_or_k.shape[:3]
    require(bk == b and v.shape[0] == b,
            lambda: f"batch sizes differ: {qn} {_shape(lq_or_q)}, {kn} {_shape(lk_or_k)}, v {_shape(v)}")
    require(
        v.shape[1] == hkv and v.shape[2] == tk,
        lambda: f"v must have the kv heads and length of {kn}: {kn} {_shape(lk_or_k)}, v {_shape(v)}",
    )
    require(hkv > 0 and h % hkv == 0,
            lambda: f"the heads of {qn} ({h}) must be a multiple of the kv heads of {kn} ({hkv})")
    # no queries (an empty batch, or a pack whose sequences are all empty) is a valid, empty call; queries
    # without keys are not (the message names no shape: a pack's are views the caller never passed)
    require(tk > 0 or tq == 0, lambda: f"{kn} has no keys but {qn} has {tq} queries per head: every query needs "
            "a key")
    if is_causal:
        require(
            tq <= tk,
            lambda: f"is_causal=True needs Tq <= Tk (bottom-right aligned, as in decode): "
                    f"{qn} has Tq={tq}, {kn} has Tk={tk}",
        )
    require(
        lq_or_q.dtype == lk_or_k.dtype,
        lambda: f"{qn} and {kn} must share a dtype, got {qn} {lq_or_q.dtype} and {kn} {lk_or_k.dtype}",
        TypeError,
    )
    if head_dim:
        require(
            v.dtype == lq_or_q.dtype,
            lambda: f"q, k and v must share a dtype (as in scaled_dot_product_attention), "
                    f"got q {lq_or_q.dtype}, v {v.dtype}",
            TypeError,
        )
        require(
            lq_or_q.shape[3] == lk_or_k.shape[3],
            lambda: f"{qn} and {kn} must share the head dim F: {qn} {_shape(lq_or_q)}, {kn} {_shape(lk_or_k)}",
        )
    check_same_device(**{qn: lq_or_q, kn: lk_or_k, "v": v})
