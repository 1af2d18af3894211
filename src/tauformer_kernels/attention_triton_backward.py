"""Launcher of the fused Triton taumode attention backward (kernels/taumode_attention_backward.py).

`attention_bwd_triton(dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal)
-> (dlq, dlk, dv, dtemperature, dalibi)` follows docs/internal-contract.md: inputs are trusted (validated at
the public API), λ, lse and temperature are fp32, lk and v may be non-contiguous.

Determinism: no atomics. dV and dλk are complete per key-block program (the query heads of a GQA group are
summed inside it in a fixed order); dλq, dtemperature and dslope come out as per-key-block partials that are
summed here with fixed-shape torch reductions.
"""
from __future__ import annotations

import os

import torch
import triton

from tauformer_kernels.kernels.taumode_attention_backward import (
    attention_bwd_preprocess_kernel,
    taumode_attention_bwd_kernel,
)

# Tiles (BLOCK_N keys per program × BLOCK_M queries per iteration) and launch options on a GPU, by the
# padded Dv. The dV accumulator (BLOCK_N × BLOCK_D fp32) and the V tile live in registers, so large heads
# take fewer keys per program. No autotuner: BLOCK_N sets the size of the partial-dλq buffer.
_GPU_CONFIGS = {
    64: {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1},
    128: {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    256: {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    512: {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
}
# fp32 V: the "ieee" products run on the FMA units and hold more registers: smaller tiles.
_GPU_CONFIGS_FP32 = {
    64: {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    128: {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    256: {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 8, "num_stages": 1},
    512: {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 8, "num_stages": 1},
}
# Under TRITON_INTERPRET=1: one small config (the interpreter runs each program in numpy).
_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def block_d_of(dv: int) -> int:
    return max(16, triton.next_power_of_2(dv))


def launch_config(dv: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options for a head size Dv and V's dtype."""
    if _interpreting():
        return dict(_INTERPRET_CONFIG)
    table = _GPU_CONFIGS_FP32 if dtype == torch.float32 else _GPU_CONFIGS
    return dict(table[max(64, block_d_of(dv))])


def preprocess_block_m(block_d: int) -> int:
    """Rows per preprocess program: about 8K elements of O and dO each."""
    return max(16, min(64, 8192 // block_d))


def dot_precisions(dtype: torch.dtype) -> tuple[str, str]:
    """(input_precision of the dV/dP products, of the one-hot reductions of dS∘sign).

    fp32 V: "tf32x3" for both (the fp32 backward must meet 1e-4 relative, which tf32's 10-bit mantissa
    does not; the three-pass split keeps ~fp32 accuracy on the tensor cores, where "ieee" products run on
    the FMA units and spill).
    fp16/bf16 V: P, dO and dS∘sign enter the tensor cores in V's dtype, as FlashAttention's P and dS do
    (input_precision does not apply)."""
    if dtype == torch.float32:
        return "tf32x3", "tf32x3"
    return "ieee", "ieee"


def attention_bwd_triton(dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal, *, poison: bool = False):
    """Fused taumode attention backward: (dlq, dlk, dv, dtemperature, dalibi) per docs/internal-contract.md.

    poison=True fills every output and partial buffer with NaN before the kernels run, so a test sees any
    element a kernel forgets to write.
    """
    b, h, tq = lq.shape
    hkv, tk, dv_dim = lk.shape[1], lk.shape[2], v.shape[-1]
    group = h // hkv
    device = v.device
    cfg = launch_config(dv_dim, v.dtype)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    block_d = block_d_of(dv_dim)
    num_kb = triton.cdiv(tk, block_n)

    new = torch.full if poison else (lambda shape, _fill, **kw: torch.empty(shape, **kw))
    nan = float("nan")
    dv = new((b, hkv, tk, dv_dim), nan, dtype=v.dtype, device=device)
    dlk = new((b, hkv, tk), nan, dtype=torch.float32, device=device)
    dlq_part = new((num_kb, b, h, tq), nan, dtype=torch.float32, device=device)
    dt_part = new((b, h, num_kb), nan, dtype=torch.float32, device=device)
    dslope_part = new((b, h, num_kb), nan, dtype=torch.float32, device=device) if alibi_slopes is not None else dt_part
    if b * h == 0 or tq == 0 or tk == 0:
        dv.zero_()
        dlk.zero_()
        dlq = torch.zeros(b, h, tq, dtype=torch.float32, device=device)
        dtemp = torch.zeros(h, dtype=torch.float32, device=device)
        dalibi = None if alibi_slopes is None else torch.zeros(b, h, dtype=torch.float32, device=device)
        return dlq, dlk, dv, dtemp, dalibi

    dout = dout.to(v.dtype)
    lse = lse.to(torch.float32).contiguous()
    delta = new((b, h, tq), nan, dtype=torch.float32, device=device)
    lse2 = new((b, h, tq), nan, dtype=torch.float32, device=device)
    pre_m = preprocess_block_m(block_d)
    attention_bwd_preprocess_kernel[(triton.cdiv(tq, pre_m), b * h)](
        out, dout, lse, delta, lse2, *out.stride(), *dout.stride(), h, tq, dv_dim,
        BLOCK_M=pre_m, BLOCK_D=block_d,
    )
    slopes = alibi_slopes.to(torch.float32).contiguous() if alibi_slopes is not None else delta
    dot_prec, red_prec = dot_precisions(v.dtype)
    taumode_attention_bwd_kernel[(num_kb, b * hkv)](
        lq, lk, v, dout, lse2, delta, temperature.to(torch.float32).contiguous(), slopes,
        dv, dlk, dlq_part, dt_part, dslope_part,
        *lq.stride(), *lk.stride(), *v.stride(), *dout.stride(), *dv.stride(),
        b, h, tq, tk, dv_dim,
        GROUP=group, IS_CAUSAL=bool(is_causal), HAS_ALIBI=alibi_slopes is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        EVEN_M=tq % block_m == 0, EVEN_N=tk % block_n == 0, MASK_D=block_d != dv_dim,
        DOT_PRECISION=dot_prec, RED_PRECISION=red_prec, GPU=not _interpreting(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    # fixed-order reductions of the per-key-block partials
    dlq = dlq_part.sum(0).mul_(-1.0 / temperature.to(torch.float32).view(1, h, 1))
    dtemp = dt_part.sum(dim=(0, 2))
    dalibi = None if alibi_slopes is None else dslope_part.sum(2).to(alibi_slopes.dtype)
    return dlq, dlk, dv, dtemp.to(temperature.dtype), dalibi
