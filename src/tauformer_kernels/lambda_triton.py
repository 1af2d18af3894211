"""Launcher of the Triton λ projection forward (kernels/taumode_lambda.py).

`lambda_fwd_triton(x, laplacian, tau, eps) -> lam` follows docs/internal-contract.md: x (B, Hx, T, F) in
any float dtype and any strides, laplacian (F, F) fp32, tau (Hx,) (one per head) or (B, Hx, T) (one per
vector) fp32; lam (B, Hx, T) fp32.
"""
from __future__ import annotations

import torch
import triton

from tauformer_kernels.kernels.taumode_lambda import taumode_lambda_fwd_kernel
from tauformer_kernels.launch import Launch, block_size, on_device


def split_laplacian(laplacian: torch.Tensor, dtype: torch.dtype, block_f: int):
    """L zero-padded to (block_f, block_f) as (hi, lo) in `dtype` with hi + lo ≈ L to ~2·(mantissa) bits;
    for fp32, (L, L) unsplit (the kernel multiplies fp32 with tf32x3)."""
    f = laplacian.shape[0]
    padded = torch.zeros(block_f, block_f, dtype=torch.float32, device=laplacian.device)
    padded[:f, :f] = laplacian.to(torch.float32)
    if dtype == torch.float32:
        return padded, padded
    hi = padded.to(dtype)
    lo = (padded - hi.to(torch.float32)).to(dtype)
    return hi, lo


def tau_layout(tau: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """tau in fp32 and its (b, h, t) strides as the λ kernels read it: one per head (Hx,) -> (0, 1, 0),
    one per vector (B, Hx, T) -> its own strides."""
    tau = tau.to(torch.float32).contiguous()
    return tau, ((0, 1, 0) if tau.dim() <= 1 else tau.stride())


def lambda_forward_launch(f: int, dtype: torch.dtype, *, per_vector_tau: bool = False) -> Launch:
    """The λ forward's launch for head dim f, x's dtype and tau's kind (the compile check builds the same)."""
    block_f = block_size(f)
    return Launch(
        # fp32: tf32x3 holds three operand copies (64 spilled 264 B on sm_80)
        {"BLOCK_T": 32 if dtype == torch.float32 else 64,
         # fp32 past F = 64: contraction chunks of 32 (of 64, the tf32x3 product at F = 128 spilled 24 B on
         # sm_80 under Triton 3.6, 255 registers under 3.9)
         "BLOCK_F": block_f, "BLOCK_C": min(block_f, 64),
         "BLOCK_K": min(block_f, 32 if dtype == torch.float32 and block_f > 64 else 64),
         "SPLIT_L": dtype != torch.float32,
         # fp32 x: the three-pass tf32 split keeps ~fp32 accuracy; fp16/bf16 x times L's (hi, lo) halves is exact
         "DOT_PRECISION": "tf32x3" if dtype == torch.float32 else "ieee",
         "PER_VECTOR_TAU": per_vector_tau},
        num_warps=4, num_stages=2)


def lambda_fwd_triton(x, laplacian, tau, eps, *, poison: bool = False):
    """λ (B, Hx, T) fp32 of every head vector of x; poison=True fills it with NaN before the kernel runs."""
    b, hx, t, f = x.shape
    lam = torch.empty(b, hx, t, dtype=torch.float32, device=x.device)
    if poison:
        lam.fill_(float("nan"))
    if lam.numel() == 0:
        return lam
    launch = lambda_forward_launch(f, x.dtype, per_vector_tau=tau.dim() > 1)
    l_hi, l_lo = split_laplacian(laplacian, x.dtype, launch.constexprs["BLOCK_F"])
    grid = (triton.cdiv(t, launch.constexprs["BLOCK_T"]) * b * hx,)
    tau, tau_strides = tau_layout(tau)
    with on_device(x):
        taumode_lambda_fwd_kernel[grid](
            x, l_hi, l_lo, tau, lam, *x.stride(), *tau_strides, hx, t, f, float(eps), **launch.options(),
        )
    return lam
