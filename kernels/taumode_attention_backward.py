"""Taumode attention backward (SPEC §2): dλq, dλk, dV, dtemperature, dslope from dO, O and the saved lse.

Device code only; the launcher is `tauformer_kernels.attention_triton_backward.attention_bwd_triton`.

With s_ij = -|λq_i - λk_j|/T_h - slope·|i + Tk - Tq - j| (causal: j <= i + Tk - Tq), P = exp(s - lse),
D_i = Σ_d dO_id O_id, dP = dO Vᵀ and dS = P∘(dP - D):

    dV = Pᵀ dO                                  dλq_i = -(1/T) Σ_j dS_ij sign(λq_i - λk_j)
    dλk_j = (1/T) Σ_i dS_ij sign(λq_i - λk_j)    dT_h = Σ dS |λq_i - λk_j| / T²
    dslope_bh = -Σ dS |i + Tk - Tq - j|

Two kernels:

- `attention_bwd_preprocess_kernel`: D = rowsum(dO∘O) in fp32 and lse·log2(e), written with a copy of λq
  into one ROWS buffer laid out per query block of the main kernel (λq, lse·log2e, D: BLOCK_M floats
  apart, padded past Tq), one program per (row block, b·h).
- `taumode_attention_bwd_kernel`: one program per (key block, b·kv head), SLOTS key blocks per launch
  (the launcher runs launches for key blocks 0.., SLOTS.., …). It holds its λk and V tile and
  loops over the GROUP query heads of its kv group and, for each, over the query blocks that see its keys.
  The tile is kept transposed (keys × queries, as in the Triton tutorial's dK/dV kernel) so that both
  products take the score tile straight from registers: dV += Pᵀ dO (A operand = P) and dPᵀ = V dOᵀ.
  P is recomputed with one exp2 per score from λq, λk and lse (log2 domain); P <= 1 for every finite λ and
  every temperature, so there is nothing to overflow.
  The sign-weighted reductions are products with one-hot matrices on the tensor cores, not warp shuffles:
  dλk accumulates (dS∘sign) @ e0 over all query blocks and heads (A operand from registers);
  dλq of this key block is e0ᵀ @ (dS∘sign), a (16 × BLOCK_M) product whose row 0 is the column sum.
  dtemperature accumulates dS∘|Δλ| = (dS∘sign)∘Δλ element-wise in a register tile in the unmasked loop
  (DT_TILE) and as per-iteration row sums (a key vector) in the masked loop; dslope (ALiBi) always as row
  sums. Both are summed once per head at the end.
  Every result is deterministic: dV, dλk are complete per program (GQA heads summed in a fixed order);
  dtemperature and dslope are per-key-block partials and dλq per-slot partials (a program adds its key
  block's into the slot the previous launch's block of that slot left: stream order, no atomics; the
  scratch is SLOTS floats per query row whatever Tk), all summed by the launcher in a fixed order.
  WITH_DV / WITH_DLAMBDA select the results of a launch: both normally; the launcher runs dV and the rest
  as two launches where one program holding the V tile and the dV accumulator would spill (fp32 Dv >= 256
  with GQA): the dV launch reads no V and forms no dPᵀ, the other keeps no dV accumulator.

Layouts: λq (B, H, Tq) fp32, λk (B, Hkv, Tk) fp32, V (B, Hkv, Tk, Dv), dO (B, H, Tq, Dv) in V's dtype, any
strides; ROWS (B·H, cdiv(Tq, BLOCK_M), 3, BLOCK_M) fp32 contiguous (from the preprocess: λq, the logsumexp
times log2 e, D); TEMP (H,) fp32; SLOPES (B, H) fp32 (read when HAS_ALIBI).
Outputs: DV (B, Hkv, Tk, Dv) in V's dtype, any strides; DLK (B, Hkv, Tk) fp32 contiguous;
DLQ_PART (SLOTS, B, H, Tq) fp32 contiguous: Σ_j dS_ij sign(λq_i - λk_j) over the keys of the slot's blocks
(dλq before the factor -1/T_h), every element written (zeros for rows that see none of those keys);
DT_PART, DSLOPE_PART (B, H, num key blocks) fp32 contiguous (DSLOPE_PART written when HAS_ALIBI).
"""
import triton
import triton.language as tl

# log2(e): logits are formed in the log2 domain for exp2
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def attention_bwd_preprocess_kernel(
    OUT, DO, LSE, LQ, ROWS,
    stride_o_b, stride_o_h, stride_o_t, stride_o_d,
    stride_do_b, stride_do_h, stride_do_t, stride_do_d,
    stride_lq_b, stride_lq_h, stride_lq_t,
    H, Tq, Dv,
    # query rows per program
    BLOCK_M: tl.constexpr,
    # Dv padded to a power of two
    BLOCK_D: tl.constexpr,
    # the main kernel's BLOCK_M: the block size of the ROWS layout
    ROW_BLOCK: tl.constexpr,
):
    """ROWS (B·H, cdiv(Tq, ROW_BLOCK), 3, ROW_BLOCK) fp32 contiguous: per query block of the main kernel, its
    λq, LSE·log2(e) (the logsumexp in the log2 domain of the main kernel) and D = Σ_d dO∘O in fp32, the
    three vectors ROW_BLOCK floats apart, so that the main kernel reads all three from one address (the
    offsets become load immediates). Padding rows (Tq..) get λq = 0, lse = 1e30, D = 0 (P = 0, dS = 0), so
    the main kernel reads them without masks; 1e30, not +inf, keeps their logits finite where the main
    kernel's layout anchor passes them through the tensor cores.

    Grid: (cdiv(n_qb·ROW_BLOCK, BLOCK_M)·B·H,), the row blocks of one head consecutive."""
    num_m = tl.cdiv(tl.cdiv(Tq, ROW_BLOCK) * ROW_BLOCK, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    # 64-bit bases: b·stride_b and (b·H + h)·Tq pass 2^31 elements on large tensors
    pid_bh = tl.cast(tl.program_id(0) // num_m, tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    m0 = pid_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    offs_m = m0 + rows
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < Dv)
    o = tl.load((OUT + b * stride_o_b + h * stride_o_h + tl.cast(m0, tl.int64) * stride_o_t)
                + rows[:, None] * stride_o_t + offs_d[None, :] * stride_o_d, mask=mask, other=0.0)
    do = tl.load((DO + b * stride_do_b + h * stride_do_h + tl.cast(m0, tl.int64) * stride_do_t)
                 + rows[:, None] * stride_do_t + offs_d[None, :] * stride_do_d, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row_ok = offs_m < Tq
    lse = tl.load((LSE + pid_bh * Tq + m0) + rows, mask=row_ok, other=1e30)
    lam_q = tl.load((LQ + b * stride_lq_b + h * stride_lq_h + tl.cast(m0, tl.int64) * stride_lq_t) + rows * stride_lq_t,
                    mask=row_ok, other=0.0)
    n_qb = tl.cdiv(Tq, ROW_BLOCK)
    dst = ROWS + (pid_bh * n_qb + offs_m // ROW_BLOCK) * (3 * ROW_BLOCK) + offs_m % ROW_BLOCK
    in_pad = offs_m < n_qb * ROW_BLOCK
    tl.store(dst, lam_q, mask=in_pad)
    tl.store(dst + ROW_BLOCK, lse * _LOG2E, mask=in_pad)
    tl.store(dst + 2 * ROW_BLOCK, delta, mask=in_pad)


@triton.jit
def _bwd_tile(dv_acc, dlk_acc, dt_acc, dsl_acc, lam_k, v, offs_n, start_n, offs_d, start_m, e0_q, e0_k,
              ROWS_bh, DO_bh, DLQP_bh, accumulate, stride_do_t, stride_do_d,
              Tq, Tk, Dv, off, inv_t2, slope2,
              IS_CAUSAL: tl.constexpr,
              HAS_ALIBI: tl.constexpr,
              # apply the causal / key-range mask (tiles on the diagonal or past Tk)
              MASK: tl.constexpr,
              # Tq % BLOCK_M != 0: mask the query rows
              MASK_Q: tl.constexpr,
              # BLOCK_D > Dv: mask dO's feature columns
              MASK_D: tl.constexpr,
              BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr,
              # input_precision of the dV and dP products
              DOT_PRECISION: tl.constexpr,
              # input_precision of the one-hot reduction products (dS∘sign is fp32)
              RED_PRECISION: tl.constexpr,
              # GPU code generation: layout anchor and inline-PTX exp2 (False in the interpreter)
              GPU: tl.constexpr,
              # dt_acc is a (BLOCK_N, BLOCK_M) register tile (one FFMA per score); False: a (BLOCK_N,) vector
              # of per-iteration row sums (32 fewer registers per thread at 64×64, a few shuffles per tile)
              DT_TILE: tl.constexpr,
              # which results this launch computes (see the kernel): dV, and/or the λ, temperature and slope ones
              WITH_DV: tl.constexpr,
              WITH_DLAMBDA: tl.constexpr):
    """One (keys × queries) tile: accumulates dV, dλk (one-hot product), dtemperature (tile or key vector) and
    dslope (key vector) and stores this key block's partial dλq of the BLOCK_M query rows (each part only
    when its flag is set)."""
    offs_r = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_r
    # addresses as (scalar base advanced to start_m) + (loop-invariant per-thread offsets): the compiler folds
    # the offsets of a thread's elements into the load instructions' immediates instead of forming one
    # address per element from start_m + arange. λq, lse·log2e and D of this query block are one ROWS block
    # (BLOCK_M floats apart: one address for the three), padded past Tq (lse = 1e30: P = 0; D = 0), so
    # they need no masks.
    R_m = ROWS_bh + start_m * 3
    lam_q = tl.load(R_m + offs_r)
    ell = tl.load(R_m + BLOCK_M + offs_r)
    delta = tl.load(R_m + 2 * BLOCK_M + offs_r)
    do_ptrs = (DO_bh + tl.cast(start_m, tl.int64) * stride_do_t) + offs_r[:, None] * stride_do_t + offs_d[None, :] * stride_do_d
    if MASK_Q:
        # rows past Tq: dO = 0 (and P = 0, D = 0 from ROWS) give dS = 0
        do_mask = (offs_m < Tq)[:, None]
        if MASK_D:
            do_mask = do_mask & (offs_d[None, :] < Dv)
        do = tl.load(do_ptrs, mask=do_mask, other=0.0)
    else:
        if MASK_D:
            do = tl.load(do_ptrs, mask=offs_d[None, :] < Dv, other=0.0)
        else:
            do = tl.load(do_ptrs)
    # λq_i - λk_j, (BLOCK_N, BLOCK_M): the difference first (exact for close λ, any magnitude), then scaled
    diff = lam_q[None, :] - lam_k[:, None]
    abs_diff = tl.abs(diff)
    if HAS_ALIBI:
        # distances from tile-local float vectors (exact small integers, no int tile): i + off - j =
        # qd_i - kd_j with qd = r + (start_m + off - start_n), kd = c (r, c the tile's row and column)
        qd = (offs_r + (start_m + off - start_n)).to(tl.float32)
        kd = tl.arange(0, BLOCK_N).to(tl.float32)
        if IS_CAUSAL:
            # visible scores have i + off >= j: slope·dist = slope·qd_i - slope·kd_j, folded into the row and
            # column vectors (no distance tile: one FADD per score)
            logit2 = -abs_diff * inv_t2 - (ell + slope2 * qd)[None, :] + (slope2 * kd)[:, None]
        else:
            logit2 = -abs_diff * inv_t2 - ell[None, :] - slope2 * tl.abs(qd[None, :] - kd[:, None])
    else:
        logit2 = -abs_diff * inv_t2 - ell[None, :]
        qd = delta  # unused without ALiBi
        kd = lam_k
    if GPU:
        # a BLOCK_N×BLOCK_M×16 product of zeros whose accumulator is the logit tile: it puts the tile in the
        # tensor cores' accumulator layout (that of dPᵀ), so P is computed once and feeds dV = Pᵀ dO from
        # registers; without it Triton evaluates the exponentials twice, once per layout. The tile is still
        # finite here (the mask comes after): no -inf ever enters a tensor-core instruction
        logit2 = tl.dot(tl.zeros([BLOCK_N, 16], dtype=do.dtype), tl.zeros([16, BLOCK_M], dtype=do.dtype), logit2)
    if MASK:
        # hidden scores get -inf before the exponential (their logit2 may be large where lse is very negative)
        visible = offs_n[:, None] < Tk
        if IS_CAUSAL:
            visible = visible & (offs_n[:, None] <= offs_m[None, :] + off)
        logit2 = tl.where(visible, logit2, float("-inf"))
    if GPU:
        # one MUFU.EX2; P below 2^-126 flushes to 0 (tl.exp2 adds a range test and two multiplies)
        p = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [logit2], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        p = tl.exp2(logit2)
    if WITH_DLAMBDA:
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    if WITH_DV:
        dv_acc = tl.dot(p.to(do.dtype), do, dv_acc, input_precision=DOT_PRECISION)
    if WITH_DLAMBDA:
        dlk_acc, dt_acc, dsl_acc = _bwd_tile_dlambda(
            p, dp, diff, delta, qd, kd, dlk_acc, dt_acc, dsl_acc,
            e0_q, e0_k, DLQP_bh, accumulate, start_m, offs_r, offs_m, Tq,
            IS_CAUSAL, HAS_ALIBI, MASK_Q, BLOCK_M, RED_PRECISION, DT_TILE)
    return dv_acc, dlk_acc, dt_acc, dsl_acc


@triton.jit
def _bwd_tile_dlambda(p, dp, diff, delta, qd, kd, dlk_acc, dt_acc, dsl_acc, e0_q, e0_k, DLQP_bh, accumulate,
                      start_m, offs_r, offs_m, Tq,
                      IS_CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_Q: tl.constexpr,
                      BLOCK_M: tl.constexpr, RED_PRECISION: tl.constexpr, DT_TILE: tl.constexpr):
    """The tile's λ, temperature and slope gradients from P and dPᵀ: dS and the one-hot reductions."""
    if HAS_ALIBI:
        # dS first, its dslope sum, then the sign moved onto dS (the same bits as P∘sign times dP - D): P and
        # dS are never live together, which the extra dS∘dist reduction would otherwise need (it spilled)
        ds = p * (dp - delta[None, :])
        # a key vector, not a second register tile; the distance is re-formed here from the two vectors (one
        # FADD per score) rather than kept live across the products. Causal: hidden scores have P = 0 (dS = 0),
        # so the signed distance qd - kd is exact where it counts.
        if IS_CAUSAL:
            dist = qd[None, :] - kd[:, None]
        else:
            dist = tl.abs(qd[None, :] - kd[:, None])
        dsl_acc += tl.sum(ds * dist, 1)
        ds_sign = (ds.to(tl.uint32, bitcast=True) ^ (diff.to(tl.uint32, bitcast=True) & 0x80000000)).to(
            tl.float32, bitcast=True)
        ds_sign = tl.where(diff == 0.0, 0.0, ds_sign)
    else:
        # P∘sign(λq_i - λk_j): the sign bit of the difference moved onto P (one LOP3), and sign(0) = 0 (ties
        # carry no gradient, as autograd's abs)
        p_sign = (p.to(tl.uint32, bitcast=True) ^ (diff.to(tl.uint32, bitcast=True) & 0x80000000)).to(
            tl.float32, bitcast=True)
        p_sign = tl.where(diff == 0.0, 0.0, p_sign)
        # dS∘sign; dS∘|Δλ| = (dS∘sign)∘Δλ
        ds_sign = p_sign * (dp - delta[None, :])
    if DT_TILE:
        dt_acc += ds_sign * diff
    else:
        dt_acc += tl.sum(ds_sign * diff, 1)
    ds_sign = ds_sign.to(e0_q.dtype)
    dlk_acc = tl.dot(ds_sign, e0_q, dlk_acc, input_precision=RED_PRECISION)
    # every row of the (16, BLOCK_M) product is the column sum; row 0 is stored, added to what the slot's
    # earlier key blocks left there (a load predicated off for the slot's first block)
    dlq = tl.dot(e0_k, ds_sign, input_precision=RED_PRECISION)
    row0 = tl.arange(0, 16)[:, None] == 0
    if MASK_Q:
        row0 = row0 & (offs_m[None, :] < Tq)
    dlq_ptrs = (DLQP_bh + start_m) + offs_r[None, :] + tl.zeros([16, BLOCK_M], dtype=tl.int32)
    dlq += tl.load(dlq_ptrs, mask=row0 & (tl.zeros([16, BLOCK_M], dtype=tl.int32) + accumulate > 0), other=0.0)
    tl.store(dlq_ptrs, dlq, mask=row0)
    return dlk_acc, dt_acc, dsl_acc


@triton.jit
def taumode_attention_bwd_kernel(
    ROWS, LK, V, DO, TEMP, SLOPES,
    DV, DLK, DLQ_PART, DT_PART, DSLOPE_PART,
    stride_lk_b, stride_lk_h, stride_lk_t,
    stride_v_b, stride_v_h, stride_v_t, stride_v_d,
    stride_do_b, stride_do_h, stride_do_t, stride_do_d,
    stride_dv_b, stride_dv_h, stride_dv_t, stride_dv_d,
    B, H, Tq, Tk, Dv,
    # partial-dλq slots per (batch, kv head) = the key blocks of one launch; this launch's first key block
    SLOTS, KB_START,
    # query heads per kv head (H // Hkv)
    GROUP: tl.constexpr,
    # bottom-right causal mask j <= i + Tk - Tq
    IS_CAUSAL: tl.constexpr,
    # ALiBi slopes given (SLOPES read, DSLOPE_PART written)
    HAS_ALIBI: tl.constexpr,
    # query rows per loop iteration
    BLOCK_M: tl.constexpr,
    # keys per program
    BLOCK_N: tl.constexpr,
    # Dv padded to a power of two (>= 16)
    BLOCK_D: tl.constexpr,
    # Tq % BLOCK_M == 0 (no query-row masks)
    EVEN_M: tl.constexpr,
    # Tk % BLOCK_N == 0 (no key-tail masks)
    EVEN_N: tl.constexpr,
    # BLOCK_D > Dv: mask V's, dO's and dV's feature columns
    MASK_D: tl.constexpr,
    # input_precision of dV = Pᵀ dO and dPᵀ = V dOᵀ ("ieee" for fp32 V, ignored for fp16/bf16)
    DOT_PRECISION: tl.constexpr,
    # input_precision of the one-hot reductions ("ieee": dS∘sign in fp32 for fp32 V; fp16/bf16 V take it in
    # V's dtype, as FlashAttention's dS)
    RED_PRECISION: tl.constexpr,
    # GPU code generation (a zero product that fixes the score tile's layout, inline-PTX exp2); False under
    # TRITON_INTERPRET=1, where the same math runs with tl.exp2
    GPU: tl.constexpr,
    # the unmasked loop accumulates dtemperature in a (BLOCK_N, BLOCK_M) register tile (one FFMA per score);
    # False: per-iteration row sums into a key vector (for the configs that would otherwise spill)
    DT_TILE: tl.constexpr,
    # the results of this launch: dV (WITH_DV) and the λ, temperature and slope ones (WITH_DLAMBDA). Both in
    # one launch normally; the launcher splits them into two launches where one program holding both the V
    # tile and the dV accumulator across a GQA group spills (fp32, Dv >= 256): the dV launch needs no V
    # tile and no dPᵀ, the other no dV accumulator; P is recomputed (one exp2 per score)
    WITH_DV: tl.constexpr,
    WITH_DLAMBDA: tl.constexpr,
):
    """Writes DV (WITH_DV), DLK and the partials DLQ_PART, DT_PART, DSLOPE_PART (WITH_DLAMBDA; see the module
    docstring).

    Grid: (SLOTS·B·Hkv,), launched for KB_START = 0, SLOTS, 2·SLOTS, … in turn: program (b, hk, slot) takes
    key block KB_START + slot and adds its partial dλq into slot `slot` of DLQ_PART, where the previous
    launch's block of that slot left its own (stream order makes the sum deterministic, no atomics): the
    scratch is SLOTS floats per query row whatever Tk."""
    pid = tl.program_id(0)
    slot = pid % SLOTS
    pid_n = KB_START + slot
    num_kb = tl.cdiv(Tk, BLOCK_N)
    if pid_n >= num_kb:
        return
    # 64-bit from here: batch/head bases and (slot·B + b)·H·Tq pass 2^31 elements on large tensors
    pid_bk = tl.cast(pid // SLOTS, tl.int64)
    Hkv = H // GROUP
    b = pid_bk // Hkv
    hk = pid_bk % Hkv
    # the slot's earlier key blocks (previous launches) wrote their partial dλq rows: add to them
    accumulate = (KB_START > 0).to(tl.int32)
    off = Tk - Tq
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    LK_bh = LK + b * stride_lk_b + hk * stride_lk_h
    V_bh = V + b * stride_v_b + hk * stride_v_h
    v_ptrs = (V_bh + tl.cast(start_n, tl.int64) * stride_v_t) + tl.arange(0, BLOCK_N)[:, None] * stride_v_t \
        + offs_d[None, :] * stride_v_d
    # the V tile is only read by dPᵀ = V dOᵀ (WITH_DLAMBDA)
    if EVEN_N:
        lam_k = tl.load((LK_bh + tl.cast(start_n, tl.int64) * stride_lk_t) + tl.arange(0, BLOCK_N) * stride_lk_t)
        if WITH_DLAMBDA:
            if MASK_D:
                v = tl.load(v_ptrs, mask=offs_d[None, :] < Dv, other=0.0)
            else:
                v = tl.load(v_ptrs)
    else:
        key_ok = offs_n < Tk
        lam_k = tl.load((LK_bh + tl.cast(start_n, tl.int64) * stride_lk_t) + tl.arange(0, BLOCK_N) * stride_lk_t,
                        mask=key_ok, other=0.0)
        if WITH_DLAMBDA:
            v_mask = key_ok[:, None]
            if MASK_D:
                v_mask = v_mask & (offs_d[None, :] < Dv)
            v = tl.load(v_ptrs, mask=v_mask, other=0.0)
    if not WITH_DLAMBDA:
        v = lam_k  # unused

    # query ranges: [0, q_start) sees no key of this block; [q_start, q_mid) needs the mask; [q_mid, Tq) not
    if IS_CAUSAL:
        q_start = (tl.maximum(start_n - off, 0) // BLOCK_M) * BLOCK_M
        # a tile is fully visible when its first row sees the block's last key: start_m + off >= start_n + N - 1
        q_need = tl.maximum(start_n + BLOCK_N - 1 - off - q_start, 0)
        q_mid = q_start + tl.cdiv(q_need, BLOCK_M) * BLOCK_M
    else:
        q_start = Tq * 0
        q_mid = Tq * 0
    if not EVEN_N:
        if start_n + BLOCK_N > Tk:
            q_mid = Tq
    q_mid = tl.minimum(q_mid, Tq)

    # one-hot reduction matrices: column 0 of e0_q is ones; e0_k is all ones (every row of e0_k·dS is the
    # column sum, so any row can be stored). In V's dtype (fp32 for fp32 V).
    e0_q = (tl.where(tl.arange(0, 16)[None, :] == 0, 1.0, 0.0) + tl.zeros([BLOCK_M, 16], dtype=tl.float32)
            ).to(V.dtype.element_ty)
    e0_k = tl.full([16, BLOCK_N], 1.0, dtype=V.dtype.element_ty)

    dv_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dlk_total = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        inv_t = 1.0 / tl.load(TEMP + h)
        inv_t2 = inv_t * _LOG2E
        if HAS_ALIBI:
            slope2 = tl.load(SLOPES + b * H + h) * _LOG2E
        else:
            slope2 = 0.0
        ROWS_bh = ROWS + (b * H + h) * (tl.cdiv(Tq, BLOCK_M) * 3 * BLOCK_M)
        DO_bh = DO + b * stride_do_b + h * stride_do_h
        DLQP_bh = DLQ_PART + ((slot * B + b) * H + h) * Tq
        if WITH_DLAMBDA:
            if KB_START == 0:
                # rows that see no key of the slot's first block (nor of its later ones): partial dλq 0
                for start_m in range(0, q_start, BLOCK_M):
                    offs_m = start_m + tl.arange(0, BLOCK_M)
                    tl.store(DLQP_bh + offs_m, tl.zeros([BLOCK_M], dtype=tl.float32))
        dlk_acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
        # dtemperature and dslope as key vectors of row sums; the unmasked loop may keep dtemperature in a
        # register tile instead (DT_TILE), which is not live during the masked loop (its mask, the key-tail
        # and causal predicates raise the register pressure there)
        dt_vec = tl.zeros([BLOCK_N], dtype=tl.float32)
        dsl_vec = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start_m in range(q_start, q_mid, BLOCK_M):
            dv_acc, dlk_acc, dt_vec, dsl_vec = _bwd_tile(
                dv_acc, dlk_acc, dt_vec, dsl_vec, lam_k, v, offs_n, start_n, offs_d, start_m, e0_q, e0_k,
                ROWS_bh, DO_bh, DLQP_bh, accumulate, stride_do_t, stride_do_d,
                Tq, Tk, Dv, off, inv_t2, slope2,
                IS_CAUSAL, HAS_ALIBI, True, not EVEN_M, MASK_D, BLOCK_M, BLOCK_N, DOT_PRECISION, RED_PRECISION, GPU,
                False, WITH_DV, WITH_DLAMBDA)
        if DT_TILE:
            dt_acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            dt_acc = dt_vec
        for start_m in range(q_mid, Tq, BLOCK_M):
            dv_acc, dlk_acc, dt_acc, dsl_vec = _bwd_tile(
                dv_acc, dlk_acc, dt_acc, dsl_vec, lam_k, v, offs_n, start_n, offs_d, start_m, e0_q, e0_k,
                ROWS_bh, DO_bh, DLQP_bh, accumulate, stride_do_t, stride_do_d,
                Tq, Tk, Dv, off, inv_t2, slope2,
                IS_CAUSAL, HAS_ALIBI, False, not EVEN_M, MASK_D, BLOCK_M, BLOCK_N, DOT_PRECISION, RED_PRECISION, GPU,
                DT_TILE, WITH_DV, WITH_DLAMBDA)
        if WITH_DLAMBDA:
            dlk_total += dlk_acc * inv_t
            if DT_TILE:
                dt = tl.sum(tl.sum(dt_acc, 1) + dt_vec, 0) * (inv_t * inv_t)
            else:
                dt = tl.sum(dt_acc, 0) * (inv_t * inv_t)
            tl.store(DT_PART + (b * H + h) * num_kb + pid_n, dt)
            if HAS_ALIBI:
                tl.store(DSLOPE_PART + (b * H + h) * num_kb + pid_n, -tl.sum(dsl_vec, 0))

    if WITH_DLAMBDA:
        dlk = tl.sum(dlk_total, 1)
        if EVEN_N:
            tl.store((DLK + pid_bk * Tk + start_n) + tl.arange(0, BLOCK_N), dlk)
        else:
            tl.store((DLK + pid_bk * Tk + start_n) + tl.arange(0, BLOCK_N), dlk, mask=offs_n < Tk)
    if WITH_DV:
        dv_ptrs = ((DV + b * stride_dv_b + hk * stride_dv_h + tl.cast(start_n, tl.int64) * stride_dv_t)
                   + tl.arange(0, BLOCK_N)[:, None] * stride_dv_t + offs_d[None, :] * stride_dv_d)
        dv_out = dv_acc.to(DV.dtype.element_ty)
        if EVEN_N:
            if MASK_D:
                tl.store(dv_ptrs, dv_out, mask=offs_d[None, :] < Dv)
            else:
                tl.store(dv_ptrs, dv_out)
        else:
            dv_mask = offs_n[:, None] < Tk
            if MASK_D:
                dv_mask = dv_mask & (offs_d[None, :] < Dv)
            tl.store(dv_ptrs, dv_out, mask=dv_mask)
