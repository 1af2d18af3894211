"""Backward of the λ projection (docs/math.md §The λ projection): dx and dtau from dλ, with the chain rule
fused.

Device code only; the launcher is `tauformer_kernels.lambda_triton_backward.lambda_bwd_triton`.

For a head vector x (F), s = xᵀx + eps, L_sym = (L + Lᵀ)/2, E_raw = xᵀ L_sym x / s, E = max(E_raw, 0):

    dE   = dλ · tau / (E + tau)²      (0 where the clamp is active, E_raw < 0)
    dx   = dE · 2 (L_sym x - E_raw x) / s
    dtau = dλ · (-E / (E + tau)²)     (per vector; summed per head for a per-head tau)

One program per (block of BLOCK_T vectors, b·h), the blocks of a head consecutive on grid axis 0. L_sym is
formed on-chip from two loads of L (a tile and its transpose) and y = x L_sym runs on the tensor cores in
BLOCK_K × BLOCK_K tiles of L_sym. When F fits in one tile (BLOCK_K == BLOCK_F) everything is one pass over x;
for larger F a first pass gets xᵀx and E_raw and a second recomputes each column tile of y to write dx (L stays
in L2 across programs).

Layouts: DLAM (B, H, T) fp32, X and DX (B, H, T, F) in x's dtype, any strides; LAP (F, F) fp32 contiguous;
TAU fp32 at b·stride_tau_b + h·stride_tau_h + t·stride_tau_t (per head: strides (0, 1, 0); per vector:
(B, H, T)); DTAU: per-head tau, (B, H, number of T blocks) fp32 contiguous, each program's Σ dλ·dλ/dtau;
per-vector tau (PER_VECTOR_TAU), (B, H, T) fp32 contiguous, dλ·dλ/dtau of every vector.
"""
import triton
import triton.language as tl

from .grid import block_and_head


@triton.jit
def _x_tile(X_bh, offs_t, offs_f, stride_x_t, stride_x_f, T, F,
            # mask the rows past T / the features past F
            MASK_T: tl.constexpr, MASK_F: tl.constexpr):
    """x[offs_t, offs_f] in fp32 (0 outside the tensor)."""
    ptrs = X_bh + offs_t[:, None] * stride_x_t + offs_f[None, :] * stride_x_f
    if MASK_T or MASK_F:
        mask = (offs_t[:, None] < T) & (offs_f[None, :] < F)
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x.to(tl.float32)


@triton.jit
def _lsym_tile(LAP, offs_r, offs_c, F, MASK_F: tl.constexpr):
    """(L + Lᵀ)/2 at rows offs_r, columns offs_c, fp32 (0 outside F × F)."""
    if MASK_F:
        mask = (offs_r[:, None] < F) & (offs_c[None, :] < F)
        a = tl.load(LAP + offs_r[:, None] * F + offs_c[None, :], mask=mask, other=0.0)
        b = tl.load(LAP + offs_c[None, :] * F + offs_r[:, None], mask=mask, other=0.0)
    else:
        a = tl.load(LAP + offs_r[:, None] * F + offs_c[None, :])
        b = tl.load(LAP + offs_c[None, :] * F + offs_r[:, None])
    return 0.5 * (a + b)


@triton.jit
def _column_tiles(X_bh, LAP, offs_t, fo, stride_x_t, stride_x_f, T, F,
                  BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
                  MASK_T: tl.constexpr, MASK_F: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Columns fo .. fo + BLOCK_K of x and of y = x L_sym for the block's rows, fp32."""
    offs_c = fo + tl.arange(0, BLOCK_K)
    x_c = _x_tile(X_bh, offs_t, offs_c, stride_x_t, stride_x_f, T, F, MASK_T=MASK_T, MASK_F=MASK_F)
    y = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for ki in range(0, BLOCK_F, BLOCK_K):
        offs_k = ki + tl.arange(0, BLOCK_K)
        x = _x_tile(X_bh, offs_t, offs_k, stride_x_t, stride_x_f, T, F, MASK_T=MASK_T, MASK_F=MASK_F)
        y = tl.dot(x, _lsym_tile(LAP, offs_k, offs_c, F, MASK_F=MASK_F), y, input_precision=DOT_PRECISION)
    return x_c, y


@triton.jit
def taumode_lambda_bwd_kernel(
    DLAM, X, LAP, TAU, DX, DTAU,
    stride_dlam_b, stride_dlam_h, stride_dlam_t,
    stride_tau_b, stride_tau_h, stride_tau_t,
    stride_x_b, stride_x_h, stride_x_t, stride_x_f,
    stride_dx_b, stride_dx_h, stride_dx_t, stride_dx_f,
    H, T, F, eps,
    # vectors per program
    BLOCK_T: tl.constexpr,
    # F padded to a power of two (>= 16)
    BLOCK_F: tl.constexpr,
    # tile of L_sym (and of the feature loop); BLOCK_K == BLOCK_F keeps everything in one pass
    BLOCK_K: tl.constexpr,
    # BLOCK_F > F: mask the feature columns
    MASK_F: tl.constexpr,
    # input_precision of x·L_sym: "tf32x3" (fp32 x), "tf32" (fp16/bf16 x: exact in tf32; L_sym rounded)
    DOT_PRECISION: tl.constexpr,
    # one tau per vector: DTAU holds every vector's dtau instead of per-program sums
    PER_VECTOR_TAU: tl.constexpr,
):
    """Writes DX (like X) and DTAU (see the module docstring).

    Grid: (cdiv(T, BLOCK_T)·B·H,), the blocks of one head consecutive."""
    num_tb = tl.cdiv(T, BLOCK_T)
    # 64-bit bases (batch, head and block offsets pass 2^31 elements on large tensors); the helpers take
    # the block's base and 32-bit offsets inside it: rows 0 .. BLOCK_T of the t_left rows left
    pid_t, b, h, pid_bh = block_and_head(num_tb, H)
    t0 = pid_t * BLOCK_T
    t_left = T - t0
    offs_t = tl.arange(0, BLOCK_T)
    row_ok = offs_t < t_left
    X_bh = X + b * stride_x_b + h * stride_x_h + tl.cast(t0, tl.int64) * stride_x_t
    DX_bh = DX + b * stride_dx_b + h * stride_dx_h + tl.cast(t0, tl.int64) * stride_dx_t
    dlam = tl.load((DLAM + b * stride_dlam_b + h * stride_dlam_h + tl.cast(t0, tl.int64) * stride_dlam_t)
                   + offs_t * stride_dlam_t, mask=row_ok, other=0.0)
    if PER_VECTOR_TAU:
        tau = tl.load((TAU + b * stride_tau_b + h * stride_tau_h + tl.cast(t0, tl.int64) * stride_tau_t)
                      + offs_t * stride_tau_t, mask=row_ok, other=1.0)
    else:  # a scalar per program: a row vector of one value cost 8 bytes of spill (bf16, F >= 128, sm_80)
        tau = tl.load(TAU + h * stride_tau_h)

    if BLOCK_K == BLOCK_F:
        offs_f = tl.arange(0, BLOCK_F)
        x = _x_tile(X_bh, offs_t, offs_f, stride_x_t, stride_x_f, t_left, F, MASK_T=True, MASK_F=MASK_F)
        y = tl.dot(x, _lsym_tile(LAP, offs_f, offs_f, F, MASK_F=MASK_F), input_precision=DOT_PRECISION)
        s = tl.sum(x * x, 1) + eps
        e_raw = tl.sum(x * y, 1) / s
    else:
        sq = tl.zeros([BLOCK_T], dtype=tl.float32)
        xy = tl.zeros([BLOCK_T], dtype=tl.float32)
        for fo in range(0, BLOCK_F, BLOCK_K):
            x_c, y_c = _column_tiles(X_bh, LAP, offs_t, fo, stride_x_t, stride_x_f, t_left, F, BLOCK_T=BLOCK_T,
                                     BLOCK_F=BLOCK_F, BLOCK_K=BLOCK_K, MASK_T=True, MASK_F=MASK_F,
                                     DOT_PRECISION=DOT_PRECISION)
            sq += tl.sum(x_c * x_c, 1)
            xy += tl.sum(x_c * y_c, 1)
        s = sq + eps
        e_raw = xy / s

    energy = tl.maximum(e_raw, 0.0)
    inv_denom = 1.0 / ((energy + tau) * (energy + tau))
    # the clamp passes the gradient where E_raw >= 0, as autograd's clamp_min does
    d_energy = tl.where(e_raw >= 0, dlam * tau * inv_denom, 0.0)
    coef = 2.0 * d_energy / s
    dtau = tl.where(row_ok, -dlam * energy * inv_denom, 0.0)
    if PER_VECTOR_TAU:
        tl.store((DTAU + pid_bh * T + t0) + offs_t, dtau, mask=row_ok)
    else:
        tl.store(DTAU + pid_bh * num_tb + pid_t, tl.sum(dtau, 0))

    if BLOCK_K == BLOCK_F:
        dx = coef[:, None] * (y - e_raw[:, None] * x)
        ptrs = DX_bh + offs_t[:, None] * stride_dx_t + offs_f[None, :] * stride_dx_f
        tl.store(ptrs, dx.to(DX.dtype.element_ty), mask=row_ok[:, None] & (offs_f[None, :] < F))
    else:
        for fo in range(0, BLOCK_F, BLOCK_K):
            offs_c = fo + tl.arange(0, BLOCK_K)
            x_c, y_c = _column_tiles(X_bh, LAP, offs_t, fo, stride_x_t, stride_x_f, t_left, F, BLOCK_T=BLOCK_T,
                                     BLOCK_F=BLOCK_F, BLOCK_K=BLOCK_K, MASK_T=True, MASK_F=MASK_F,
                                     DOT_PRECISION=DOT_PRECISION)
            dx = coef[:, None] * (y_c - e_raw[:, None] * x_c)
            ptrs = DX_bh + offs_t[:, None] * stride_dx_t + offs_c[None, :] * stride_dx_f
            tl.store(ptrs, dx.to(DX.dtype.element_ty), mask=row_ok[:, None] & (offs_c[None, :] < F))
