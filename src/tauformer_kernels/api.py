"""The public functions: taumode_lambda, taumode_attention, taumode_attention_from_lambda.

Each turns float arguments into tensors and calls the matching `torch.ops.tauformer.*` op, which checks
shapes and values (tau, temperature > 0; finiteness on request) and runs the chosen backend. In eager
inference (no gradient needed, nothing tracing: ops.eager_inference, decided here once per call) they call
the op's implementation with direct=True: the same checks and backend functions, without the op layers'
dispatch cost.
"""
from __future__ import annotations

import functools

import torch

from . import backends, ops, reference, validation  # noqa: F401  (ops registers torch.ops.tauformer.*)


def _as_tensor(name: str, value, like: torch.Tensor) -> torch.Tensor:
    """A positive float becomes a 0-dim tensor in the compute dtype; tensors pass (the op checks them)."""
    if isinstance(value, torch.Tensor):
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    validation.require(value > 0, f"{name} must be > 0, got {value}")
    dtype = reference.compute_dtype(like)
    if type(like) is not torch.Tensor or torch.compiler.is_compiling():  # no real tensor to keep
        return torch.tensor(float(value), dtype=dtype, device=like.device)
    return _scalar(float(value), dtype, like.device)


@functools.lru_cache(maxsize=256)
def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One 0-dim tensor per float argument, dtype and device: a decode step is launch-bound, and the
    ops never write to their arguments."""
    return torch.tensor(value, dtype=dtype, device=device)


def taumode_lambda(x, laplacian, *, tau=1.0, eps=1e-6, backend="auto", check_finite=False):
    """λ = E / (E + tau) with E = max(xᵀLx / (xᵀx + eps), 0), over the last dim of x (docs/math.md §The λ projection).

    x: (..., F), any float dtype. laplacian: (F, F), dense, or sparse CSR (the reference backend multiplies it
    sparse; Triton takes it dense). tau: a float; a tensor of shape (H,) for x of shape (..., H, T, F) (one
    per head) or of shape x.shape[:-1] (one per vector); or the reference crate's per-vector rule,
    "vector-median" / "vector-mean" (docs/math.md §Per-vector tau; the gradient flows through it to x).
    backend: "auto", "reference" or "triton" ("loglinear", an attention algorithm, takes auto's λ). Returns λ of
    shape x.shape[:-1] in float32 (float64 for float64 x).
    Gradients flow to x, tau (tensor) and laplacian (when it requires grad).
    """
    validation.check_tensor("x", x)
    backends.check_backend_name(backend)
    validation.check_eps(eps)
    validation.check_bool("check_finite", check_finite)
    tau = reference.vector_tau(x, tau, eps) if isinstance(tau, str) else _as_tensor("tau", tau, x)
    args = (x, laplacian, tau, float(eps), backend, bool(check_finite))
    if ops.eager_inference(x, laplacian, tau):
        return ops.taumode_lambda_composite(*args, direct=True)
    return torch.ops.tauformer.taumode_lambda(*args)


def taumode_attention(q, k, v, laplacian, *, tau=1.0, temperature=1.0, eps=1e-6, is_causal=True,
                      alibi_slopes=None, backend="auto", check_finite=False, cu_seqlens_q=None, cu_seqlens_k=None,
                      max_seqlen_q=None, max_seqlen_k=None):
    """Taumode attention in SDPA's layout: softmax_j(−|λq_i − λk_j| / temperature − slope·dist) · V.

    q: (B, H, Tq, F); k: (B, H_kv, Tk, F); v: (B, H_kv, Tk, Dv); H a multiple of H_kv (GQA: query head h
    uses kv head h // (H / H_kv)). laplacian: (F, F). tau: float or (H_kv,) tensor, one per kv group, or
    "vector-median" / "vector-mean": the reference crate's rule, one tau per q and per k vector.
    temperature: float or (H,) tensor. alibi_slopes: None or an fp32 tensor (H,) or (B, H); the logit of
    query i and key j gains −slope·|i + Tk − Tq − j|. is_causal: keys j <= i + Tk − Tq (bottom-right
    aligned; needs Tq <= Tk). backend: "auto", "reference", "triton" or "loglinear" (exact sorted O(T log T)
    attention; its λ projection takes auto's choice).
    Returns (B, H, Tq, Dv) in v's dtype.

    Packed sequences (FlashAttention's varlen convention, docs/math.md §Packed sequences): with
    cu_seqlens_q and cu_seqlens_k (int32 (B + 1,) offsets from 0, non-decreasing) q is (total_q, H, F),
    k (total_k, H_kv, F), v (total_k, H_kv, Dv), and the result (total_q, H, Dv): sequence b is rows
    cu_seqlens_q[b]..cu_seqlens_q[b+1] of q and cu_seqlens_k[b]..cu_seqlens_k[b+1] of k and v, attended to
    as if alone (causal and ALiBi distances inside it; alibi_slopes (H,) or (B, H), one row per sequence).
    max_seqlen_q / max_seqlen_k: the longest sequences; without them the offsets are read once on the host
    (and checked: a ValueError names the bad argument); with them nothing reads them (torch.compile with
    fullgraph=True needs them), and the offsets are trusted.
    """
    validation.check_tensor("q", q)
    backends.check_backend_name(backend)
    validation.check_eps(eps)
    validation.check_bool("is_causal", is_causal)
    validation.check_bool("check_finite", check_finite)
    if isinstance(tau, str):  # a per-vector tau: λq and λk each with its own, then attention from them
        validation.check_tensor("k", k)
        lam = functools.partial(taumode_lambda, laplacian=laplacian, tau=tau, eps=eps, check_finite=check_finite,
                                backend=backend)
        return taumode_attention_from_lambda(
            lam(q), lam(k), v, temperature=temperature, is_causal=is_causal, alibi_slopes=alibi_slopes,
            backend=backend, check_finite=check_finite, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    tau = _as_tensor("tau", tau, q)
    temperature = _as_tensor("temperature", temperature, q)
    args = (q, k, v, laplacian, tau, temperature, float(eps), bool(is_causal), alibi_slopes, backend,
            bool(check_finite), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if ops.eager_inference(q, k, v, laplacian, tau, temperature, alibi_slopes):
        return ops.taumode_attention_composite(*args, direct=True)
    return torch.ops.tauformer.taumode_attention(*args)


def taumode_attention_from_lambda(lq, lk, v, *, temperature=1.0, is_causal=True, alibi_slopes=None,
                                  backend="auto", check_finite=False, cu_seqlens_q=None, cu_seqlens_k=None,
                                  max_seqlen_q=None, max_seqlen_k=None):
    """Attention from precomputed scalars, for a cache that stores λk instead of K.

    lq: (B, H, Tq); lk: (B, H_kv, Tk); v: (B, H_kv, Tk, Dv). Any finite λ is accepted (not only [0, 1)).
    Packed (with cu_seqlens_*): lq (total_q, H), lk (total_k, H_kv), v (total_k, H_kv, Dv). Other arguments
    as in `taumode_attention`. Returns (B, H, Tq, Dv) (packed: (total_q, H, Dv)) in v's dtype.
    """
    validation.check_tensor("lq", lq)
    backends.check_backend_name(backend)
    validation.check_bool("is_causal", is_causal)
    validation.check_bool("check_finite", check_finite)
    temperature = _as_tensor("temperature", temperature, lq)
    args = (lq, lk, v, temperature, bool(is_causal), alibi_slopes, backend, bool(check_finite), cu_seqlens_q,
            cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if ops.eager_inference(lq, lk, v, temperature, alibi_slopes):
        return ops.taumode_attention_from_lambda_composite(*args, direct=True)
    return torch.ops.tauformer.taumode_attention_from_lambda(*args)
