"""The backward kernels' rows of the compile check (`python -m tauformer_kernels.compile_check`).

`entries()` lists each backward kernel at representative constexprs, built from the launcher's own
`backward_config` per arch so the check compiles what the launcher runs; `kernel_cases()` hands them to
`compile_check` as KernelCase rows. Each entry names the kernel, its signature
(argument name -> Triton type; strides of the last dimension are the constant 1 as the launcher's
contiguous-last-dim tensors give, and the others are marked divisible by 16 as Triton's launcher
specialises them), the constexprs and the launch options.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tauformer_kernels.kernels.taumode_attention_backward import (
    attention_bwd_preprocess_kernel,
    taumode_attention_bwd_kernel,
)

_TRITON_DTYPE = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


@dataclass
class Entry:
    name: str
    fn: object
    # argument name -> Triton type ("*fp16", "i32", ...); names given in `ones` are the constant 1
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2
    ones: tuple = ()
    # arguments (pointers and strides/sizes) specialised as divisible by 16
    div16: tuple = ()
    scores_per_iter: int = 0
    extra: dict = field(default_factory=dict)
    # sm version -> {"constexprs": {...}, "num_warps": n, "num_stages": n} where the launcher's config for
    # that arch differs from the fields above (which hold the sm_90 config)
    per_arch: dict = field(default_factory=dict)


def _attention_bwd_entries(dtype: str, block_d: int, causal: bool, alibi: bool, group: int,
                           even: bool = True) -> list[Entry]:
    """The launches of the attention backward for these arguments: one, or the two of a split config."""
    import torch

    from tauformer_kernels.attention_triton_backward import backward_config

    tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    launches = backward_config(tdtype, block_d, has_alibi=alibi, group=group, is_causal=causal,
                               interpret=False)["launches"]
    if len(launches) == 1:
        return [_attention_bwd_entry(dtype, block_d, causal, alibi, group, even)]
    return [_attention_bwd_entry(dtype, block_d, causal, alibi, group, even, parts=parts) for parts in ("dv", "dlambda")]


def _attention_bwd_entry(dtype: str, block_d: int, causal: bool, alibi: bool, group: int,
                         even: bool = True, name: str = "", parts: str = "") -> Entry:
    """The attention backward at the launcher's own configuration (`backward_config`) for these arguments;
    `parts` "dv" or "dlambda": one launch of a split config (WITH_DV / WITH_DLAMBDA), "" both."""
    import torch

    from tauformer_kernels.attention_triton_backward import backward_config, dot_precisions

    tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    cfgs = {arch: backward_config(tdtype, block_d, has_alibi=alibi, group=group, is_causal=causal, arch=arch,
                                  interpret=False) for arch in (80, 90)}
    cfg = cfgs[90]
    p = _TRITON_DTYPE[dtype]
    f32 = "*fp32"
    sig = {"ROWS": f32, "LK": f32, "V": p, "DO": p, "TEMP": f32, "SLOPES": f32,
           "DV": p, "DLK": f32, "DLQ_PART": f32, "DT_PART": f32, "DSLOPE_PART": f32}
    strides = [f"stride_{t}_{d}" for t, dims in (("lk", "bht"), ("v", "bhtd"), ("do", "bhtd"),
                                                 ("dv", "bhtd")) for d in dims]
    for s in strides:
        sig[s] = "i32"
    for s in ("B", "H", "Tq", "Tk", "Dv", "SLOTS", "KB_START"):
        sig[s] = "i32"
    ones = ("stride_lk_t", "stride_v_d", "stride_do_d", "stride_dv_d")
    div16 = tuple(k for k, v in sig.items() if v.startswith("*")) + tuple(
        s for s in strides if s not in ones) + ("Tq", "Tk")
    prec = dot_precisions(tdtype, block_d)
    ce = {"GROUP": group, "IS_CAUSAL": causal, "HAS_ALIBI": alibi, "BLOCK_M": cfg["BLOCK_M"],
          "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": block_d, "EVEN_M": even, "EVEN_N": even, "MASK_D": False,
          "DOT_PRECISION": prec[0], "RED_PRECISION": prec[1], "GPU": True,
          "DT_TILE": cfg["DT_TILE"], "WITH_DV": parts != "dlambda", "WITH_DLAMBDA": parts != "dv"}
    launch = 1 if parts == "dlambda" else 0  # its index in backward_config's "launches"
    per_arch = {arch: {"constexprs": dict(ce, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], DT_TILE=c["DT_TILE"]),
                       "num_warps": c["launches"][launch][2], "num_stages": c["num_stages"]} for arch, c in cfgs.items()}
    label = f" {parts}" if parts else ""
    return Entry(name or f"taumode_attention_bwd {dtype} D={block_d} causal={causal} alibi={alibi} G={group}{label}",
                 taumode_attention_bwd_kernel, sig, ce, cfg["launches"][launch][2], cfg["num_stages"], ones, div16,
                 cfg["BLOCK_M"] * cfg["BLOCK_N"], per_arch=per_arch)


def _preprocess_entry(dtype: str, block_d: int) -> Entry:
    import torch

    from tauformer_kernels.attention_triton_backward import backward_config, preprocess_block_m

    tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    row_block = backward_config(tdtype, block_d, interpret=False)["BLOCK_M"]
    p = _TRITON_DTYPE[dtype]
    sig = {"OUT": p, "DO": p, "LSE": "*fp32", "LQ": "*fp32", "ROWS": "*fp32"}
    for t in ("o", "do"):
        for d in "bhtd":
            sig[f"stride_{t}_{d}"] = "i32"
    for d in "bht":
        sig[f"stride_lq_{d}"] = "i32"
    sig.update(H="i32", Tq="i32", Dv="i32")
    ones = ("stride_o_d", "stride_do_d", "stride_lq_t")
    div16 = ("OUT", "DO", "LSE", "LQ", "ROWS", "stride_o_b", "stride_o_h", "stride_o_t", "stride_do_b",
             "stride_do_h", "stride_do_t", "stride_lq_b", "stride_lq_h", "Tq")

    return Entry(f"attention_bwd_preprocess {dtype} D={block_d}", attention_bwd_preprocess_kernel, sig,
                 {"BLOCK_M": preprocess_block_m(block_d), "BLOCK_D": block_d, "ROW_BLOCK": row_block}, 4, 1,
                 ones, div16)


def _lambda_bwd_entry(dtype: str, block_f: int, cfg: dict) -> Entry:
    from tauformer_kernels.kernels.taumode_lambda_backward import taumode_lambda_bwd_kernel

    p = _TRITON_DTYPE[dtype]
    sig = {"DLAM": "*fp32", "X": p, "LAP": "*fp32", "TAU": "*fp32", "DX": p, "DTAU_PART": "*fp32"}
    for t in ("dlam", "x", "dx"):
        for d in ("bht" if t == "dlam" else "bhtf"):
            sig[f"stride_{t}_{d}"] = "i32"
    sig.update(H="i32", T="i32", F="i32", eps="fp32")
    ones = ("stride_dlam_t", "stride_x_f", "stride_dx_f")
    div16 = tuple(k for k, v in sig.items() if v.startswith("*")) + tuple(
        k for k in sig if k.startswith("stride") and k not in ones) + ("T", "F")
    ce = {"BLOCK_T": cfg["BLOCK_T"], "BLOCK_F": block_f, "BLOCK_K": cfg["BLOCK_K"], "MASK_F": False,
          "DOT_PRECISION": "tf32x3" if dtype == "fp32" else "tf32"}
    return Entry(f"taumode_lambda_bwd {dtype} F={block_f}", taumode_lambda_bwd_kernel, sig, ce,
                 cfg["num_warps"], cfg["num_stages"], ones, div16)


def entries() -> list[Entry]:
    """Every backward kernel at the constexprs the launchers use on a GPU."""
    import torch

    from tauformer_kernels.lambda_triton_backward import gpu_config

    rows = [("bf16", 64, True, False, 1, True), ("fp16", 64, True, False, 1, True), ("fp32", 64, True, False, 1, True),
            ("bf16", 64, True, True, 4, False), ("fp16", 64, False, False, 2, False)]
    rows += [("bf16", d, True, False, 1, True) for d in (128, 256, 512)]
    rows += [("bf16", 512, True, True, 2, False), ("fp32", 128, True, True, 1, False), ("fp32", 256, True, True, 1, False),
             ("fp32", 256, True, False, 1, True),
             ("fp32", 256, False, False, 1, False), ("fp32", 64, True, True, 2, False)]
    # fp32 Dv >= 256 with GQA: the split launches (dV alone, then the λ/temperature/slope gradients)
    rows += [("fp32", 256, True, False, 2, False), ("fp32", 256, False, False, 2, False),
             ("fp32", 256, True, True, 2, False)]
    out = [e for dtype, d, causal, alibi, group, even in rows
           for e in _attention_bwd_entries(dtype, d, causal, alibi, group, even)]
    for dtype in ("bf16", "fp32"):
        out.append(_preprocess_entry(dtype, 64))
    out.append(_preprocess_entry("bf16", 512))
    for f in (64, 128, 256, 512):
        for dtype in ("bf16", "fp32"):
            out.append(_lambda_bwd_entry(dtype, f, gpu_config(f, torch.float32 if dtype == "fp32" else torch.bfloat16)))
    return out


def model_entries() -> list[Entry]:
    """The main loop alone for the static model: non-causal, even shapes, one query head per kv head, so
    the only loop in the SASS is the unmasked tile loop that causal programs spend their time in."""
    return [_attention_bwd_entry(dt, 64, False, False, 1, name=f"bwd main loop {dt} D=64")
            for dt in ("bf16", "fp16")]


def kernel_cases() -> list:
    """The backward entries as rows of `tauformer_kernels.compile_check.KERNELS` (KernelCase), each with its
    per-arch config (`backward_config(arch=)` differs by arch: DT_TILE is off on sm_80 for fp16/bf16 Dv<=64)."""
    from tauformer_kernels.compile_check import KernelCase

    rows = []
    for e in entries() + model_entries():
        args = {}
        for k, ty in e.signature.items():
            args[k] = f"{ty}:1" if k in e.ones else (f"{ty}:16" if k in e.div16 else ty)
        rows.append(KernelCase(e.name, f"{e.fn.__module__.rsplit('.', 1)[-1]}:{e.fn.__name__}", args,
                               dict(e.constexprs), e.num_warps, e.num_stages, e.scores_per_iter, dict(e.per_arch)))
    return rows
