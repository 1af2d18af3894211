"""Compile every Triton kernel for NVIDIA targets ahead of time, with no GPU, and report its resources.

    python -m tauformer_kernels.compile_check --arch 80 90 [--cache DIR] [--only NAME] [--loops]

Per kernel and arch: registers, stack bytes (spills), shared memory, and counts of tensor-core (HMMA/HGMMA)
and MUFU instructions in the SASS (disassembled with the nvdisasm/cuobjdump that ship inside triton), and
whether the PTX of a 64-bit build forms every batch and head base in 64 bits (`narrow_base_products`). With
--loops, each loop of the SASS gets a static cycle estimate (the same throughput model as
../shared/tools/sass_model.py: tensor FMAs, FP32 ALU, MUFU and issue per SM clock) and, where the kernel
declares its scores per iteration, cycles per 1,000 scores. Exits non-zero if a kernel fails to compile,
spills, or (a 64-bit build) forms a batch/head base offset in 32 bits.

The kernels are a table (`KERNELS`): one row per (kernel, representative constexprs). Arguments are typed
the way the JIT specialises them at a launch: pointers and strides divisible by 16 where a real launch's
are, the innermost stride of V and O equal to 1 (a constexpr).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

# Per-SM, per-clock throughputs (published figures; see ../shared/notes/gpu-static-model.md): dense fp16
# tensor FMAs, FP32 ALU warp-instructions, MUFU warp-instructions, issue (4 schedulers).
_SM = {80: {"fma_tc": 1024, "alu": 4.0, "mufu": 0.5, "issue": 4.0},
       90: {"fma_tc": 2048, "alu": 4.0, "mufu": 0.5, "issue": 4.0}}
_FP_ALU = {"FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "FSWZADD", "HADD2", "HMUL2", "HFMA2", "HMNMX2",
           "HSETP2", "F2FP"}
_GUARD = re.compile(r"^@!?U?P\w+\s+")


@dataclasses.dataclass
class KernelCase:
    """One compilation: `args` maps each runtime argument to its type, with ':16' for divisibility by 16
    (pointers, strides, lengths a real launch aligns) or ':1' for a value the JIT specialises to 1."""
    name: str
    kernel: str  # "module:function" under tauformer_kernels.kernels
    args: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    scores_per_iter: int = 0  # BLOCK_M·BLOCK_N of the main loop, for cycles per 1,000 scores
    # {arch: {"constexprs": {...}, "num_warps": n, "num_stages": n}} where the launcher's config differs by arch
    per_arch: dict = dataclasses.field(default_factory=dict)

    def for_arch(self, arch: int) -> "KernelCase":
        """This row as the launcher builds it for sm_<arch>."""
        over = self.per_arch.get(arch)
        if not over:
            return self
        return dataclasses.replace(self, constexprs=dict(self.constexprs, **over["constexprs"]),
                                   num_warps=over["num_warps"], num_stages=over["num_stages"])


def _attention_args(v_dtype: str) -> dict:
    ptr = lambda t: f"*{t}:16"  # noqa: E731
    args = {"LQ": ptr("fp32"), "LK": ptr("fp32"), "V": ptr(v_dtype), "TEMP": ptr("fp32"), "SLOPES": ptr("fp32"),
            "KMIN": ptr("fp32"), "KMAX": ptr("fp32"), "OUT": ptr(v_dtype), "LSE": ptr("fp32")}
    for name in ("lq_b", "lq_h", "lk_b", "lk_h", "v_b", "v_h", "v_t", "o_b", "o_h", "o_t"):
        args[f"stride_{name}"] = "i32:16"
    args.update({"stride_lq_t": "i32:1", "stride_lk_t": "i32:1", "stride_v_d": "i32:1", "stride_o_d": "i32:1"})
    args.update({"BH": "i32", "H": "i32", "GROUP": "i32", "Tq": "i32", "Tk": "i32", "Dv": "i32"})
    return args


def _attention(name, v_dtype, dv, path, causal=True, alibi=False, wide=False):
    """The forward at the launcher's own configuration (attention_triton.forward_config) per arch."""
    import torch
    import triton.language as tl

    from tauformer_kernels.attention_triton import forward_config

    tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[v_dtype]
    cfgs = {arch: forward_config(dv, tdtype, has_alibi=alibi, arch=arch, wide=wide, gpu=True) for arch in (80, 90)}
    block_d = min(max(16, 1 << (dv - 1).bit_length()), 128)
    ce = {"IS_CAUSAL": causal, "HAS_ALIBI": alibi, "BLOCK_M": cfgs[90]["BLOCK_M"], "BLOCK_N": cfgs[90]["BLOCK_N"],
          "BLOCK_D": block_d, "MASK_D": dv % block_d != 0, "FAST_SPAN": 8.0 if v_dtype == "fp16" else 64.0,
          "PATH": path, "FACTOR_DTYPE": tl.float16 if v_dtype == "fp16" and not alibi else tl.float32,
          "DOT_PRECISION": "tf32x3" if v_dtype == "fp32" else "ieee", "N_DCHUNK": -(-dv // block_d), "WIDE": wide}
    per_arch = {arch: {"constexprs": {}, "num_warps": c["warps"][path], "num_stages": c["num_stages"]}
                for arch, c in cfgs.items()}
    return KernelCase(name, "taumode_attention:taumode_attention_fwd_kernel", _attention_args(v_dtype), ce,
                      cfgs[90]["warps"][path], cfgs[90]["num_stages"], ce["BLOCK_M"] * ce["BLOCK_N"],
                      per_arch=per_arch)


def _lambda(name, x_dtype, f):
    block_f = max(16, 1 << (f - 1).bit_length())
    args = {"X": f"*{x_dtype}:16", "L_HI": f"*{'fp32' if x_dtype == 'fp32' else x_dtype}:16",
            "L_LO": f"*{'fp32' if x_dtype == 'fp32' else x_dtype}:16", "TAU": "*fp32:16", "LAM": "*fp32:16",
            "stride_xb": "i32:16", "stride_xh": "i32:16", "stride_xt": "i32:16", "stride_xf": "i32:1",
            "Hx": "i32", "T": "i32", "F": "i32", "eps": "fp32"}
    import torch

    from tauformer_kernels.lambda_triton import launch_config

    cfg = launch_config(f, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[x_dtype])
    ce = {"BLOCK_T": cfg["BLOCK_T"], "BLOCK_F": block_f, "BLOCK_C": cfg["BLOCK_C"], "BLOCK_K": cfg["BLOCK_K"],
          "SPLIT_L": x_dtype != "fp32", "DOT_PRECISION": "tf32x3" if x_dtype == "fp32" else "ieee"}
    return KernelCase(name, "taumode_lambda:taumode_lambda_fwd_kernel", args, ce, cfg["num_warps"], cfg["num_stages"])


# The kernels and representative constexprs. The attention forward runs as two launches of one kernel:
# PATH=1 (factorised path) and PATH=2 (general path); each is compiled here as what it is.
KERNELS = [
    _lambda("lambda_fwd F=64 fp16", "fp16", 64),
    _lambda("lambda_fwd F=64 fp32", "fp32", 64),
    _lambda("lambda_fwd F=384 bf16", "bf16", 384),
    _attention("attn_fwd factorised causal D=64 fp16", "fp16", 64, 1),
    _attention("attn_fwd general causal D=64 fp16", "fp16", 64, 2),
    _attention("attn_fwd factorised causal D=64 bf16", "bf16", 64, 1),
    _attention("attn_fwd general causal D=64 bf16", "bf16", 64, 2),
    _attention("attn_fwd factorised causal D=64 fp32", "fp32", 64, 1),
    _attention("attn_fwd general causal D=64 fp32", "fp32", 64, 2),
    _attention("attn_fwd factorised causal alibi D=64 fp16", "fp16", 64, 1, alibi=True),
    _attention("attn_fwd general causal alibi D=64 fp16", "fp16", 64, 2, alibi=True),
    _attention("attn_fwd factorised non-causal D=48 fp16", "fp16", 48, 1, causal=False),
    _attention("attn_fwd general non-causal D=48 fp16", "fp16", 48, 2, causal=False),
    _attention("attn_fwd factorised causal D=384 bf16 (3x128 cols)", "bf16", 384, 1),
    _attention("attn_fwd general causal D=384 bf16 (3x128 cols)", "bf16", 384, 2),
    # the 64-bit build (tensors with offsets past 2^31 elements)
    _attention("attn_fwd factorised causal D=64 bf16 wide", "bf16", 64, 1, wide=True),
    _attention("attn_fwd general causal D=64 bf16 wide", "bf16", 64, 2, wide=True),
    _attention("attn_fwd factorised causal D=64 fp16 wide", "fp16", 64, 1, wide=True),
    _attention("attn_fwd factorised causal D=64 fp32 wide", "fp32", 64, 1, wide=True),
    _attention("attn_fwd general causal D=64 fp32 wide", "fp32", 64, 2, wide=True),
]


def _bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _run_tool(tool: str, flags: list, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([_bin(tool), *flags, f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def compile_case(case: KernelCase, arch: int):
    """triton.compile of one table row for sm_<arch>; returns the compiled kernel."""
    import importlib

    case = case.for_arch(arch)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tauformer_kernels.backends import FP_FUSION

    module, fn_name = case.kernel.split(":")
    fn = getattr(importlib.import_module(f"tauformer_kernels.kernels.{module}"), fn_name)
    signature, constexprs, attrs = {}, dict(case.constexprs), {}
    for name, spec in case.args.items():
        ty, _, hint = spec.partition(":")
        if hint == "1":
            constexprs[name] = 1
            continue
        signature[name] = ty
        if hint == "16":
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    signature.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": case.num_warps, "num_stages": case.num_stages,
                                   "enable_fp_fusion": FP_FUSION})


def _opcodes(lines):
    return [_GUARD.sub("", re.sub(r"^.*?\*/\s*", "", l).strip()).rstrip(" ;")
            for l in lines if re.search(r"/\*[0-9a-f]{4,}\*/", l)]


def loops(sass: str):
    """(start line, end line, opcodes) of every loop: a label to the last backward branch to it."""
    lines = sass.splitlines()
    labels, spans = {}, {}
    for i, line in enumerate(lines):
        if m := re.match(r"^(\.L_x_\d+):", line.strip()):
            labels[m.group(1)] = i
        if (b := re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)) and b.group(1) in labels:
            spans[b.group(1)] = (labels[b.group(1)], i)
    return [(s, e, _opcodes(lines[s:e + 1])) for s, e in sorted(spans.values())]


def estimate(opcodes, arch: int, num_warps: int) -> dict:
    """Cycles per iteration of a loop body: the largest of tensor, FP32 ALU, MUFU and issue."""
    count = collections.Counter()
    for ins in opcodes:
        op = ins.split(" ")[0]
        base = op.split(".")[0]
        if base == "HGMMA":
            m, n, k = map(int, re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op).groups())
            count["tc_fma"] += m * n * k / 4
        elif base == "HMMA":
            m, n, k = (16, 8, 16) if ".16816" in op else (16, 8, 8)
            count["tc_fma"] += m * n * k
        elif base == "MUFU":
            count["mufu"] += 1
        elif base in _FP_ALU:
            count["alu"] += 1
        count["instructions"] += 1
    t = _SM[arch]
    cycles = {"tensor": count["tc_fma"] * num_warps / t["fma_tc"], "alu": count["alu"] * num_warps / t["alu"],
              "mufu": count["mufu"] * num_warps / t["mufu"], "issue": count["instructions"] * num_warps / t["issue"]}
    bound = max(cycles, key=cycles.get)
    return {"cycles": cycles[bound], "bound": bound, "parts": cycles, "instructions": count["instructions"]}


_BASE_STRIDE = re.compile(r"stride_\w+_[bh]|stride_x[bh]")
_NARROW_PRODUCT = re.compile(r"\b(?:mul|mad)\.lo\.[su]32\s+%r\d+,\s*(%r\d+),\s*(%r\d+)")


def narrow_base_products(case: KernelCase, ptx: str) -> list[str]:
    """The 32-bit multiplies in `ptx` that take a batch or head stride: b·stride_b and h·stride_h pass 2^31
    elements on large tensors, so a build meant for them must form those products in 64 bits (mul.wide.s32
    or s64). Empty when none. (The forward's WIDE=False build is 32-bit on purpose: its launcher takes it
    only when every offset stays below 2^31.)"""
    params = [name for name, spec in case.args.items() if not spec.endswith(":1")]  # ':1' args are constants
    registers = {}
    for m in re.finditer(r"ld\.param\.b32\s+(%r\d+),\s*\[\w+_param_(\d+)\]", ptx):
        registers.setdefault(params[int(m.group(2))], set()).add(m.group(1))
    bad = []
    for name in params:
        if _BASE_STRIDE.fullmatch(name):
            bad += [f"{name}: {m.group(0)}" for m in _NARROW_PRODUCT.finditer(ptx)
                    if set(m.groups()) & registers.get(name, set())]
    return bad


def report(case: KernelCase, arch: int, kernel, show_loops: bool) -> dict:
    cubin = kernel.asm["cubin"]
    usage = _run_tool("cuobjdump", ["--dump-resource-usage"], cubin)
    get = lambda key: int(m.group(1)) if (m := re.search(key + r":(\d+)", usage)) else 0  # noqa: E731
    sass = _run_tool("nvdisasm", ["-c"], cubin)
    ops = collections.Counter(op.split(" ")[0].split(".")[0] for op in _opcodes(sass.splitlines()))
    row = {"regs": get("REG"), "stack": get("STACK"), "shared": kernel.metadata.shared,
           "hmma": ops["HMMA"], "hgmma": ops["HGMMA"], "mufu": ops["MUFU"],
           "narrow": narrow_base_products(case, kernel.asm["ptx"]) if case.constexprs.get("WIDE", True) else []}
    print(f"{case.name:46s} sm_{arch}  regs={row['regs']:3d} stack={row['stack']:4d} smem={row['shared']:6d}  "
          f"HMMA={row['hmma']:4d} HGMMA={row['hgmma']:3d} MUFU={row['mufu']:4d}")
    if show_loops:
        for start, end, body in loops(sass):
            if len(body) < 4:  # the end-of-kernel `BRA` to itself
                continue
            est = estimate(body, arch, case.num_warps)
            per_1k = f"  {1000 * est['cycles'] / case.scores_per_iter:6.1f} cycles/1k scores" if case.scores_per_iter else ""
            parts = " ".join(f"{k}={v:.0f}" for k, v in est["parts"].items())
            hist = ", ".join(f"{o} {n}" for o, n in collections.Counter(
                i.split(" ")[0].split(".")[0] for i in body).most_common(8))
            print(f"      loop @{start:5d}: {est['instructions']:4d} instr/warp  est {est['cycles']:6.0f} cycles/iter "
                  f"({est['bound']}; {parts}){per_1k}\n          {hist}")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="SM versions to compile for (80, 90)")
    ap.add_argument("--cache", help="write the compiled kernels (cubin + json) into this Triton cache directory, "
                    "for ../shared/tools/sass_model.py --cache DIR")
    ap.add_argument("--only", help="compile only the table rows whose name contains this text")
    ap.add_argument("--loops", action="store_true", help="print a static cycle estimate of every SASS loop")
    args = ap.parse_args(argv)
    if args.cache:
        os.environ["TRITON_CACHE_DIR"] = os.path.abspath(args.cache)
    import triton  # noqa: F401  (after TRITON_CACHE_DIR is set)

    from .compile_check_backward import kernel_cases  # the backward kernels' rows (issue 4)

    failures = []
    for case in KERNELS + kernel_cases():
        if args.only and args.only not in case.name:
            continue
        for arch in args.arch:
            try:
                kernel = compile_case(case, arch)
            except Exception as exc:  # noqa: BLE001  (report every failure, then exit non-zero)
                print(f"{case.name:46s} sm_{arch}  FAILED to compile: {type(exc).__name__}: {str(exc)[:300]}")
                failures.append(f"{case.name} sm_{arch}: compile error")
                continue
            row = report(case, arch, kernel, args.loops)
            if row["stack"]:
                failures.append(f"{case.name} sm_{arch}: {row['stack']} bytes of stack (spills)")
            failures += [f"{case.name} sm_{arch}: 32-bit base offset {n}" for n in row["narrow"]]
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
