"""Launcher of the fused Triton λ-projection backward (kernels/taumode_lambda_backward.py).

`lambda_bwd_triton(dlam, x, laplacian, tau, eps) -> (dx, dtau)` follows docs/internal-contract.md: inputs are
trusted, dlam, laplacian and tau are fp32, x is (B, Hx, T, F) in any float dtype but float64, any strides.
tau (Hx,): dtau (Hx,) is summed from per-program partials in a fixed order (deterministic, no atomics);
tau (B, Hx, T) (one per vector): dtau (B, Hx, T), one per vector.
"""
from __future__ import annotations

import torch
import triton

from tauformer_kernels.kernels.taumode_lambda_backward import taumode_lambda_bwd_kernel
from tauformer_kernels.lambda_triton import tau_layout
from tauformer_kernels.launch import Launch, block_size, gpu_launch_configs, on_device


def lambda_backward_launch(f: int, dtype: torch.dtype, *, gpu: bool | None = None,
                           per_vector_tau: bool = False) -> Launch:
    """The λ backward's launch for head dim f, x's dtype and tau's kind (the compile check builds the same).
    gpu=None: launch.gpu_launch_configs() (otherwise the interpreter's 32 vectors per program)."""
    block_f = block_size(f)
    gpu = gpu_launch_configs() if gpu is None else gpu
    return Launch(
        {"BLOCK_T": 32 if dtype == torch.float32 or not gpu else 64,  # fp32: its tf32x3 products hold more registers
         "BLOCK_F": block_f,
         # F <= 64 in one pass (x, L_sym and y in registers); larger F in 32-wide tiles of L_sym, two passes over x
         "BLOCK_K": block_f if block_f <= 64 else 32,
         "MASK_F": block_f != f,
         # fp16/bf16 x is exact in tf32 and only L_sym rounds (2^-11 relative); fp32 x takes the three-pass split
         "DOT_PRECISION": "tf32x3" if dtype == torch.float32 else "tf32",
         "PER_VECTOR_TAU": per_vector_tau},
        num_warps=4, num_stages=1)


def lambda_bwd_triton(dlam, x, laplacian, tau, eps, *, poison: bool = False):
    """Fused λ backward: (dx like x, dtau like tau, fp32). poison=True fills the outputs with NaN first."""
    b, h, t, f = x.shape
    per_vector = tau.dim() > 1
    launch = lambda_backward_launch(f, x.dtype, per_vector_tau=per_vector)
    num_tb = triton.cdiv(t, launch.constexprs["BLOCK_T"])
    dx = torch.full_like(x, float("nan")) if poison else torch.empty_like(x)
    dtau = torch.full((b, h, t if per_vector else num_tb), float("nan") if poison else 0.0, dtype=torch.float32,
                      device=x.device)
    if b * h * t == 0:
        return dx.zero_(), (dtau.zero_() if per_vector else torch.zeros(h, dtype=torch.float32, device=x.device))
    dlam = dlam.to(torch.float32)
    lap = laplacian.to(torch.float32).contiguous()
    tau32, tau_strides = tau_layout(tau)
    with on_device(x):
        taumode_lambda_bwd_kernel[(num_tb * b * h,)](
            dlam, x, lap, tau32, dx, dtau,
            *dlam.stride(), *tau_strides, *x.stride(), *dx.stride(),
            h, t, f, float(eps), **launch.options(),
        )
    return dx, (dtau if per_vector else dtau.sum(dim=(0, 2))).to(tau.dtype)
