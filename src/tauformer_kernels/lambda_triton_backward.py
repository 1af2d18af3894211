"""Launcher of the fused Triton λ-projection backward (kernels/taumode_lambda_backward.py).

`lambda_bwd_triton(dlam, x, laplacian, tau, eps) -> (dx, dtau)` follows docs/internal-contract.md: inputs are
trusted, dlam, laplacian and tau are fp32, x is (B, Hx, T, F) in any float dtype but float64, any strides.
dtau is summed from per-program partials in a fixed order (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton

from tauformer_kernels.backends import FP_FUSION, gpu_launch_configs, on_device
from tauformer_kernels.kernels.taumode_lambda_backward import taumode_lambda_bwd_kernel


def block_f_of(f: int) -> int:
    return max(16, triton.next_power_of_2(f))


def gpu_config(block_f: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Vectors per program, the L_sym tile and launch options for a padded F. F <= 64 runs in one pass (the
    x tile, L_sym and y in registers); larger F in 32-wide tiles of L_sym, two passes over x. fp32 x (its
    three-pass tf32 products hold more registers) takes half the vectors."""
    block_t = 32 if dtype == torch.float32 else 64
    if block_f <= 64:
        return {"BLOCK_T": block_t, "BLOCK_K": block_f, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_T": block_t, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}


_INTERPRET_CONFIG = {"BLOCK_T": 32, "num_warps": 4, "num_stages": 1}


def launch_config(f: int, dtype: torch.dtype) -> dict:
    block_f = block_f_of(f)
    cfg = gpu_config(block_f, dtype)
    if not gpu_launch_configs():
        cfg = dict(_INTERPRET_CONFIG, BLOCK_K=cfg["BLOCK_K"])
    return cfg


def dot_precision(dtype: torch.dtype) -> str:
    """x·L_sym on the tensor cores: fp16/bf16 x is exact in tf32 and only L_sym rounds (2^-11 relative);
    fp32 x takes the three-pass tf32 split (~fp32 accuracy)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def lambda_bwd_triton(dlam, x, laplacian, tau, eps, *, poison: bool = False):
    """Fused λ backward: (dx like x, dtau (Hx,) fp32). poison=True fills the outputs with NaN first."""
    b, h, t, f = x.shape
    cfg = launch_config(f, x.dtype)
    block_f = block_f_of(f)
    num_tb = triton.cdiv(t, cfg["BLOCK_T"])
    dx = torch.full_like(x, float("nan")) if poison else torch.empty_like(x)
    dtau_part = torch.full((b, h, num_tb), float("nan") if poison else 0.0, dtype=torch.float32, device=x.device)
    if b * h * t == 0:
        return dx.zero_(), torch.zeros(h, dtype=torch.float32, device=x.device)
    dlam = dlam.to(torch.float32)
    lap = laplacian.to(torch.float32).contiguous()
    with on_device(x):
        taumode_lambda_bwd_kernel[(num_tb * b * h,)](
            dlam, x, lap, tau.to(torch.float32).contiguous(), dx, dtau_part,
            *dlam.stride(), *x.stride(), *dx.stride(),
            h, t, f, float(eps),
            BLOCK_T=cfg["BLOCK_T"], BLOCK_F=block_f, BLOCK_K=cfg["BLOCK_K"], MASK_F=block_f != f,
            DOT_PRECISION=dot_precision(x.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            enable_fp_fusion=FP_FUSION,
        )
    return dx, dtau_part.sum(dim=(0, 2)).to(tau.dtype)
