"""Taumode λ projection forward: λ = E / (E + tau[h]), E = max(xᵀLx / (xᵀx + eps), 0)
(docs/math.md §The λ projection).

Device code only; the launcher is `tauformer_kernels.lambda_triton.lambda_fwd_triton`.

One program per (block of BLOCK_T vectors, batch·head), the blocks of a head consecutive on grid axis 0. x·L
runs on the tensor cores in column chunks of BLOCK_C and contraction chunks of BLOCK_K (the Laplacian stays
on-chip / in L2: F×F is small); the Rayleigh quotient, the clamp and the bound are fp32.

Precision of x·L: for fp16/bf16 x the Laplacian arrives split in two terms of x's dtype, L = L_HI + L_LO
(each exact as x is exact), so two tensor-core products give L to ~16-22 bits; for fp32 x, L_HI is fp32
and the product runs with DOT_PRECISION (the launcher passes "tf32x3": ~fp32 accuracy on the tensor cores).

Layouts: x (B, Hx, T, F) any strides; L_HI, L_LO (BLOCK_F, BLOCK_F) contiguous, zero-padded past F;
TAU fp32 read at b·stride_tau_b + h·stride_tau_h + t·stride_tau_t: one per head (Hx,) with strides
(0, 1, 0), or one per vector (B, Hx, T); LAM (B, Hx, T) fp32 contiguous.
"""
import triton
import triton.language as tl

from .grid import block_and_head


@triton.jit
def taumode_lambda_fwd_kernel(
    X, L_HI, L_LO, TAU, LAM,
    stride_xb, stride_xh, stride_xt, stride_xf,
    stride_tau_b, stride_tau_h, stride_tau_t,
    Hx, T, F, eps,
    # vectors (rows) per program
    BLOCK_T: tl.constexpr,
    # F padded to a power of two (>= 16)
    BLOCK_F: tl.constexpr,
    # output columns of x·L per chunk (divides BLOCK_F)
    BLOCK_C: tl.constexpr,
    # contraction (feature) chunk of x·L (divides BLOCK_F)
    BLOCK_K: tl.constexpr,
    # L_LO holds the low part of L (fp16/bf16 x): add its product
    SPLIT_L: tl.constexpr,
    # input_precision of the fp32 product (the launcher passes "tf32x3"); ignored for fp16/bf16
    DOT_PRECISION: tl.constexpr,
    # one tau per vector (TAU is (B, Hx, T)); else one per head
    PER_VECTOR_TAU: tl.constexpr,
):
    """Writes LAM[b, h, t] for the BLOCK_T vectors of this program.

    Grid: (cdiv(T, BLOCK_T)·B·Hx,), the blocks of one head consecutive (axis 0 takes up to 2^31 - 1)."""
    num_tb = tl.cdiv(T, BLOCK_T)
    pid_t, b, h, pid_bh = block_and_head(num_tb, Hx)
    t0 = pid_t * BLOCK_T
    rows = tl.arange(0, BLOCK_T)
    offs_t = t0 + rows
    row_ok = offs_t < T
    x_rows = (X + b * stride_xb + h * stride_xh + tl.cast(t0, tl.int64) * stride_xt) + rows[:, None] * stride_xt

    quad = tl.zeros([BLOCK_T], dtype=tl.float32)  # xᵀ L x
    norm2 = tl.zeros([BLOCK_T], dtype=tl.float32)  # xᵀ x
    for c0 in tl.range(0, BLOCK_F, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        x_c = tl.load(x_rows + offs_c[None, :] * stride_xf, mask=row_ok[:, None] & (offs_c[None, :] < F),
                      other=0.0).to(tl.float32)
        lx = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for k0 in tl.range(0, BLOCK_F, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x_k = tl.load(x_rows + offs_k[None, :] * stride_xf, mask=row_ok[:, None] & (offs_k[None, :] < F),
                          other=0.0)
            l_off = offs_k[:, None] * BLOCK_F + offs_c[None, :]
            lx = tl.dot(x_k, tl.load(L_HI + l_off), lx, input_precision=DOT_PRECISION)
            if SPLIT_L:
                lx = tl.dot(x_k, tl.load(L_LO + l_off), lx)
        quad += tl.sum(lx * x_c, 1)
        norm2 += tl.sum(x_c * x_c, 1)

    energy = quad / (norm2 + eps)
    # the clamp of a PSD rounding error, written so that NaN passes through (maximum(NaN, 0) is 0 on the
    # GPU's max.f32): a NaN or inf in x gives λ = NaN, as in the reference, never a plausible 0
    energy = tl.where(energy < 0.0, 0.0, energy)
    if PER_VECTOR_TAU:
        tau = tl.load((TAU + b * stride_tau_b + h * stride_tau_h + tl.cast(t0, tl.int64) * stride_tau_t)
                      + rows * stride_tau_t, mask=row_ok, other=1.0)
    else:
        tau = tl.load(TAU + h * stride_tau_h)
    lam = energy / (energy + tau)
    tl.store((LAM + pid_bh * T + t0) + rows, lam, mask=row_ok)
