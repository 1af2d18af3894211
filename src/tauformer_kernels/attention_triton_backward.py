"""Launcher of the fused Triton taumode attention backward (kernels/taumode_attention_backward.py).

`attention_bwd_triton(dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal, seqs=None)
-> (dlq, dlk, dv, dtemperature, dalibi)` follows docs/internal-contract.md: inputs are trusted (validated at
the public API), λ, lse and temperature are fp32, lk and v may be non-contiguous.

Packed sequences (`seqs`, a varlen.Seqs; docs/math.md §Packed sequences): the pack is one batch row, each
sequence attended to alone; the same kernels with VARLEN set, one program per (key block of a sequence, kv
head), the offsets read on the device only (no host sync, nothing padded to max_seqlen), deterministic as
the dense build. dv comes back as a (1, Hkv, total_k, Dv) view of packed (total_k, Hkv, Dv) memory and dalibi
as (B, H), one row per sequence. Trusted offsets are read as every backend reads them (varlen.effective,
the kernels clamp them into the rows): rows in no sequence get zero gradients; max_seqlen_q/k only size the
launches (the programs step on until their sequence is covered) and must be >= 1 where there are rows.

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
from tauformer_kernels import varlen as _varlen
from tauformer_kernels.kernels.taumode_attention_backward import (
    DLQ_ROW_ALIGN,
    attention_bwd_preprocess_kernel,
    taumode_attention_bwd_kernel,
)
from tauformer_kernels.launch import (
    Launch,
    LaunchShape,
    Rule,
    apply_rules,
    arch_of,
    block_size,
    gpu_launch_configs,
    on_device,
    triton_before,
)

# Base tiles (BLOCK_N keys per program × BLOCK_M queries per iteration) and launch options on a GPU, by the
# padded Dv. The dV accumulator (BLOCK_N × BLOCK_D fp32) and the V tile live in registers, so large heads
# take fewer keys per program. No autotuner: BLOCK_N sets the size of the partial buffers.
# DT_TILE: the unmasked loop keeps dtemperature in a BLOCK_N × BLOCK_M register tile (one FFMA per score)
# instead of per-iteration row sums, where the build stays free of spills with it.
_BASE = {
    64: {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1, "DT_TILE": True},
    128: {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "DT_TILE": True},
    256: {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "DT_TILE": True},
    512: {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "DT_TILE": True},
}
# fp32 V: the tf32x3 products hold three operand copies: smaller tiles. At Dv 256 the split copies of V and
# dO no longer fit, so the products run "ieee" (fp32 FMA, exact) at 16×16. fp32 past Dv 256 is not fused.
_BASE_FP32 = {
    64: {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "DT_TILE": True},
    128: {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "DT_TILE": True},
    256: {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 8, "num_stages": 2, "DT_TILE": False},
}
# Under TRITON_INTERPRET=1 (without TAUFORMER_GPU_CONFIGS): one small tile, as the interpreter runs each
# program in numpy; every other setting (precisions, DT_TILE, split launches) as on a GPU.
_INTERPRET_TILES = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}

# Largest head size of the fused backward by V's dtype (the base tables); the partial-dλq slots per
# (batch, kv head).
MAX_FUSED_DV = {torch.float16: 512, torch.bfloat16: 512, torch.float32: 256}
MAX_SLOTS = 16


# Applied in order to the base tile of the shape's Dv (measured spills: kernels/NOTES.md, Backward).
_RULES = (
    Rule(lambda s: s.fp32 and s.block_d < 256, {"DOT_PRECISION": "tf32x3", "RED_PRECISION": "tf32x3"},
         "fp32 must meet ~1e-5 relative: the three-pass tf32 split keeps ~fp32 accuracy on the tensor cores"),
    Rule(lambda s: not s.fp32 and s.arch < 90 and s.block_d <= 64, {"DT_TILE": False},
         "sm_80's mma.sync layouts hold ~13 more registers than wgmma at 64×64: the dtemperature tile spilled 32 B"),
    Rule(lambda s: s.has_alibi, {"DT_TILE": False},
         "ALiBi's dS∘distance row sums leave no room for the dtemperature tile"),
    Rule(lambda s: s.has_alibi and s.fp32 and s.block_d <= 128, {"BLOCK_N": 16},
         "fp32 ALiBi at 32×32 spilled 304/392 B (sm_80/sm_90)"),
    Rule(lambda s: s.has_alibi and not s.fp32 and s.block_d <= 64, {"BLOCK_N": 32},
         "ALiBi 64×64 spilled 168-320 B (GQA 4, odd T), also at 8 warps or 32 query rows"),
    Rule(lambda s: s.has_alibi and not s.fp32 and s.block_d >= 512, {"num_warps": 8},
         "ALiBi Dv 512 at 4 warps spilled 8 B"),
    Rule(lambda s: s.old_triton and not s.fp32 and s.block_d <= 64 and s.arch < 90 and s.is_causal
         and not s.has_alibi, {"num_warps": 8}, "Triton 3.6: 64×64 at 4 warps spilled 16 B on sm_80"),
    Rule(lambda s: s.old_triton and s.fp32 and s.block_d <= 128, {"num_warps": 8},
         "Triton 3.6: fp32 at 4 warps spilled 8-24 B"),
    Rule(lambda s: s.old_triton and s.fp32 and s.block_d == 256 and s.has_alibi and s.arch >= 90, {"num_warps": 4},
         "Triton 3.6: at 8 warps ptxas capped the build at 128 registers (24 B spilled on sm_90)"),
    Rule(lambda s: s.fp32 and s.block_d >= 256 and s.group > 1, {"SPLIT_DV": True},
         "one program holding V, dV and the group's gradients spilled at every option: dV launched alone"),
    Rule(lambda s: s.fp32 and s.block_d >= 256 and s.group > 1 and s.has_alibi, {"warps_dlambda": 8},
         "the split's gradient launch at 4 warps was capped at 128 registers (16 B spilled on sm_90)"),
    Rule(lambda s: not s.fp32 and s.block_d <= 64 and not s.is_causal and s.group > 1, {"BLOCK_M": 32},
         "non-causal GQA at 64×64 spilled 8/32 B (DT_TILE off did not help)"),
)

# Applied after _RULES to a pack's build (VARLEN): a pack's lengths are on the device, so every build masks
# its query rows and its key tail, which costs registers where the dense build's even lengths need no masks.
# Measured on the VARLEN builds (Triton 3.9, sm_80 and sm_90; compile_check's varlen rows).
_VARLEN_RULES = (
    Rule(lambda s: not s.fp32 and s.block_d <= 64 and s.is_causal and not s.has_alibi and s.arch >= 90,
         {"DT_TILE": False},
         "causal 64×64 with the dtemperature tile spilled 16 B on sm_90 (main loop +2.6 % without)"),
    Rule(lambda s: not s.fp32 and s.block_d <= 64 and s.is_causal and not s.has_alibi and s.group > 1,
         {"BLOCK_M": 32},
         "causal GQA at 64×64 spilled 256/32 B (sm_80/sm_90; the dense build 48/96 B at even lengths)"),
    Rule(lambda s: not s.fp32 and s.block_d <= 64 and s.is_causal and not s.has_alibi and s.group > 1 and s.arch < 90,
         {"BLOCK_N": 32}, "causal GQA at 32×64 still spilled 64 B on sm_80"),
    Rule(lambda s: not s.fp32 and s.block_d <= 64 and not s.is_causal and s.group > 1 and s.arch < 90,
         {"BLOCK_M": 16}, "non-causal GQA at 32×64 spilled 56 B on sm_80; 16 query rows model the same loop"),
    Rule(lambda s: not s.fp32 and s.block_d == 128, {"BLOCK_N": 32},
         "64×64 at Dv 128 spilled 8/40 B (sm_80/sm_90); 32 keys per program model the same main loop"),
    Rule(lambda s: not s.fp32 and s.block_d == 128 and s.arch < 90, {"num_stages": 1},
         "Dv 128 GQA at 2 stages spilled 16 B on sm_80"),
    Rule(lambda s: not s.fp32 and s.block_d == 256 and s.has_alibi and s.arch >= 90, {"num_stages": 1},
         "ALiBi Dv 256 GQA at 2 stages spilled 80 B on sm_90 (1 stage models faster)"),
    Rule(lambda s: not s.fp32 and s.block_d == 256 and s.has_alibi and s.arch < 90, {"BLOCK_N": 16},
         "ALiBi Dv 256 GQA at 32×32 spilled 184 B on sm_80 (64 B at 1 stage)"),
    Rule(lambda s: s.fp32 and s.block_d <= 128 and not s.has_alibi and (s.arch >= 90 or s.block_d > 64),
         {"BLOCK_N": 16}, "fp32 causal 32×32 spilled 48 B on sm_90 at Dv 64 (also with DT_TILE off, 2 stages or "
         "8 warps) and 288 B on sm_80 at Dv 128"),
    Rule(lambda s: s.fp32 and s.block_d <= 128 and s.has_alibi and s.group == 1 and s.arch < 90,
         {"num_stages": 2}, "fp32 ALiBi Dv 128 at 1 stage spilled 24 B on sm_80"),
    Rule(lambda s: s.fp32 and s.block_d <= 64 and s.has_alibi and s.group > 1,
         {"num_stages": 2}, "fp32 ALiBi GQA at 1 stage spilled 32 B on sm_90"),
    Rule(lambda s: s.fp32 and s.block_d <= 64 and s.has_alibi and s.group > 1 and s.arch < 90,
         {"num_warps": 8, "num_stages": 1}, "fp32 ALiBi GQA spilled 8-56 B on sm_80 at 4 warps (1 or 2 stages, 16 "
         "or 64 query rows): the only spill-free option found (main loop +72 %)"),
    Rule(lambda s: s.fp32 and s.block_d >= 256 and s.group == 1 and not s.has_alibi and s.arch < 90,
         {"num_warps": 4}, "fp32 Dv 256 at 8 warps was capped at 128 registers on sm_80 (16 B spilled); 4 warps "
         "model faster"),
    Rule(lambda s: s.fp32 and s.block_d >= 256 and s.group == 1 and s.has_alibi and s.arch < 90,
         {"BLOCK_M": 32}, "fp32 ALiBi Dv 256 at 16×16 spilled 16-24 B on sm_80 at 4 or 8 warps; 32 query rows "
         "at 8 warps model faster"),
    Rule(lambda s: s.fp32 and s.block_d >= 256 and s.group > 1,
         {"num_warps": 4, "num_stages": 1, "warps_dlambda": 8, "stages_dlambda": 2},
         "fp32 Dv 256 GQA: the split's dV launch at 8 warps, 2 stages spilled 8-24 B (sm_80, sm_90), at 4 warps, "
         "1 stage it models 10 % faster; the gradient launch keeps 8 warps, 2 stages (1 stage spilled 280-1560 B)"),
    Rule(lambda s: s.old_triton and not s.fp32 and s.block_d <= 64 and not s.is_causal and not s.has_alibi
         and s.group == 1 and s.arch < 90, {"num_warps": 8}, "Triton 3.6: non-causal 64×64 at 4 warps spilled 8 B "
         "on sm_80 (as the causal build, which _RULES already gives 8)"),
    Rule(lambda s: s.old_triton and s.fp32 and s.block_d >= 256 and s.group == 1 and not s.has_alibi and s.arch < 90,
         {"BLOCK_M": 32}, "Triton 3.6: fp32 Dv 256 at 16×16 spilled 24 B on sm_80 (8 warps too, 1 stage 408 B+); 32 "
         "query rows do not"),
    Rule(lambda s: s.old_triton and not s.fp32 and s.block_d == 128 and not s.is_causal and s.group > 2
         and s.arch >= 90, {"BLOCK_M": 32}, "Triton 3.6: non-causal GQA 4 at 64×128 spilled 48 B on sm_90"),
)


# A pack's OVERFLOW launches (the key blocks past max_seqlen_k, one program per (sequence, kv head)) start from
# the main launches with half their keys per block (at least 16) and these settings, then _OVERFLOW_RULES. They
# only do work where max_seqlen_k understates a sequence (correctness, not speed), so their configs are chosen
# to be spill-free. BLOCK_M stays the main launch's: the preprocess lays ROWS out in it.
# num_warps / warps_dv: the warps of the launch computing dλ (with or without dV) / of a split's dV launch;
# SPLIT_DV: run dV and dλ as two launches even where the main launch is one.
_OVERFLOW_BASE = {"num_warps": 8, "warps_dv": 8, "SPLIT_DV": False}
_OVERFLOW_RULES = (
    Rule(lambda s: s.fp32 and s.block_d <= 64 and s.has_alibi and s.group > 1 and s.arch >= 90, {"num_warps": 4},
         "fp32 ALiBi GQA at 8 warps spilled 24 B on sm_90 (32-40 B at 1 stage); 4 warps, as the main launch, do not"),
    Rule(lambda s: s.fp32 and s.block_d >= 256 and s.group > 1 and s.arch >= 90, {"warps_dv": 4},
         "fp32 Dv 256 GQA: the split's dV launch at 8 warps was capped at 128 registers (8 B spilled on sm_90, "
         "non-causal); 4 warps, as the main dV launch, do not (on sm_80 they were capped at 128: 8 B)"),
    Rule(lambda s: s.fp32 and s.block_d >= 256 and s.has_alibi, {"SPLIT_DV": True},
         "fp32 ALiBi Dv 256 at 32×16 spilled 8 B on sm_80 (4 warps 136 B, 3 stages 24 B, 1 stage 3.6 KB; 16 "
         "query rows would change the ROWS layout): dV and dλ as two launches hold 125 and 170 registers"),
    Rule(lambda s: s.old_triton and s.fp32, {"SPLIT_DV": True},
         "Triton 3.6: fp32 OVERFLOW builds spilled 8-24 B as one launch (D 64-256, both arches)"),
)


def backward_launches(dtype: torch.dtype, dv: int, *, tq: int, tk: int, has_alibi: bool, group: int,
                      is_causal: bool, arch: int = 90, gpu: bool | None = None, varlen: bool = False) -> list[Launch]:
    """The main backward kernel's launches for V's dtype, head size Dv, the lengths (their evenness), ALiBi,
    the GQA group, causality and the sm version (80: mma.sync, 90: wgmma): one launch, or dV and then the
    rest (SPLIT_DV). The launcher and the compile check both call it. gpu=None: launch.gpu_launch_configs().
    varlen: a pack (the VARLEN build); its sequences' lengths are on the device only, so EVEN_M and EVEN_N
    are False whatever tq and tk (the pack's totals) are, and _VARLEN_RULES apply on top of _RULES."""
    gpu = gpu_launch_configs() if gpu is None else gpu
    block_d = block_size(dv)
    shape = _launch_shape(dtype, dv, has_alibi, group, is_causal, arch)
    base = (_BASE_FP32 if shape.fp32 else _BASE)[max(64, block_d)]
    cfg = apply_rules(dict(base, DOT_PRECISION="ieee", RED_PRECISION="ieee", SPLIT_DV=False), _RULES, shape)
    if varlen:
        cfg = apply_rules(cfg, _VARLEN_RULES, shape)
    if not gpu:
        cfg.update(_INTERPRET_TILES)
    common = {"GROUP": group, "IS_CAUSAL": bool(is_causal), "HAS_ALIBI": has_alibi, "BLOCK_M": cfg["BLOCK_M"],
              "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": block_d, "EVEN_M": not varlen and tq % cfg["BLOCK_M"] == 0,
              "EVEN_N": not varlen and tk % cfg["BLOCK_N"] == 0, "MASK_D": block_d != dv,
              "DOT_PRECISION": cfg["DOT_PRECISION"], "RED_PRECISION": cfg["RED_PRECISION"], "GPU": gpu,
              "DT_TILE": cfg["DT_TILE"], "VARLEN": bool(varlen)}
    if not varlen:
        # a dense build takes the pack's arguments as None constants: it compiles as if they did not exist
        common.update(CU_Q=None, CU_K=None, KB_COLS=None)
    common["OVERFLOW"] = False
    if not cfg["SPLIT_DV"]:
        launches = [Launch(dict(common, WITH_DV=True, WITH_DLAMBDA=True), cfg["num_warps"], cfg["num_stages"])]
    else:
        launches = [Launch(dict(common, WITH_DV=True, WITH_DLAMBDA=False), cfg["num_warps"], cfg["num_stages"]),
                    Launch(dict(common, WITH_DV=False, WITH_DLAMBDA=True), cfg.get("warps_dlambda", cfg["num_warps"]),
                           cfg.get("stages_dlambda", cfg["num_stages"]))]
    return launches


def overflow_launches(dtype: torch.dtype, dv: int, *, has_alibi: bool, group: int, is_causal: bool, arch: int = 90,
                      gpu: bool | None = None) -> list[Launch]:
    """A pack's OVERFLOW launches (the key blocks past max_seqlen_k, only a launch-size hint; one program per
    (sequence, kv head)), for the arguments of backward_launches: the main launches with half the keys per
    block and _OVERFLOW_BASE, then _OVERFLOW_RULES (at the main tiles the loop over blocks spilled 16-24 B,
    bf16/fp16 D=64 causal)."""
    main = backward_launches(dtype, dv, tq=0, tk=0, has_alibi=has_alibi, group=group, is_causal=is_causal,
                             arch=arch, gpu=gpu, varlen=True)
    cfg = apply_rules(_OVERFLOW_BASE, _OVERFLOW_RULES, _launch_shape(dtype, dv, has_alibi, group, is_causal, arch))
    if cfg["SPLIT_DV"] and len(main) == 1:
        (one,) = main
        main = [Launch(dict(one.constexprs, WITH_DLAMBDA=False), one.num_warps, one.num_stages),
                Launch(dict(one.constexprs, WITH_DV=False), one.num_warps, one.num_stages)]
    launches = []
    for launch in main:
        constexprs = dict(launch.constexprs, OVERFLOW=True, BLOCK_N=max(16, launch.constexprs["BLOCK_N"] // 2))
        warps = cfg["num_warps"] if constexprs["WITH_DLAMBDA"] else cfg["warps_dv"]
        launches.append(Launch(constexprs, warps, launch.num_stages))
    return launches


def _launch_shape(dtype: torch.dtype, dv: int, has_alibi: bool, group: int, is_causal: bool, arch: int) -> LaunchShape:
    return LaunchShape(dtype, block_size(dv), has_alibi, arch, group=group, is_causal=bool(is_causal),
                       old_triton=triton_before(3, 9))


def preprocess_launch(dv: int, row_block: int, varlen: bool = False) -> Launch:
    """The preprocess kernel's launch: about 8K elements of O and dO per program; the main kernel's BLOCK_M
    (`row_block`) sets the layout of the rows it writes; varlen: a pack (the VARLEN build)."""
    block_d = block_size(dv)
    constexprs = {"BLOCK_M": max(16, min(64, 8192 // block_d)), "BLOCK_D": block_d, "ROW_BLOCK": row_block,
                  "VARLEN": bool(varlen)}
    if not varlen:
        # the pack's arguments as None constants (see backward_launches)
        constexprs.update(CU_Q=None, IDX=None, B=None, MAX_Q=None)
    return Launch(constexprs, num_warps=4, num_stages=1)


def partial_slots(num_kb: int, b_hkv: int, device: torch.device) -> int:
    """Key blocks per launch (= dλq partials per query row) for one (batch, kv head): MAX_SLOTS, or fewer
    key blocks. 2 on the CPU, so that the interpreter runs several launches adding into their slots."""
    return max(1, min(num_kb, MAX_SLOTS if device.type == "cuda" else 2))


def attention_bwd_triton(dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal, seqs=None, *,
                         poison: bool = False, dv: torch.Tensor | None = None, dlk: torch.Tensor | None = None):
    """Fused taumode attention backward: (dlq, dlk, dv, dtemperature, dalibi) per docs/internal-contract.md;
    seqs (varlen.Seqs): the inputs are a pack (see the module docstring).

    poison=True fills every output and partial buffer with NaN before the kernels run, so a test sees any
    element a kernel forgets to write. dv, dlk: tensors of the shapes of v and lk (dlk contiguous) to write
    into instead of new ones (tests pass views of larger buffers to see that nothing outside them is written).
    """
    dv_dim = v.shape[-1]
    if dv_dim > MAX_FUSED_DV[v.dtype]:
        # a pack runs per group of sequences there (it reads the offsets on the host)
        return reference.attention_bwd_chunked(dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal, seqs)
    with on_device(v):
        return _attention_bwd(dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal, seqs, poison, dv, dlk)


def _preprocess(out, dout, lse, lq, block_m: int, seqs, new):
    """The preprocess kernel's ROWS (λq, lse·log2e and D per query block of the main kernel) and, for a pack,
    IDX (each query row's row in the aligned partial-dλq layout; None when dense)."""
    b, h, tq = lq.shape
    dv_dim, device, nan = out.shape[-1], out.device, float("nan")
    pre = preprocess_launch(dv_dim, block_m, varlen=seqs is not None)
    if seqs is not None:
        count = seqs.count
        # per (head, query block of a sequence); total_q // BLOCK_M + B blocks per head bound the sequences'
        # cdiv(Tq_b, BLOCK_M) blocks without a host read
        rows = new((h, tq // block_m + count, 3, block_m), nan, dtype=torch.float32, device=device)
        # rows past the last sequence gather the zero row after the partial-dλq rows (the sequences' rows
        # overwrite their entries)
        idx = torch.full((tq,), DLQ_ROW_ALIGN.value * (tq // DLQ_ROW_ALIGN.value + count), dtype=torch.int32,
                         device=device)
        # no sequence has more rows than the pack: a larger max_seqlen_q would only add programs that exit
        max_q = min(seqs.max_q, tq)
        grid = triton.cdiv(triton.cdiv(max_q, block_m) * block_m, pre.constexprs["BLOCK_M"]) * count * h
        pack_args = (seqs.cu_q, idx, count, max_q)
    else:
        # per query block of the main kernel, padded past Tq
        num_qb = triton.cdiv(tq, block_m)
        rows = new((b * h, num_qb, 3, block_m), nan, dtype=torch.float32, device=device)
        idx = None
        grid = triton.cdiv(num_qb * block_m, pre.constexprs["BLOCK_M"]) * b * h
        pack_args = ()
    if grid:  # a pack whose sequences have no queries: no rows to prepare (none is read)
        attention_bwd_preprocess_kernel[(grid,)](
            out, dout, lse, lq, rows, *out.stride(), *dout.stride(), *lq.stride(), h, tq, dv_dim, *pack_args,
            **pre.options(),
        )
    return rows, idx


def _attention_bwd(dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal, seqs, poison, dv, dlk):
    b, h, tq = lq.shape
    hkv, tk, dv_dim = lk.shape[1], lk.shape[2], v.shape[-1]
    device = v.device
    pack = seqs is not None
    if pack:
        _varlen.check_max_lengths(seqs, tq, tk)
        # decreasing trusted offsets read as their running maximum, as in the forward (varlen.effective)
        seqs = seqs._replace(cu_q=_varlen.monotone(seqs.cu_q), cu_k=_varlen.monotone(seqs.cu_k))
    # a pack: b = 1 batch row, tq / tk its total rows, `count` sequences of at most max_k keys
    count = seqs.count if pack else b
    launches = backward_launches(v.dtype, dv_dim, tq=tq, tk=tk, has_alibi=alibi_slopes is not None, group=h // hkv,
                                 is_causal=is_causal, arch=arch_of(device), varlen=pack)
    block_m, block_n = launches[0].constexprs["BLOCK_M"], launches[0].constexprs["BLOCK_N"]
    num_kb = triton.cdiv(min(seqs.max_k, tk) if pack else tk, block_n)
    slots = partial_slots(num_kb, count * hkv, device)
    # a pack's programs: one sequence more (b = B, the keys past the last sequence: zero gradients), and a
    # DT_PART / DSLOPE_PART column for every key block the launches cover (the OVERFLOW launch adds the
    # blocks past them, past max_seqlen_k, into column 0)
    programs, kb_cols = (count + 1, triton.cdiv(num_kb, slots) * slots) if pack else (count, num_kb)

    new = torch.full if poison else (lambda shape, _fill, **kw: torch.empty(shape, **kw))
    nan = float("nan")
    if dv is None and pack:
        # dv in packed (total_k, Hkv, Dv) memory, seen as the pack's one batch row
        dv = new((tk, hkv, dv_dim), nan, dtype=v.dtype, device=device).permute(1, 0, 2).unsqueeze(0)
    elif dv is None:
        dv = new((b, hkv, tk, dv_dim), nan, dtype=v.dtype, device=device)
    if dlk is None:
        dlk = new((b, hkv, tk), nan, dtype=torch.float32, device=device)
    if poison:
        dv.fill_(nan)
        dlk.fill_(nan)
    if pack:
        # each sequence's partial-dλq rows from a multiple of DLQ_ROW_ALIGN (vectorised accesses), gathered
        # back into the pack's rows by IDX below
        align = DLQ_ROW_ALIGN.value
        dlq_part = new((slots, h, align * (tq // align + count)), nan, dtype=torch.float32, device=device)
    else:
        dlq_part = new((slots, b, h, tq), nan, dtype=torch.float32, device=device)
    # per (sequence, head, key block); a pack's columns run to its longest sequence's key blocks
    dt_part = new((programs, h, kb_cols), nan, dtype=torch.float32, device=device)
    dslope_part = (new((programs, h, kb_cols), nan, dtype=torch.float32, device=device) if alibi_slopes is not None
                   else dt_part)
    if count * h == 0 or tq == 0 or tk == 0 or num_kb == 0:
        dv.zero_()
        dlk.zero_()
        dlq = torch.zeros(b, h, tq, dtype=torch.float32, device=device)
        dtemp = torch.zeros(h, dtype=torch.float32, device=device)
        dalibi = None if alibi_slopes is None else torch.zeros(count, h, dtype=torch.float32, device=device)
        return dlq, dlk, dv, dtemp, dalibi

    dout = dout.to(v.dtype)
    rows, idx = _preprocess(out, dout, lse.to(torch.float32).contiguous(), lq, block_m, seqs, new)
    slopes = alibi_slopes.to(torch.float32).contiguous() if alibi_slopes is not None else rows
    temp = temperature.to(torch.float32).contiguous()
    pack_args = (seqs.cu_q, seqs.cu_k, kb_cols) if pack else ()
    # key blocks kb_start .. kb_start + slots - 1 per launch, each adding into its slot (see the kernel)
    for kb_start in range(0, num_kb, slots):
        for launch in launches:
            taumode_attention_bwd_kernel[(programs * hkv * slots,)](
                rows, lk, v, dout, temp, slopes,
                dv, dlk, dlq_part, dt_part, dslope_part,
                *lk.stride(), *v.stride(), *dout.stride(), *dv.stride(),
                count, h, tq, tk, dv_dim, slots, kb_start, *pack_args, **launch.options(),
            )
    if pack:
        for launch in overflow_launches(v.dtype, dv_dim, has_alibi=alibi_slopes is not None, group=h // hkv,
                                        is_causal=is_causal, arch=arch_of(device)):
            # its first block (in its own BLOCK_N) starts where the other launches' kb_cols blocks end
            first = kb_cols * block_n // launch.constexprs["BLOCK_N"]
            taumode_attention_bwd_kernel[(programs * hkv,)](
                rows, lk, v, dout, temp, slopes,
                dv, dlk, dlq_part, dt_part, dslope_part,
                *lk.stride(), *v.stride(), *dout.stride(), *dv.stride(),
                count, h, tq, tk, dv_dim, 1, first, *pack_args, **launch.options(),
            )
    # fixed-order reductions of the per-slot and per-key-block partials
    if pack:
        # the slot sum with one zero row more, which the rows in no sequence gather (IDX)
        summed = torch.empty(h, dlq_part.shape[-1] + 1, dtype=torch.float32, device=device)
        summed[:, -1] = 0.0
        torch.sum(dlq_part, 0, out=summed[:, :-1])
        dlq = summed.index_select(1, idx).mul_(-1.0 / temp.view(h, 1)).unsqueeze(0)
    else:
        dlq = dlq_part.sum(0).mul_(-1.0 / temp.view(1, h, 1))
    dtemp = dt_part.sum(dim=(0, 2))
    dalibi = None if alibi_slopes is None else dslope_part[:count].sum(2).to(alibi_slopes.dtype)
    return dlq, dlk, dv, dtemp.to(temperature.dtype), dalibi
