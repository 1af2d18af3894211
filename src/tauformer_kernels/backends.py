"""Which backend runs an op: names, availability, and the choice `backend="auto"` makes.

Backends (docs/internal-contract.md gives each one's functions):
- "reference": plain PyTorch, chunked over queries (reference.py); any device, float64 included.
- "triton": the fused Triton kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
- "loglinear": exact O(T log T) attention by sorting (loglinear.py); any device.
- "numba": the same sorted algorithm compiled by numba for the CPU, one fused loop per head
  (attention_numba.py); CPU tensors, with the numba package (the `cpu` extra).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable

import torch

BACKENDS = ("auto", "reference", "triton", "loglinear", "numba")

# Key length from which `auto` takes the O(T log T) path on CPU, measured on the 2-core development
# machine (B=1, H=8, Dv=64, fp32; kernels/NOTES.md): forward+backward crossed over between 1024 and 2048
# keys, the forward alone between 512 and 1024 (at 1024: 13.8 ms vs the chunked reference's 44.5).
# On CUDA the dense Triton kernels stay the choice until the crossover is measured on a GPU.
CPU_LOGLINEAR_MIN_KEYS = 2048
CPU_LOGLINEAR_MIN_KEYS_INFERENCE = 1024

# Head sizes up to which `auto` takes numba's λ projection on CPU: its loop does F² multiply-adds per vector
# in float64, where the reference's x·L is one float32 GEMM. Measured (16,384 vectors, 1 thread, fwd / bwd ms):
# F = 16 numba 1.0 / 2.2 vs reference 1.7 / 3.9; F = 32 2.4 / 5.3 vs 3.3 / 7.8; F = 64 7.1 / 16.6 vs 3.1 / 9.0.
CPU_NUMBA_LAMBDA_MAX_FEATURES = 32


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def numba_available() -> bool:
    return importlib.util.find_spec("numba") is not None


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1 runs the real kernels on CPU tensors (how CI tests them)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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


def _require_numba(device: torch.device, dtype: torch.dtype) -> None:
    if not numba_available():
        raise RuntimeError("backend='numba' needs the numba package (pip install 'tauformer[cpu]'); use "
                           "backend='auto' or 'loglinear'")
    if device.type != "cpu":
        raise RuntimeError(f"backend='numba' runs CPU tensors (got tensors on {device}); use backend='auto'")


# The functions of each (op, backend) pair: (module, forward), (module, backward), imported on first use so
# that the package imports without triton. Signatures: docs/internal-contract.md.
_IMPLEMENTATIONS = {
    "lambda": {
        "reference": (("reference", "lambda_fwd_reference"), ("reference", "lambda_bwd_reference")),
        "triton": (("lambda_triton", "lambda_fwd_triton"), ("lambda_triton_backward", "lambda_bwd_triton")),
        "numba": (("attention_numba", "lambda_fwd_numba"), ("attention_numba", "lambda_bwd_numba")),
    },
    "attention": {
        "reference": (("reference", "attention_fwd_chunked"), ("reference", "attention_bwd_chunked")),
        "triton": (("attention_triton", "attention_fwd_triton"), ("attention_triton_backward", "attention_bwd_triton")),
        "loglinear": (("loglinear", "attention_fwd_loglinear"), ("loglinear", "attention_bwd_loglinear")),
        "numba": (("attention_numba", "attention_fwd_numba"), ("attention_numba", "attention_bwd_numba")),
    },
}


def implementation(op: str, backend: str) -> tuple[Callable, Callable]:
    """(forward, backward) of a concrete backend of op "lambda" or "attention"."""
    return tuple(getattr(importlib.import_module(f"tauformer_kernels.{module}"), name)
                 for module, name in _IMPLEMENTATIONS[op][backend])


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype, keys: int = 0,
            needs_grad: bool = True) -> str:
    """The concrete backend that runs `op` for the `backend` argument, on tensors of this device and dtype
    with `keys` keys; `needs_grad`: whether the call records a backward (the CPU crossover is lower
    without one). "loglinear" is an attention algorithm: the λ projection it is given takes auto's choice."""
    check_backend_name(backend)
    if op == "lambda" and backend == "loglinear":
        backend = "auto"
    if backend == "triton":
        _require_triton(device, dtype)
    if backend == "numba":
        _require_numba(device, dtype)
    if backend != "auto":
        return backend
    if device.type == "cuda" and triton_available() and dtype != torch.float64:
        return "triton"
    if device.type == "cpu" and numba_available():
        return "numba"
    if op == "attention" and device.type == "cpu" and keys >= (
            CPU_LOGLINEAR_MIN_KEYS if needs_grad else CPU_LOGLINEAR_MIN_KEYS_INFERENCE):
        return "loglinear"
    return "reference"
