"""Launcher of the fused Triton taumode attention forward (kernels/taumode_attention.py).

`attention_fwd_triton(lq, lk, v, temperature, alibi_slopes, is_causal) -> (out, lse)` follows
docs/internal-contract.md: inputs are trusted (validated at the public API), λ and temperature are fp32,
lk and v may be non-contiguous (decode passes slices of a preallocated cache).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tauformer_kernels.backends import FP_FUSION, MAX_GRID_YZ as _MAX_GRID_YZ, arch_of, gpu_launch_configs, on_device
from tauformer_kernels.kernels.taumode_attention import taumode_attention_fwd_kernel

# Largest λ span (max − min of λq and λk, in log2 units of 1/temperature) for which the factorised path
# (no exponential per score, no online maximum) is used. It bounds how far a row's maximum can fall below
# the fixed reference: for fp32/bf16 P (fp32's exponent range) the kernel's factor limit binds first
# (1.5·span + σN/2 <= 96); fp16 P has only 2^-14 of normal range below 1, so its rows must keep a maximum
# near 1 (and its half2 factors within 2^±12).
_FAST_SPAN = {torch.float32: 64.0, torch.bfloat16: 64.0, torch.float16: 8.0}

# Tile sizes (BLOCK_M query rows × BLOCK_N keys) and pipeline stages on a GPU, chosen with compile_check's
# static model (kernels/NOTES.md): 128×64 for Dv <= 64; Dv up to 128 per program needs 64 rows. Larger Dv
# is split over grid axis 2 (each program recomputes P for its columns). Under TRITON_INTERPRET=1 one
# config: the interpreter runs each program in numpy (bigger tiles are faster there), and an autotuner
# with several configs needs a driver.
_GPU_TILES = {"BLOCK_M": 128, "BLOCK_N": 64, "num_stages": 3}
_GPU_TILES_DV128 = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 3}  # 64 < BLOCK_D <= 128
_GPU_TILES_FP32 = {"BLOCK_M": 64, "BLOCK_N": 32, "num_stages": 2}  # tf32x3 triples the operands
_INTERPRET_TILES = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 1}
_MAX_BLOCK_D = 128
# An offset at or past this many elements needs the kernel's 64-bit (WIDE) build.
_WIDE_OFFSET = 2**31

# Launches per path choice: "auto" writes each program from the factorised launch where that path is exact
# and from the general launch otherwise (both launches compute the same condition in the kernel);
# "general" writes every program from the general path.
_PATHS = {"auto": (1, 2), "general": (3,)}


def forward_config(dv: int, dtype: torch.dtype, *, has_alibi: bool = False, arch: int = 90, wide: bool = False,
                   gpu: bool | None = None) -> dict:
    """Tiles, stages and the warps of each launch (PATH 1 factorised, 2 general, 3 general for all) for a
    head size Dv and V's dtype, ALiBi, the sm version and the 64-bit build. The launcher and the compile
    check both call it; the warps may differ between the launches, the tiles may not (they define the
    programs). gpu=None: backends.gpu_launch_configs()."""
    if not (gpu_launch_configs() if gpu is None else gpu):
        return dict(_INTERPRET_TILES, warps={1: 4, 2: 4, 3: 4})
    if dtype == torch.float32:
        cfg = dict(_GPU_TILES_FP32)
    else:
        cfg = dict(_GPU_TILES if triton.next_power_of_2(dv) <= 64 else _GPU_TILES_DV128)
    factorised = general = 4
    if has_alibi:
        general = 8  # the general path's ALiBi row values: 8 warps (half the rows per thread) keep it spill-free
    if dtype != torch.float32 and arch < 90:
        general = 8  # sm_80's mma.sync layouts: the 4-warp general build spilled 8 B at 128×64
    if wide and dtype != torch.float32:
        factorised = general = 8  # 64-bit offsets hold more registers: 4 warps spilled 24-40 B
    cfg["warps"] = {1: factorised, 2: general, 3: general}
    return cfg


def max_offset(t: torch.Tensor) -> int:
    """The largest element offset a kernel forms into t: Σ (size - 1)·stride."""
    return sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0)


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
    has_alibi = alibi_slopes is not None
    # 64-bit offsets only where one can pass 2^31 elements (the 32-bit build holds fewer registers)
    wide = max(max_offset(t) for t in (lq, lk, v, out, lse)) >= _WIDE_OFFSET
    cfg = forward_config(dv, v.dtype, has_alibi=has_alibi, arch=arch_of(v.device), wide=wide)
    block_d = min(max(16, triton.next_power_of_2(dv)), _MAX_BLOCK_D)
    n_dchunk = triton.cdiv(dv, block_d)
    # b·h over axes 1 and 2 (each at most 65,535 programs), query blocks on axis 0
    bh_axis = min(b * h, _MAX_GRID_YZ)
    grid = (triton.cdiv(tq, cfg["BLOCK_M"]), bh_axis, triton.cdiv(b * h, bh_axis) * n_dchunk)
    with on_device(v):
        for launch in _PATHS[path]:
            taumode_attention_fwd_kernel[grid](
                lq, lk, v, temperature, slopes, k_lo, k_hi, out, lse,
                *lq.stride(), *lk.stride(), *v.stride(), *out.stride(),
                b * h, h, h // hkv, tq, tk, dv,
                IS_CAUSAL=bool(is_causal), HAS_ALIBI=has_alibi,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d, MASK_D=dv % block_d != 0,
                FAST_SPAN=_FAST_SPAN[v.dtype], FACTOR_DTYPE=factor_dtype(v.dtype, has_alibi),
                PATH=launch, DOT_PRECISION=dot_precision(v.dtype), N_DCHUNK=n_dchunk, WIDE=wide,
                num_warps=cfg["warps"][launch], num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION,
            )
    return out, lse
