"""A GPU's arithmetic in Triton's interpreter, so the kernels' CPU runs mean what their GPU runs mean.

`TRITON_INTERPRET=1` runs `@triton.jit` kernels with numpy, but where these kernels rely on the GPU's
number formats it computes something else:

- bfloat16 is held as its bit pattern (uint16) and `tl.dot` and the arithmetic multiply those integers:
  a bf16 kernel returns garbage (relative error ~5), silently.
- `tl.dot`'s input_precision is ignored: "tf32" and "tf32x3" give exact fp32 products, so the interpreter
  cannot show what the tensor cores' rounding does to an fp32 kernel.
- inline PTX is refused (the attention backward's GPU build computes exp2 with `ex2.approx.ftz.f32`).

`enable_gpu_numerics()` teaches the interpreter those three (it patches the interpreter's builder, once
per process): bf16 operands are decoded to fp32 and every bf16 result is rounded back (round to nearest
even), as a bf16 ALU or a tensor core with fp32 accumulation does; an fp32 "tf32" product reads its
operands at tf32 (the low 13 mantissa bits ignored, as the tensor cores read fp32 registers) and
"tf32x3" is Triton's own split, a·b ≈ aₛ·b_b + a_b·bₛ + a_b·b_b with a_b = a rounded to tf32 (nearest,
ties away), aₛ = a − a_b; `ex2.approx.ftz.f32` is exp2 with subnormal inputs and outputs flushed to zero
(its ~2-ulp approximation error is not modelled).

Without it, the launchers refuse bf16 under the interpreter (backends.py) rather than return garbage.
The tests enable it for the whole session (tests/conftest.py). It changes nothing on a GPU, and nothing
unless TRITON_INTERPRET is set when triton is imported.
"""
from __future__ import annotations

import numpy as np

_ENABLED = False

_EX2_APPROX_FTZ = "ex2.approx.ftz.f32 $0, $1;"
_F32_SMALLEST_NORMAL = np.float32(2.0 ** -126)


def gpu_numerics_enabled() -> bool:
    return _ENABLED


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as the float32 values they encode (exact)."""
    return (np.asarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest, ties to even; NaN stays NaN), as uint16 bit patterns."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    return np.where(np.isnan(values), np.uint32(0x7FC0), rounded).astype(np.uint16)


def tf32_round(values: np.ndarray) -> np.ndarray:
    """float32 rounded to tf32 (10 mantissa bits), nearest with ties away from zero (cvt.rna.tf32.f32)."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    special = (bits & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    rounded = (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
    return np.where(special, bits, rounded).view(np.float32)


def tf32_truncate(values: np.ndarray) -> np.ndarray:
    """float32 as a tensor core reads it for a tf32 product: the low 13 mantissa bits ignored."""
    return (np.asarray(values, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def _ftz(values: np.ndarray) -> np.ndarray:
    return np.where(np.abs(values) < _F32_SMALLEST_NORMAL, np.float32(0.0), values).astype(np.float32)


@np.errstate(invalid="ignore", over="ignore")  # inf and NaN operands propagate silently, as on a GPU
def _dot_f32(a: np.ndarray, b: np.ndarray, acc: np.ndarray, precision: str) -> np.ndarray:
    if precision == "tf32":
        return np.matmul(tf32_truncate(a), tf32_truncate(b), dtype=np.float32) + acc
    if precision == "tf32x3":
        a_big, b_big = tf32_round(a), tf32_round(b)
        a_small, b_small = tf32_truncate(a - a_big), tf32_truncate(b - b_big)
        cross = np.matmul(a_small, b_big, dtype=np.float32) + np.matmul(a_big, b_small, dtype=np.float32)
        cross = np.where(np.isnan(cross), np.float32(0.0), cross)  # as Triton's split: an inf operand
        return np.matmul(a_big, b_big, dtype=np.float32) + cross + acc
    return np.matmul(a, b, dtype=np.float32) + acc


def enable_gpu_numerics() -> None:
    """Patch Triton's interpreter builder (see the module docstring); idempotent."""
    global _ENABLED
    if _ENABLED:
        return
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    Handle = interpreter.TensorHandle

    def is_bf16(h) -> bool:
        return h.dtype.scalar == tl.bfloat16

    def as_f32(h):
        return bf16_to_f32(h.data) if is_bf16(h) else h.data

    plain_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if is_bf16(a) or is_bf16(b):
            return Handle(np.matmul(as_f32(a), as_f32(b), dtype=np.float32) + d.data, d.dtype.scalar)
        if a.data.dtype == np.float32 and b.data.dtype == np.float32 and d.data.dtype == np.float32:
            precision = str(input_precision).rsplit(".", 1)[-1].lower()
            return Handle(_dot_f32(a.data, b.data, d.data, precision), d.dtype.scalar)
        return plain_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    plain_binary = builder.binary_op

    def binary_op(self, lhs, rhs, op):
        if not (is_bf16(lhs) or is_bf16(rhs)):
            return plain_binary(self, lhs, rhs, op)
        out = op(as_f32(lhs), as_f32(rhs))
        if out.dtype == np.bool_:
            return Handle(out, lhs.dtype.scalar)
        return Handle(f32_to_bf16(out), tl.bfloat16)

    plain_unary = builder.unary_op

    def unary_op(self, arg, op):
        if not is_bf16(arg):
            return plain_unary(self, arg, op)
        return Handle(f32_to_bf16(op(bf16_to_f32(arg.data))), tl.bfloat16)

    plain_fma = builder.create_fma

    def create_fma(self, x, y, z):
        if not is_bf16(z):
            return plain_fma(self, x, y, z)
        product = np.multiply(as_f32(x), as_f32(y), dtype=np.float64)
        return Handle(f32_to_bf16(np.add(product, as_f32(z), dtype=np.float64).astype(np.float32)), tl.bfloat16)

    plain_asm = builder.create_inline_asm

    class _Results:
        def __init__(self, handle):
            self._handle = handle

        def get_result(self, index):
            return self._handle

    def create_inline_asm(self, inline_asm, constraints, values, types, is_pure, pack):
        if inline_asm.strip() == _EX2_APPROX_FTZ and len(values) == 1 and pack == 1:
            x = _ftz(values[0].data.astype(np.float32))
            with np.errstate(over="ignore"):
                return _Results(Handle(_ftz(np.exp2(x)), tl.float32))
        return plain_asm(self, inline_asm, constraints, values, types, is_pure, pack)

    builder.create_dot = create_dot
    builder.binary_op = binary_op
    builder.unary_op = unary_op
    builder.create_fma = create_fma
    builder.create_inline_asm = create_inline_asm
    _ENABLED = True
