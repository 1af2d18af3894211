"""Launcher of the fused Triton taumode attention backward (kernels/taumode_attention_backward.py).

`attention_bwd_triton(dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal)
-> (dlq, dlk, dv, dtemperature, dalibi)` follows docs/internal-contract.md: inputs are trusted (validated at
the public API), λ, lse and temperature are fp32, lk and v may be non-contiguous.

Determinism: no atomics. dV and dλk are complete per key block (the query heads of a GQA group are summed
inside its program in a fixed order); dλq comes out as one partial per slot (`partial_slots`: at most
MAX_SLOTS floats per query row, whatever the length), dtemperature and dslope as one per key block, summed
here with fixed-shape torch reductions.

Head sizes past MAX_FUSED_DV (512 for fp16/bf16 V, 256 for fp32: the largest tiles the kernel's register
budget holds) run the chunked PyTorch backward (reference.attention_bwd_chunked): the same gradients, not
fused.
"""
from __future__ import annotations

import torch
import triton

from tauformer_kernels import reference
from tauformer_kernels.backends import FP_FUSION, arch_of, gpu_launch_configs, on_device, triton_before
from tauformer_kernels.kernels.taumode_attention_backward import (
    attention_bwd_preprocess_kernel,
    taumode_attention_bwd_kernel,
)

# Tiles (BLOCK_N keys per program × BLOCK_M queries per iteration) and launch options on a GPU, by the
# padded Dv. The dV accumulator (BLOCK_N × BLOCK_D fp32) and the V tile live in registers, so large heads
# take fewer keys per program. No autotuner: BLOCK_N sets the size of the partial-dλq buffer.
# DT_TILE: the unmasked loop keeps dtemperature in a BLOCK_N × BLOCK_M register tile (one FFMA per score)
# instead of per-iteration row sums; only where the build stays free of spills with it.
_GPU_CONFIGS = {
    64: {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1, "DT_TILE": True},
    128: {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "DT_TILE": True},
    256: {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "DT_TILE": True},
    512: {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "DT_TILE": True},
}
# fp32 V: the tf32x3 products hold more registers: smaller tiles. Dv 256 runs "ieee" products
# (dot_precisions) at 16×16, 8 warps, 2 stages, DT_TILE off: spill-free on sm_80 and sm_90 (causal,
# non-causal, ALiBi, the GQA split). fp32 Dv > 256 is not fused (MAX_FUSED_DV): the builds spilled 8-24 B
# at every option tried, and the fused fp32 backward at these sizes was already ~20× the bf16 main loop
# per score (kernels/NOTES.md), no faster than the chunked PyTorch backward it now runs.
_GPU_CONFIGS_FP32 = {
    64: {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "DT_TILE": True},
    128: {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "DT_TILE": True},
    256: {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 8, "num_stages": 2, "DT_TILE": False},
}
# Under TRITON_INTERPRET=1: one small tile (the interpreter runs each program in numpy); DT_TILE as on a GPU,
# so the tests run the code path the GPU build runs.
_INTERPRET_TILES = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


def block_d_of(dv: int) -> int:
    return max(16, triton.next_power_of_2(dv))


def backward_config(dtype: torch.dtype, dv: int, *, has_alibi: bool = False, group: int = 1,
                    is_causal: bool = True, arch: int = 90, interpret: bool | None = None) -> dict:
    """Tiles, launch options and the DT_TILE constexpr of `taumode_attention_bwd_kernel` for V's dtype, the
    head size Dv, ALiBi, the GQA group, causality and the sm version (80: A100-class mma.sync, 90: Hopper
    wgmma). The one source of the launch configuration: the launcher and the compile check (`compile_check_backward.entries()`, which
    proves these configs spill-free on sm_80 and sm_90) both call it. interpret=None: the interpreter's small tiles unless backends.gpu_launch_configs().
    Variants that spilled at the table's tiles get their own (ALiBi; fp16/bf16 Dv<=64 non-causal GQA);
    kernels/NOTES.md (Backward) has the spill table."""
    if interpret is None:
        interpret = not gpu_launch_configs()
    table = _GPU_CONFIGS_FP32 if dtype == torch.float32 else _GPU_CONFIGS
    cfg = dict(table[max(64, block_d_of(dv))])
    if arch < 90 and dtype != torch.float32 and block_d_of(dv) <= 64:
        # sm_80's mma.sync layouts hold ~13 more registers than wgmma at 64×64: the dtemperature tile
        # spills there (32 B); row sums keep it spill-free
        cfg["DT_TILE"] = False
    if has_alibi:
        # ALiBi adds the dS∘distance row sums (dS and P∘sign no longer share a register tile): the
        # dtemperature tile does not fit beside them
        cfg["DT_TILE"] = False
        bd = block_d_of(dv)
        if dtype == torch.float32:
            if bd <= 128:
                # tf32x3 at 32×32 spilled 304/392 B (sm_80/sm_90) at Dv=128; 16 keys per program fit
                cfg["BLOCK_N"] = 16
        elif bd <= 64:
            # 64×64 spilled 168-320 B (GQA=4, odd T); 8 warps or BLOCK_M=32 still spilled, 32 keys per program
            # do not (sm_80 254 regs, sm_90 213)
            cfg["BLOCK_N"] = 32
        elif bd >= 512:
            # 32×16 at 4 warps spilled 8 B; 8 warps: ~195/168 regs
            cfg["num_warps"] = 8
    if triton_before(3, 9):
        # Triton 3.6 (the one torch 2.11 pins) allocates registers differently; measured there:
        if dtype != torch.float32 and block_d_of(dv) <= 64 and arch < 90 and is_causal and not has_alibi:
            cfg["num_warps"] = 8  # 64×64 spilled 16 B on sm_80
        if dtype == torch.float32 and block_d_of(dv) <= 128:
            cfg["num_warps"] = 8  # 8-24 B spilled (D=64 causal sm_90, ALiBi D=64/128 sm_80)
        if dtype == torch.float32 and block_d_of(dv) == 256 and has_alibi and arch >= 90:
            cfg["num_warps"] = 4  # at 8 warps ptxas capped the build at 128 registers: 24 B on sm_90
    # the kernel's launches as (WITH_DV, WITH_DLAMBDA, num_warps): normally one for everything. fp32 Dv >= 256
    # with GQA: one program holding the V tile and the dV accumulator across the group spills at every
    # launch option tried, so dV runs in one launch and the rest in another (kernels/NOTES.md, v9); with
    # ALiBi the second needs 8 warps (at 4, ptxas caps it at 128 registers and spills 16 B on sm_90)
    if dtype == torch.float32 and block_d_of(dv) >= 256 and group > 1:
        cfg["launches"] = ((True, False, cfg["num_warps"]), (False, True, 8 if has_alibi else cfg["num_warps"]))
    else:
        cfg["launches"] = ((True, True, cfg["num_warps"]),)
    if dtype != torch.float32 and block_d_of(dv) <= 64 and not is_causal and group > 1:
        # the GQA non-causal odd-T build spilled 8/32 B at 64×64 (DT_TILE off did not help): 32 query rows
        cfg["BLOCK_M"] = 32
    if interpret:
        cfg.update(_INTERPRET_TILES)
    return cfg


def preprocess_block_m(block_d: int) -> int:
    """Rows per preprocess program: about 8K elements of O and dO each."""
    return max(16, min(64, 8192 // block_d))


def dot_precisions(dtype: torch.dtype, dv: int = 64) -> tuple[str, str]:
    """(input_precision of the dV/dP products, of the one-hot reductions of dS∘sign).

    fp32 V: "tf32x3" for both (the fp32 backward must meet 1e-4 relative, which tf32's 10-bit mantissa
    does not; the three-pass split keeps ~fp32 accuracy on the tensor cores, where "ieee" products run on
    the FMA units and spill).
    fp16/bf16 V: P, dO and dS∘sign enter the tensor cores in V's dtype, as FlashAttention's P and dS do
    (input_precision does not apply)."""
    if dtype == torch.float32:
        if block_d_of(dv) >= 256:
            # Dv >= 256: the tf32x3 split copies of the V and dO tiles do not fit in registers (ptxas falls
            # back to 32 registers: 7-8.5 KB of stack at Dv=256, 13-15 KB at 512); "ieee" (fp32 FMA,
            # exact) at 16×16 tiles does
            return "ieee", "ieee"
        return "tf32x3", "tf32x3"
    return "ieee", "ieee"


# Largest head size of the fused backward by V's dtype (the tables above); the partial-dλq slots per
# (batch, kv head).
MAX_FUSED_DV = {torch.float16: 512, torch.bfloat16: 512, torch.float32: 256}
MAX_SLOTS = 16


def partial_slots(num_kb: int, b_hkv: int, device: torch.device) -> int:
    """Key blocks per launch (= dλq partials per query row) for one (batch, kv head): MAX_SLOTS, or fewer
    key blocks. 2 on the CPU, so that the interpreter runs several launches adding into their slots."""
    return max(1, min(num_kb, MAX_SLOTS if device.type == "cuda" else 2))


def attention_bwd_triton(dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal, *, poison: bool = False):
    """Fused taumode attention backward: (dlq, dlk, dv, dtemperature, dalibi) per docs/internal-contract.md.

    poison=True fills every output and partial buffer with NaN before the kernels run, so a test sees any
    element a kernel forgets to write.
    """
    b, h, tq = lq.shape
    hkv, tk, dv_dim = lk.shape[1], lk.shape[2], v.shape[-1]
    if dv_dim > MAX_FUSED_DV[v.dtype]:
        return reference.attention_bwd_chunked(dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal)
    with on_device(v):
        return _attention_bwd(dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal, poison)


def _attention_bwd(dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal, poison):
    b, h, tq = lq.shape
    hkv, tk, dv_dim = lk.shape[1], lk.shape[2], v.shape[-1]
    group = h // hkv
    device = v.device
    cfg = backward_config(v.dtype, dv_dim, has_alibi=alibi_slopes is not None, group=group,
                          is_causal=bool(is_causal), arch=arch_of(device))
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    block_d = block_d_of(dv_dim)
    num_kb = triton.cdiv(tk, block_n)
    slots = partial_slots(num_kb, b * hkv, device)

    new = torch.full if poison else (lambda shape, _fill, **kw: torch.empty(shape, **kw))
    nan = float("nan")
    dv = new((b, hkv, tk, dv_dim), nan, dtype=v.dtype, device=device)
    dlk = new((b, hkv, tk), nan, dtype=torch.float32, device=device)
    dlq_part = new((slots, b, h, tq), nan, dtype=torch.float32, device=device)
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
    # per query block of the main kernel: λq, lse·log2e, D (see the preprocess kernel), padded past Tq
    num_qb = triton.cdiv(tq, block_m)
    rows = new((b * h, num_qb, 3, block_m), nan, dtype=torch.float32, device=device)
    pre_m = preprocess_block_m(block_d)
    attention_bwd_preprocess_kernel[(triton.cdiv(num_qb * block_m, pre_m) * b * h,)](
        out, dout, lse, lq, rows, *out.stride(), *dout.stride(), *lq.stride(), h, tq, dv_dim,
        BLOCK_M=pre_m, BLOCK_D=block_d, ROW_BLOCK=block_m, enable_fp_fusion=FP_FUSION,
    )
    slopes = alibi_slopes.to(torch.float32).contiguous() if alibi_slopes is not None else rows
    dot_prec, red_prec = dot_precisions(v.dtype, dv_dim)
    temp = temperature.to(torch.float32).contiguous()
    # key blocks kb_start .. kb_start + slots - 1 per launch, each adding into its slot (see the kernel); per
    # group of key blocks one launch, or dV and then the rest (backward_config)
    for kb_start in range(0, num_kb, slots):
        for with_dv, with_dlambda, num_warps in cfg["launches"]:
            taumode_attention_bwd_kernel[(b * hkv * slots,)](
                rows, lk, v, dout, temp, slopes,
                dv, dlk, dlq_part, dt_part, dslope_part,
                *lk.stride(), *v.stride(), *dout.stride(), *dv.stride(),
                b, h, tq, tk, dv_dim, slots, kb_start,
                GROUP=group, IS_CAUSAL=bool(is_causal), HAS_ALIBI=alibi_slopes is not None,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                EVEN_M=tq % block_m == 0, EVEN_N=tk % block_n == 0, MASK_D=block_d != dv_dim,
                DOT_PRECISION=dot_prec, RED_PRECISION=red_prec, GPU=gpu_launch_configs(), DT_TILE=cfg["DT_TILE"],
                WITH_DV=with_dv, WITH_DLAMBDA=with_dlambda,
                num_warps=num_warps, num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION,
            )
    # fixed-order reductions of the per-slot and per-key-block partials
    dlq = dlq_part.sum(0).mul_(-1.0 / temperature.to(torch.float32).view(1, h, 1))
    dtemp = dt_part.sum(dim=(0, 2))
    dalibi = None if alibi_slopes is None else dslope_part.sum(2).to(alibi_slopes.dtype)
    return dlq, dlk, dv, dtemp.to(temperature.dtype), dalibi
