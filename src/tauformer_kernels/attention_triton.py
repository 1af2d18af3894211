"""Launcher of the fused Triton taumode attention forward (kernels/taumode_attention.py).

`attention_fwd_triton(lq, lk, v, temperature, alibi_slopes, is_causal) -> (out, lse)` follows
docs/internal-contract.md: inputs are trusted (validated at the public API), λ and temperature are fp32,
lk and v may be non-contiguous (decode passes slices of a preallocated cache).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tauformer_kernels.kernels.taumode_attention import taumode_attention_fwd_kernel

# Largest λ span (max − min of λq and λk, in log2 units of 1/temperature) for which the factorised path
# (no exponential per score, no online maximum) is used. It bounds how far a row's maximum can fall below
# the fixed reference: for fp32/bf16 P (fp32's exponent range) the kernel's factor limit binds first
# (1.5·span + σN/2 <= 96); fp16 P has only 2^-14 of normal range below 1, so its rows must keep a maximum
# near 1 (and its half2 factors within 2^±12).
_FAST_SPAN = {torch.float32: 64.0, torch.bfloat16: 64.0, torch.float16: 8.0}

# Tile sizes (BLOCK_M query rows × BLOCK_N keys) and launch options on a GPU, chosen with compile_check's
# static model (kernels/NOTES.md): 128×64 with 4 warps keeps both paths free of spills on sm_80/sm_90 at
# Dv <= 64; Dv up to 128 per program needs 64 rows. Larger Dv is split over a third grid axis (each
# program recomputes P for its columns). Under TRITON_INTERPRET=1 one config: the interpreter runs each
# program in numpy (bigger tiles are faster there), and an autotuner with several configs needs a driver.
_GPU_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
_GPU_CONFIG_WIDE = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}  # 64 < BLOCK_D <= 128
_GPU_CONFIG_FP32 = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}  # tf32x3 triples operands
_INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
# The general path with ALiBi holds a few more per-row values: 8 warps (half the rows per thread) keep it
# free of spills. Warps may differ between the two launches; the tiles must not (they define the programs).
_GENERAL_ALIBI_WARPS = 8
_MAX_BLOCK_D = 128

# Launches per path choice: "auto" writes each program from the factorised launch where that path is exact
# and from the general launch otherwise (both launches compute the same condition in the kernel);
# "general" writes every program from the general path.
_PATHS = {"auto": (1, 2), "general": (3,)}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch_config(dv: int, dtype: torch.dtype = torch.float16) -> dict:
    """Tile sizes and launch options for a head size Dv and V's dtype."""
    if _interpreting():
        return dict(_INTERPRET_CONFIG)
    if dtype == torch.float32:
        return dict(_GPU_CONFIG_FP32)
    return dict(_GPU_CONFIG if triton.next_power_of_2(dv) <= 64 else _GPU_CONFIG_WIDE)


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision of the P·V dots: fp32 needs ~1e-5 relative, which tf32 (10-bit mantissa) misses;
    tf32x3 (hi/lo split, three tensor-core passes) keeps ~1e-6. fp16/bf16 P and V are exact inputs."""
    return "tf32x3" if dtype == torch.float32 else "ieee"


def factor_dtype(dtype: torch.dtype, has_alibi: bool):
    """Arithmetic of the factorised path's per-score products: packed fp16 (half2) when V is fp16 and there is
    no ALiBi (the factors then lie within 2^±12, see _FAST_SPAN), fp32 otherwise."""
    return tl.float16 if dtype == torch.float16 and not has_alibi else tl.float32


def attention_fwd_triton(lq, lk, v, temperature, alibi_slopes, is_causal, *, poison: bool = False,
                         path: str = "auto"):
    """Fused taumode attention forward: (out (B, H, Tq, Dv) in v.dtype, lse (B, H, Tq) fp32).

    poison=True fills the outputs with NaN before the kernel runs, so a test sees any element the kernel
    forgets to write. path="general" forces the exponential-per-score path with an online maximum
    (exact for any input) where "auto" would take the factorised one: tests compare the two.
    """
    b, h, tq = lq.shape
    hkv, tk, dv = lk.shape[1], lk.shape[2], v.shape[-1]
    out = torch.empty(b, h, tq, dv, dtype=v.dtype, device=v.device)
    lse = torch.empty(b, h, tq, dtype=torch.float32, device=lq.device)
    if poison:
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    if out.numel() == 0:
        return out, lse
    # per (batch, kv head) range of λk: decides, inside the kernel, whether the factorised path is exact
    k_lo = lk.amin(dim=-1).to(torch.float32).contiguous()
    k_hi = lk.amax(dim=-1).to(torch.float32).contiguous()
    slopes = alibi_slopes.to(torch.float32).contiguous() if alibi_slopes is not None else k_lo
    temperature = temperature.to(torch.float32).contiguous()
    cfg = launch_config(dv, v.dtype)
    block_d = min(max(16, triton.next_power_of_2(dv)), _MAX_BLOCK_D)
    grid = (triton.cdiv(tq, cfg["BLOCK_M"]), b * h, triton.cdiv(dv, block_d))
    for launch in _PATHS[path]:
        warps = cfg["num_warps"]
        if launch != 1 and alibi_slopes is not None and not _interpreting():
            warps = _GENERAL_ALIBI_WARPS
        taumode_attention_fwd_kernel[grid](
            lq, lk, v, temperature, slopes, k_lo, k_hi, out, lse,
            *lq.stride(), *lk.stride(), *v.stride(), *out.stride(),
            h, h // hkv, tq, tk, dv,
            IS_CAUSAL=bool(is_causal), HAS_ALIBI=alibi_slopes is not None,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d, MASK_D=dv % block_d != 0,
            FAST_SPAN=_FAST_SPAN[v.dtype], FACTOR_DTYPE=factor_dtype(v.dtype, alibi_slopes is not None),
            PATH=launch, DOT_PRECISION=dot_precision(v.dtype),
            num_warps=warps, num_stages=cfg["num_stages"],
        )
    return out, lse
