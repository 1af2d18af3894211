"""Which backend runs an op: names, availability, and the choice `backend="auto"` makes.

Backends (docs/internal-contract.md gives each one's functions):
- "reference": plain PyTorch, chunked over queries (reference.py); any device, float64 included.
- "triton": the fused Triton kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
- "loglinear": exact O(T log T) attention by sorting (loglinear.py); any device.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "triton", "loglinear")

# Key length from which `auto` takes the O(T log T) path on CPU, measured on the 2-core development
# machine (B=1, H=8, Dv=64, fp32; kernels/NOTES.md): forward+backward crossed over between 1024 and 2048
# keys, the forward alone between 512 and 1024 (at 1024: 13.8 ms vs the chunked reference's 44.5).
# On CUDA the dense Triton kernels stay the choice until the crossover is measured on a GPU.
CPU_LOGLINEAR_MIN_KEYS = 2048
CPU_LOGLINEAR_MIN_KEYS_INFERENCE = 1024


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1 runs the real kernels on CPU tensors (how CI tests them)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_before(major: int, minor: int) -> bool:
    """Whether the installed Triton is older than major.minor (launch configs differ where its register
    allocation does: the compile check proves each version's configs spill-free)."""
    import triton

    found = tuple(int(part) for part in triton.__version__.split(".")[:2])
    return found < (major, minor)


def gpu_launch_configs() -> bool:
    """Whether the launchers use their GPU launch configs (tiles, warps, the GPU-only code paths such as the
    backward's inline-PTX exp2): always on a GPU; under the interpreter only when TAUFORMER_GPU_CONFIGS=1
    (the tests' --gpu-configs mode, which runs the GPU's code paths on the CPU with the interpreter's
    numerics emulated, tauformer_kernels/interpreter.py). Otherwise the interpreter gets small tiles."""
    return not triton_interpreting() or os.environ.get("TAUFORMER_GPU_CONFIGS", "0") not in ("", "0")


# Every launch sets enable_fp_fusion (a*b + c as one FMA): the kernels' numerics and their static cycle
# estimates assume it, and Triton 3.10 turns its default off.
FP_FUSION = True

# CUDA's limit on grid axes 1 and 2 (axis 0 takes 2^31 - 1 programs)
MAX_GRID_YZ = 65535


def arch_of(device: torch.device) -> int:
    """The sm version of a CUDA device (90 for CPU tensors: the interpreter runs the sm_90 configs)."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def on_device(t: torch.Tensor):
    """The context a launch runs in: the CUDA device of `t` (a tensor on cuda:1 launches on cuda:1)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def check_backend_name(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")


def _require_triton(device: torch.device, dtype: torch.dtype) -> None:
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (Linux only); use backend='auto' or 'reference'")
    if device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got tensors on {device}); set TRITON_INTERPRET=1 to run the "
            "kernels on CPU tensors in Triton's interpreter, or use backend='auto'"
        )
    if dtype == torch.float64:
        raise TypeError("backend='triton' runs float16, bfloat16 and float32; use backend='reference' for float64")
    if dtype == torch.bfloat16 and device.type != "cuda":
        from .interpreter import gpu_numerics_enabled

        if not gpu_numerics_enabled():
            raise TypeError(
                "backend='triton' with bfloat16 under TRITON_INTERPRET=1: Triton's interpreter multiplies "
                "bf16 bit patterns as integers (garbage results); call "
                "tauformer_kernels.interpreter.enable_gpu_numerics() first to emulate bf16, or use float16/"
                "float32 or backend='reference'"
            )


def resolve_attention_backend(backend: str, device: torch.device, dtype: torch.dtype, keys: int = 0,
                              needs_grad: bool = True) -> str:
    """The concrete attention backend for `backend` on tensors of this device and dtype, `keys` long;
    `needs_grad`: whether the call records a backward (the CPU crossover is lower without one)."""
    check_backend_name(backend)
    if backend == "triton":
        _require_triton(device, dtype)
    if backend != "auto":
        return backend
    if device.type == "cuda" and triton_available() and dtype != torch.float64:
        return "triton"
    if device.type == "cpu" and keys >= (CPU_LOGLINEAR_MIN_KEYS if needs_grad else CPU_LOGLINEAR_MIN_KEYS_INFERENCE):
        return "loglinear"
    return "reference"


def resolve_lambda_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The λ projection has a reference and a Triton implementation; "loglinear" attention uses auto's."""
    check_backend_name(backend)
    if backend == "loglinear":
        backend = "auto"
    return resolve_attention_backend(backend, device, dtype)
