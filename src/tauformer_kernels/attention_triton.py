"""Launcher of the fused Triton taumode attention forward (kernels/taumode_attention.py).

`attention_fwd_triton(lq, lk, v, temperature, alibi_slopes, is_causal, seqs=None) -> (out, lse)` follows
docs/internal-contract.md: inputs are trusted (validated at the public API), λ and temperature are fp32,
lk and v may be non-contiguous (decode passes slices of a preallocated cache). seqs (varlen.Seqs): a pack
of variable-length sequences as one batch row (docs/math.md §Packed sequences), run by the kernel's
VARLEN build with no padding and no host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tauformer_kernels import varlen as _varlen
from tauformer_kernels.kernels.taumode_attention import taumode_attention_fwd_kernel
from tauformer_kernels.launch import (
    MAX_GRID_YZ as _MAX_GRID_YZ,
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

# Largest λ span (max − min of λq and λk, in log2 units of 1/temperature) for which the factorised path
# (no exponential per score, no online maximum) is used. It bounds how far a row's maximum can fall below
# the fixed reference: for fp32/bf16 P (fp32's exponent range) the kernel's factor limit binds first
# (1.5·span + σN/2 <= 96); fp16 P has only 2^-14 of normal range below 1, so its rows must keep a maximum
# near 1 (and its half2 factors within 2^±12).
_FAST_SPAN = {torch.float32: 64.0, torch.bfloat16: 64.0, torch.float16: 8.0}

# Tiles (BLOCK_M query rows × BLOCK_N keys), pipeline stages and warps on a GPU, chosen with the compile
# check's static model (kernels/DESIGN.md): 128×64 for Dv <= 64; 64 rows for Dv up to 128 per program.
# Larger Dv is split over grid axis 2 (each program recomputes P for its columns). Under TRITON_INTERPRET=1
# one small config: the interpreter runs each program in numpy.
_MAX_BLOCK_D = 128
_FORWARD_BASE = {"BLOCK_M": 128, "BLOCK_N": 64, "num_stages": 3, "warps_factorised": 4, "warps_general": 4}
_FORWARD_RULES = (
    Rule(lambda s: s.block_d > 64, {"BLOCK_M": 64}, "Dv up to 128 per program: 64 query rows keep O in registers"),
    Rule(lambda s: s.fp32, {"BLOCK_M": 64, "BLOCK_N": 32, "num_stages": 2},
         "tf32x3 triples the P·V operands"),
    Rule(lambda s: s.has_alibi, {"warps_general": 8},
         "the general path's ALiBi row values: 8 warps (half the rows per thread) keep it spill-free"),
    Rule(lambda s: not s.fp32 and s.arch < 90, {"warps_general": 8},
         "sm_80's mma.sync layouts: the 4-warp general build spilled 8 B at 128×64"),
    Rule(lambda s: s.wide and not s.fp32, {"warps_factorised": 8, "warps_general": 8},
         "64-bit offsets hold more registers: 4 warps spilled 24-40 B"),
    Rule(lambda s: s.paged and not s.fp32, {"BLOCK_M": 64},
         "keys through a block table (a page and 64-bit address per key row): 128 rows spilled 8-248 B in the "
         "factorised build (bf16 sm_90: 248 B)"),
    Rule(lambda s: s.paged and not s.fp32 and s.arch < 90, {"warps_factorised": 8},
         "paged factorised 64×64 at 4 warps kept 8 B of stack on sm_80"),
    Rule(lambda s: s.paged and s.fp32 and s.arch < 90, {"num_stages": 1},
         "paged fp32 general path at 2 stages spilled 56 B on sm_80 (8 B at 8 warps)"),
)
# A pack's OVERFLOW launch (the query blocks past max_seqlen_q, only a launch-size hint): one program per
# (sequence, head) loops over them on the general path, exact for any input (kernels/DESIGN.md, Packed
# sequences). Half the query rows and 8 warps (the loop's state on top of the general path spilled 16-48 B at the
# main tiles: bf16 sm_90 at 4 warps, fp32 sm_80 at 8), then these rules. It works only where max_seqlen_q
# understates a sequence: configs chosen to be spill-free, not fast.
_OVERFLOW_RULES = (
    Rule(lambda s: s.old_triton and s.arch < 90, {"num_stages": 1},
         "Triton 3.6: the non-causal fp16 Dv 48 overflow launch at 3 stages spilled 216 B on sm_80 (4 warps 248 B)"),
)
_FORWARD_INTERPRET = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 1, "warps_factorised": 4, "warps_general": 4}
_OVERFLOW_WARPS = 8
# An offset at or past this many elements needs the kernel's 64-bit (WIDE) build.
_WIDE_OFFSET = 2**31

# Launches per path choice: "auto" writes each program from the factorised launch (PATH 1) where that path
# is exact and from the general launch (PATH 2) otherwise (both launches compute the same condition in the
# kernel); "general" writes every program from the general path (PATH 3).
_PATHS = {"auto": (1, 2), "general": (3,)}


def forward_launches(dv: int, dtype: torch.dtype, *, is_causal: bool, has_alibi: bool, arch: int = 90,
                     wide: bool = False, path: str = "auto", gpu: bool | None = None,
                     varlen: bool = False, page_size: int | None = None) -> list[Launch]:
    """The forward's launches (one per PATH) for head size Dv, V's dtype, causality, ALiBi, the sm version,
    the 64-bit build and a pack of sequences (varlen: the VARLEN build, same tiles and warps; page_size: its
    keys in a paged cache of pages of that many keys, the PAGED build). The launcher and the compile check both
    call it; the warps may differ between the launches, the tiles may not (they define the programs).
    gpu=None: launch.gpu_launch_configs()."""
    block_d = min(block_size(dv), _MAX_BLOCK_D)
    gpu = gpu_launch_configs() if gpu is None else gpu
    shape = LaunchShape(dtype, block_d, has_alibi, arch, wide=wide, old_triton=triton_before(3, 9),
                        paged=page_size is not None)
    cfg = apply_rules(_FORWARD_BASE, _FORWARD_RULES, shape) if gpu else _FORWARD_INTERPRET
    common = {
        "IS_CAUSAL": bool(is_causal), "HAS_ALIBI": has_alibi, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
        "BLOCK_D": block_d, "MASK_D": dv % block_d != 0, "N_DCHUNK": triton.cdiv(dv, block_d), "WIDE": wide,
        "VARLEN": bool(varlen or page_size), "OVERFLOW": False, "PAGED": page_size is not None, "PAGE_SIZE": page_size,
        "FAST_SPAN": _FAST_SPAN[dtype], "FACTOR_DTYPE": factor_dtype(dtype, has_alibi),
        # fp32 needs ~1e-5 relative, which tf32 (10-bit mantissa) misses; tf32x3 (hi/lo split, three
        # tensor-core passes) keeps ~1e-6. fp16/bf16 P and V are exact inputs.
        "DOT_PRECISION": "tf32x3" if dtype == torch.float32 else "ieee",
    }
    if page_size is None:
        # a build without pages takes the table's arguments as None constants (it compiles as if they did not exist)
        common.update(BLOCK_TABLE=None, SEQ_LENS=None, stride_bt=None, N_PAGES=None)
    launches = [Launch(dict(common, PATH=p), cfg["warps_factorised" if p == 1 else "warps_general"],
                       cfg["num_stages"]) for p in _PATHS[path]]
    if common["VARLEN"]:
        overflow = apply_rules({"num_stages": cfg["num_stages"]}, _OVERFLOW_RULES, shape) if gpu else cfg
        launches.append(Launch(dict(common, PATH=3, OVERFLOW=True, BLOCK_M=max(16, cfg["BLOCK_M"] // 2)),
                               _OVERFLOW_WARPS, overflow["num_stages"]))
    return launches


def max_offset(t: torch.Tensor) -> int:
    """The largest element offset a kernel forms into t: Σ (size - 1)·stride."""
    return sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0)


def factor_dtype(dtype: torch.dtype, has_alibi: bool):
    """Arithmetic of the factorised path's per-score products: packed fp16 (half2) when V is fp16 and there is
    no ALiBi (the factors then lie within 2^±12, see _FAST_SPAN), fp32 otherwise."""
    return tl.float16 if dtype == torch.float16 and not has_alibi else tl.float32


def attention_fwd_triton(lq, lk, v, temperature, alibi_slopes, is_causal, seqs: _varlen.Seqs | None = None, *,
                         pages: tuple[torch.Tensor, torch.Tensor] | None = None, poison: bool = False,
                         path: str = "auto", out: torch.Tensor | None = None, lse: torch.Tensor | None = None):
    """Fused taumode attention forward: (out (B, H, Tq, Dv) in v.dtype, lse (B, H, Tq) fp32).

    seqs: a pack (docs/math.md §Packed sequences): lq (1, H, total_q), lk (1, Hkv, total_k), v (1, Hkv,
    total_k, Dv), any strides, alibi_slopes (B, H) one row per sequence; out is a (1, H, total_q, Dv) view of
    packed (total_q, H, Dv) memory (out[0].permute(1, 0, 2) is contiguous) and lse (1, H, total_q). Every row
    is written, whatever the offsets and max_seqlen_q say (docs/math.md §Packed sequences: rows that see no
    key get O = 0 and lse = +inf); max_seqlen_q < 1 with rows is refused.

    poison=True fills the outputs with NaN before the kernel runs, so a test sees any element the kernel
    forgets to write. path="general" forces the exponential-per-score path with an online maximum
    (exact for any input) where "auto" would take the factorised one: tests compare the two. out, lse:
    tensors of the shapes above to write into instead of new ones (tests pass views of larger buffers to
    see that nothing outside them is written).

    pages = (block_table (B, width) int32, seq_lens (B,) int32): with seqs, the keys are in a paged cache (the
    kernel's PAGED build): lk (pages, Hkv, page_size) fp32 and v (pages, Hkv, page_size, Dv), any strides;
    sequence b's key j at page block_table[b, j // page_size], slot j % page_size, for j < seq_lens[b] (clamped
    to the table's width·page_size; entries clamped into the pages). seqs.cu_k is not read, seqs.max_k is
    only checked (>= 1).
    """
    b, h, tq = lq.shape
    hkv, dv = lk.shape[1], v.shape[-1]
    # a paged cache: the keys a table row holds (the kernel clamps each sequence's count to it)
    tk = pages[0].shape[1] * lk.shape[2] if pages is not None else lk.shape[2]
    if seqs is not None:
        _varlen.check_max_lengths(seqs, tq, tk)
    if out is None and seqs is None:
        out = torch.empty(b, h, tq, dv, dtype=v.dtype, device=v.device)
    elif out is None:
        # packed memory, as the caller's (total_q, H, Dv) layout wants it; the kernel sees (1, H, total_q, Dv)
        out = torch.empty(tq, h, dv, dtype=v.dtype, device=v.device).permute(1, 0, 2).unsqueeze(0)
    if seqs is not None:
        # λ with unit stride along t, the layout the compile check's VARLEN rows prove spill-free: the bf16
        # factorised loop runs at 255 registers on sm_90, and a strided λ (a view of packed (total, H) λ,
        # stride H along t) costs it a spill. A no-op for the λ kernel's own (1, H, total) output; else a
        # copy of 4 bytes per row and head, against V's Dv elements.
        lq = lq.contiguous()
        lk = lk if pages is not None else lk.contiguous()
    if lse is None:
        lse = torch.empty(b, h, tq, dtype=torch.float32, device=lq.device)
    if poison:
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    if out.numel() == 0:
        return out, lse
    if seqs is not None:
        # decreasing trusted offsets read as their running maximum (no host read), as every backend reads
        # them (varlen.effective); the kernel clamps them into the rows
        seqs = seqs._replace(cu_q=_varlen.monotone(seqs.cu_q),
                             cu_k=pages[1] if pages is not None else _varlen.monotone(seqs.cu_k))
    # per (batch row or sequence, kv head) range of λk: decides, inside the kernel, whether the factorised
    # path is exact (an empty sequence's (+inf, -inf) is never read: its programs exit). A paged build finds
    # it itself (it reads no KMIN/KMAX: any pointer will do).
    if pages is None:
        k_lo, k_hi = (t.contiguous() for t in _varlen.key_range(lk, seqs))
    else:
        k_lo = k_hi = temperature
    slopes = alibi_slopes.to(torch.float32).contiguous() if alibi_slopes is not None else k_lo
    temperature = temperature.to(torch.float32).contiguous()
    has_alibi = alibi_slopes is not None
    # 64-bit offsets only where one can pass 2^31 elements (the 32-bit build holds fewer registers); a pack's
    # sequence bases lie inside its tensors, so their offsets are bounded the same way
    # (a paged build forms the cache's page offsets in 64 bits whatever WIDE says)
    wide = max(max_offset(t) for t in ((lq, out, lse) if pages else (lq, lk, v, out, lse))) >= _WIDE_OFFSET
    launches = forward_launches(dv, v.dtype, is_causal=is_causal, has_alibi=has_alibi, arch=arch_of(v.device),
                                wide=wide, path=path, varlen=seqs is not None,
                                page_size=lk.shape[2] if pages is not None else None)
    tiles = launches[0].constexprs
    if seqs is None:
        # CU_Q, CU_K are not read by the dense build: any pointer will do
        cu_q = cu_k = k_lo
        rows, batch = tq, b
    else:
        # the kernel reads sequence b's offsets and lengths; the pack's batch strides go unread. One sequence
        # more (b = B): the rows past the last offset. No sequence has more rows than the pack: a larger
        # max_seqlen_q would only add programs that exit
        cu_q, cu_k = seqs.cu_q.contiguous(), seqs.cu_k.contiguous()
        rows, batch = min(seqs.max_q, tq), seqs.count + 1
    if pages is not None:
        block_table, seq_lens = pages
        paged_args = dict(BLOCK_TABLE=block_table, SEQ_LENS=seq_lens, stride_bt=block_table.stride(0),
                          N_PAGES=lk.shape[0])
    else:
        paged_args = {}
    # b·h over axes 1 and 2 (each at most 65,535 programs), query blocks on axis 0
    bh = batch * h
    bh_axis = min(bh, _MAX_GRID_YZ)
    q_blocks = triton.cdiv(rows, tiles["BLOCK_M"])
    with on_device(v):
        for launch in launches:
            # the OVERFLOW launch: one program per (sequence, head), past the other launches' q_blocks
            grid = (1 if launch.constexprs["OVERFLOW"] else q_blocks, bh_axis,
                    triton.cdiv(bh, bh_axis) * tiles["N_DCHUNK"])
            taumode_attention_fwd_kernel[grid](
                lq, lk, v, temperature, slopes, k_lo, k_hi, out, lse,
                *lq.stride(), *lk.stride(), *v.stride(), *out.stride(),
                bh, h, h // hkv, tq, tk, dv, cu_q, cu_k, lse.stride(1), q_blocks * tiles["BLOCK_M"], **paged_args,
                **launch.options(),
            )
    return out, lse
