"""Taumode attention backward (docs/math.md §Attention logits): dλq, dλk, dV, dtemperature, dslope from dO,
O and the saved lse.

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
  every temperature, so there is nothing to overflow (docs/math.md §Fast path range).
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
  as two launches where one program holding the V tile and the dV accumulator would spill (fp32 at a
  padded Dv of 256, the largest fp32 head it fuses, with GQA): the dV launch reads no V and forms no dPᵀ,
  the other keeps no dV accumulator.
  Products (the launcher's precision rules): fp16/bf16 V feed P, dO and dS∘sign to the tensor cores in V's
  dtype; fp32 V runs "tf32x3" for every product below a padded Dv of 256 and "ieee" (fp32 FMA) at 256, where
  the tf32x3 split copies of the V and dO tiles no longer fit in registers.

Layouts: λq (B, H, Tq) fp32, λk (B, Hkv, Tk) fp32, V (B, Hkv, Tk, Dv), dO (B, H, Tq, Dv) in V's dtype, any
strides; ROWS (B·H, cdiv(Tq, BLOCK_M), 3, BLOCK_M) fp32 contiguous (from the preprocess: λq, the logsumexp
times log2 e, D); TEMP (H,) fp32; SLOPES (B, H) fp32 (read when HAS_ALIBI).
Outputs: DV (B, Hkv, Tk, Dv) in V's dtype, any strides; DLK (B, Hkv, Tk) fp32 contiguous;
DLQ_PART (SLOTS, B, H, Tq) fp32 contiguous: Σ_j dS_ij sign(λq_i - λk_j) over the keys of the slot's blocks
(dλq before the factor -1/T_h), every element written (zeros for rows that see none of those keys);
DT_PART, DSLOPE_PART (B, H, num key blocks) fp32 contiguous (DSLOPE_PART written when HAS_ALIBI).

Packed sequences (VARLEN, docs/math.md §Packed sequences; FlashAttention's cu_seqlens): the pack is one batch
row and B counts its sequences. CU_Q, CU_K (B + 1,) int32 are the sequences' offsets into the query and key
rows, read on the device only; Tq and Tk are the pack's total rows (the extents of the packed buffers), and
each program works on its sequence's own lengths and offsets, exactly as a dense program of that sequence
(causal bottom-right and ALiBi distances per sequence, slopes row b). Layouts: λq (1, H, total_q),
λk (1, Hkv, total_k), V (1, Hkv, total_k, Dv), dO (1, H, total_q, Dv), any strides (their batch strides are
never read); ROWS (H, total_q // BLOCK_M + B, 3, BLOCK_M): sequence b's query blocks start at block
q_start // BLOCK_M + b of its head (see `_pack_row_block`), blocks between sequences never written nor read;
DV (1, Hkv, total_k, Dv) any strides; DLK (Hkv, total_k); DLQ_PART (SLOTS, H, DLQ_ROW_ALIGN·(total_q //
DLQ_ROW_ALIGN + B)): sequence b's rows from `_dlq_rows_of` on (an aligned start, so the loop's partial-dλq
accesses vectorise), its rows up to a multiple of DLQ_ROW_ALIGN written; DT_PART, DSLOPE_PART (B + 1, H,
KB_COLS) with KB_COLS the key blocks the launches cover (cdiv(max_k, BLOCK_N) rounded up to SLOTS; the last
launch's programs add the blocks past it into their column: max_seqlen_k is only a hint), row B for the keys
past the last sequence (the launcher's extra sequence b = B, no queries: zero dV and dλk). The offsets are
clamped into the rows (`grid.sequence_rows`), so no offset reaches outside the tensors. Every element that
the launcher reads of each sequence's rows and columns is written, zeros where a sequence has fewer key
blocks than the launches cover; the preprocess
writes IDX, each query row's DLQ_PART row, for the launcher's gather.
"""
import triton
import triton.language as tl

from .grid import block_and_head, sequence_rows

# log2(e): logits are formed in the log2 domain for exp2
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _pack_row_block(q_start, b, ROW_BLOCK: tl.constexpr):
    """The first ROWS block (of one head) of sequence b of a pack, whose query rows start at q_start.

    q_start // ROW_BLOCK + b needs no prefix sum over the sequences and no host read, and the sequences'
    ranges of cdiv(Tq_b, ROW_BLOCK) blocks never overlap: with q_start = a·R + r (0 <= r < R),
    cdiv(Tq_b, R) <= floor(Tq_b / R) + 1 <= floor((r + Tq_b) / R) + 1, so sequence b ends at or before
    (q_start + Tq_b) // R + b + 1, where sequence b + 1 begins. The last ends by total_q // R + B: ROWS holds
    that many blocks per head."""
    return q_start // ROW_BLOCK + b


# A pack's partial-dλq rows (DLQ_PART) start each sequence at a multiple of this many rows (fp32: one 16-byte
# vector), so that its loads and stores vectorise as the dense build's; the launcher gathers the rows back
# (IDX from the preprocess). The same non-overlap argument as `_pack_row_block`, with DLQ_ROW_ALIGN rows of
# padding at most per sequence.
DLQ_ROW_ALIGN = tl.constexpr(4)


@triton.jit
def _dlq_rows_of(DLQ_PART, slot_head, total_q, q_start, b, B):
    """The first partial-dλq row of sequence b (rows from q_start) in slot·H + head `slot_head` of a pack's
    DLQ_PART (SLOTS, H, DLQ_ROW_ALIGN·(total_q // DLQ_ROW_ALIGN + B))."""
    return DLQ_PART + (slot_head * (total_q // DLQ_ROW_ALIGN + B) + _pack_row_block(q_start, b, DLQ_ROW_ALIGN)) \
        * DLQ_ROW_ALIGN


@triton.jit
def attention_bwd_preprocess_kernel(
    OUT, DO, LSE, LQ, ROWS,
    stride_o_b, stride_o_h, stride_o_t, stride_o_d,
    stride_do_b, stride_do_h, stride_do_t, stride_do_d,
    stride_lq_b, stride_lq_h, stride_lq_t,
    H, Tq, Dv,
    # a pack (VARLEN): the sequences' query offsets (B + 1,) int32; IDX (Tq,) int32 receives, per query row,
    # its row in the main kernel's DLQ_PART layout (`_dlq_rows_of`); the number of sequences; the longest
    # sequence's queries; Tq is then the pack's total rows. A dense build gets None constants.
    CU_Q, IDX, B, MAX_Q,
    # query rows per program
    BLOCK_M: tl.constexpr,
    # Dv padded to a power of two
    BLOCK_D: tl.constexpr,
    # the main kernel's BLOCK_M: the block size of the ROWS layout
    ROW_BLOCK: tl.constexpr,
    # packed sequences (see the module docstring)
    VARLEN: tl.constexpr,
):
    """ROWS (B·H, cdiv(Tq, ROW_BLOCK), 3, ROW_BLOCK) fp32 contiguous: per query block of the main kernel, its
    λq, LSE·log2(e) (the logsumexp in the log2 domain of the main kernel) and D = Σ_d dO∘O in fp32, the
    three vectors ROW_BLOCK floats apart, so that the main kernel reads all three from one address (the
    offsets become load immediates). Padding rows (Tq..) get λq = 0, lse = 1e30, D = 0 (P = 0, dS = 0), so
    the main kernel reads them without masks; 1e30, not +inf, keeps their logits finite where the main
    kernel's layout anchor passes them through the tensor cores.

    Grid: (cdiv(n_qb·ROW_BLOCK, BLOCK_M)·B·H,), the row blocks of one head consecutive. A pack (VARLEN):
    (cdiv(cdiv(MAX_Q, ROW_BLOCK)·ROW_BLOCK, BLOCK_M)·B·H,) over (sequence, head), the programs past their
    sequence's padded rows exiting; ROWS (H, Tq // ROW_BLOCK + B, 3, ROW_BLOCK) with sequence b's blocks from
    `_pack_row_block` on (rows past its Tq_b padded as above, the same block layout as a dense sequence);
    the programs of head 0 also write IDX for their rows."""
    if VARLEN:
        num_m = tl.cdiv(tl.cdiv(MAX_Q, ROW_BLOCK) * ROW_BLOCK, BLOCK_M)
        # b is the sequence; from here Tq is its length, its rows starting at q_start of the pack's total_q
        # (the offsets clamped into the pack's rows: grid.sequence_rows)
        pid_m, b, h, pid_bh = block_and_head(num_m, H)
        total_q = Tq
        q_start, Tq = sequence_rows(CU_Q, b, B, total_q)
        n_qb = tl.cdiv(Tq, ROW_BLOCK)
        # MAX_Q (the grid) is only a hint: the programs step over the sequence's row blocks until it is covered
        for m0 in range(pid_m * BLOCK_M, n_qb * ROW_BLOCK, num_m * BLOCK_M):
            rows = tl.arange(0, BLOCK_M)
            offs_m = m0 + rows
            offs_d = tl.arange(0, BLOCK_D)
            mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < Dv)
            # the pack's batch strides are never read: its one batch row is at the base pointers
            row0 = tl.cast(q_start + m0, tl.int64)
            o = tl.load((OUT + h * stride_o_h + row0 * stride_o_t)
                        + rows[:, None] * stride_o_t + offs_d[None, :] * stride_o_d, mask=mask, other=0.0)
            do = tl.load((DO + h * stride_do_h + row0 * stride_do_t)
                         + rows[:, None] * stride_do_t + offs_d[None, :] * stride_do_d, mask=mask, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            row_ok = offs_m < Tq
            # a row that saw no key has lse = +inf (P = 0): 1e30 keeps it finite, as the padding's
            lse = tl.minimum(tl.load((LSE + h * total_q + row0) + rows, mask=row_ok, other=1e30), 1e30)
            lam_q = tl.load((LQ + h * stride_lq_h + row0 * stride_lq_t) + rows * stride_lq_t, mask=row_ok,
                            other=0.0)
            block0 = h * (total_q // ROW_BLOCK + B) + _pack_row_block(q_start, b, ROW_BLOCK)
            dst = ROWS + (block0 + offs_m // ROW_BLOCK) * (3 * ROW_BLOCK) + offs_m % ROW_BLOCK
            if h == 0:
                dlq_row0 = _pack_row_block(q_start, b, DLQ_ROW_ALIGN) * DLQ_ROW_ALIGN
                tl.store((IDX + q_start + m0) + rows, (dlq_row0 + offs_m).to(tl.int32), mask=row_ok)
            _store_rows(dst, lam_q, lse, delta, offs_m < n_qb * ROW_BLOCK, ROW_BLOCK)
    else:
        num_m = tl.cdiv(tl.cdiv(Tq, ROW_BLOCK) * ROW_BLOCK, BLOCK_M)
        pid_m, b, h, pid_bh = block_and_head(num_m, H)
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
        lam_q = tl.load((LQ + b * stride_lq_b + h * stride_lq_h + tl.cast(m0, tl.int64) * stride_lq_t)
                        + rows * stride_lq_t, mask=row_ok, other=0.0)
        n_qb = tl.cdiv(Tq, ROW_BLOCK)
        dst = ROWS + (pid_bh * n_qb + offs_m // ROW_BLOCK) * (3 * ROW_BLOCK) + offs_m % ROW_BLOCK
        _store_rows(dst, lam_q, lse, delta, offs_m < n_qb * ROW_BLOCK, ROW_BLOCK)


@triton.jit
def _store_rows(dst, lam_q, lse, delta, in_pad, ROW_BLOCK: tl.constexpr):
    """λq, lse·log2(e) and D of a ROWS block's rows, ROW_BLOCK floats apart (the preprocess's output)."""
    tl.store(dst, lam_q, mask=in_pad)
    tl.store(dst + ROW_BLOCK, lse * _LOG2E, mask=in_pad)
    tl.store(dst + 2 * ROW_BLOCK, delta, mask=in_pad)


@triton.jit
def _bwd_tile(dv_acc, dlk_acc, dt_acc, dsl_acc, lam_k, v, offs_n, start_n, offs_d, start_m, e0_q, e0_k,
              ROWS_bh, DO_bh, DLQP_bh, accumulate, stride_do_t, stride_do_d,
              Tq, Tq_rows, Tk, Dv, off, inv_t2, slope2,
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
              # input_precision of the dV and dP products (see the module docstring)
              DOT_PRECISION: tl.constexpr,
              # input_precision of the one-hot reduction products (dS∘sign enters them in V's dtype)
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
    when its flag is set). With MASK_Q, rows from Tq on read no dO and rows from Tq_rows on store no partial
    dλq (Tq_rows = Tq, or for a pack Tq rounded up to DLQ_ROW_ALIGN: the sequence's own padding rows)."""
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
    do_ptrs = ((DO_bh + tl.cast(start_m, tl.int64) * stride_do_t) + offs_r[:, None] * stride_do_t
               + offs_d[None, :] * stride_do_d)
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
            e0_q, e0_k, DLQP_bh, accumulate, start_m, offs_r, offs_m, Tq_rows,
            IS_CAUSAL=IS_CAUSAL, HAS_ALIBI=HAS_ALIBI, MASK_Q=MASK_Q, BLOCK_M=BLOCK_M, RED_PRECISION=RED_PRECISION,
            DT_TILE=DT_TILE)
    return dv_acc, dlk_acc, dt_acc, dsl_acc


@triton.jit
def _bwd_tile_dlambda(p, dp, diff, delta, qd, kd, dlk_acc, dt_acc, dsl_acc, e0_q, e0_k, DLQP_bh, accumulate,
                      start_m, offs_r, offs_m, Tq_rows,
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
        # carry no gradient, as autograd's abs; docs/math.md §Attention logits)
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
        row0 = row0 & (offs_m[None, :] < Tq_rows)
    dlq_ptrs = (DLQP_bh + start_m) + offs_r[None, :] + tl.zeros([16, BLOCK_M], dtype=tl.int32)
    dlq += tl.load(dlq_ptrs, mask=row0 & (tl.zeros([16, BLOCK_M], dtype=tl.int32) + accumulate > 0), other=0.0)
    tl.store(dlq_ptrs, dlq, mask=row0)
    return dlk_acc, dt_acc, dsl_acc


@triton.jit
def _zero_missing_blocks(DLQ_PART, DT_PART, DSLOPE_PART, b, hk, slot, pid_n, KB_START, kb_cols, B, H, total_q,
                         q_seq0, Tq, GROUP: tl.constexpr, HAS_ALIBI: tl.constexpr, BLOCK_M: tl.constexpr):
    """A pack's program whose key block pid_n is past its sequence's (b) last: the zeros that no program
    of the sequence writes otherwise, for the GROUP query heads of kv head hk.

    - DT_PART / DSLOPE_PART column pid_n (< kb_cols): the torch sums run over all cdiv(max_k, BLOCK_N)
      columns of every sequence.
    - DLQ_PART slot `slot`, the sequence's Tq rows, in the first launch only: a slot with no key block in the
      first launch gets none in the later ones (their blocks KB_START + slot are further out), so nothing
      else writes it, and the slot sum reads every slot of every row. This costs a store of the rows only
      for sequences with fewer key blocks than SLOTS, where a zero-filled DLQ_PART would be a memset of all
      SLOTS·H·total_q floats and one more launch."""
    for g in range(GROUP):
        h = hk * GROUP + g
        tl.store(DT_PART + (b * H + h) * kb_cols + pid_n, 0.0)
        if HAS_ALIBI:
            tl.store(DSLOPE_PART + (b * H + h) * kb_cols + pid_n, 0.0)
        if KB_START == 0:
            DLQP_bh = _dlq_rows_of(DLQ_PART, slot * H + h, total_q, q_seq0, b, B)
            for start_m in range(0, Tq, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                tl.store(DLQP_bh + offs_m, tl.zeros([BLOCK_M], dtype=tl.float32), mask=offs_m < Tq)


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
    # a pack (VARLEN): the sequences' query and key offsets (B + 1,) int32 and the columns of DT_PART /
    # DSLOPE_PART, cdiv(max_k, BLOCK_N). A dense build gets None constants (it compiles as if they did not
    # exist)
    CU_Q, CU_K, KB_COLS,
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
    # input_precision of dV = Pᵀ dO and dPᵀ = V dOᵀ: for fp32 V "tf32x3" below a padded Dv of 256, "ieee" at
    # 256 (the launcher's precision rules); ignored for fp16/bf16
    DOT_PRECISION: tl.constexpr,
    # input_precision of the one-hot reductions of dS∘sign: for fp32 V the same as DOT_PRECISION (dS∘sign
    # stays fp32); fp16/bf16 V take dS∘sign in V's dtype, as FlashAttention's dS (ignored)
    RED_PRECISION: tl.constexpr,
    # GPU code generation (a zero product that fixes the score tile's layout, inline-PTX exp2); False under
    # TRITON_INTERPRET=1, where the same math runs with tl.exp2
    GPU: tl.constexpr,
    # the unmasked loop accumulates dtemperature in a (BLOCK_N, BLOCK_M) register tile (one FFMA per score);
    # False: per-iteration row sums into a key vector (for the configs that would otherwise spill)
    DT_TILE: tl.constexpr,
    # the results of this launch: dV (WITH_DV) and the λ, temperature and slope ones (WITH_DLAMBDA). Both in
    # one launch normally; the launcher splits them into two launches where one program holding both the V
    # tile and the dV accumulator across a GQA group spills (fp32 at a padded Dv of 256 with GQA): the dV
    # launch needs no V tile and no dPᵀ, the other no dV accumulator; P is recomputed (one exp2 per score)
    WITH_DV: tl.constexpr,
    WITH_DLAMBDA: tl.constexpr,
    # packed sequences: B counts them, Tq and Tk are the pack's total rows (see the module docstring);
    # EVEN_M and EVEN_N are False (the lengths are on the device only)
    VARLEN: tl.constexpr,
    # VARLEN: the launch of one program per (sequence, kv head) over the key blocks from KB_START on (past
    # max_seqlen_k: the other launches' KB_COLS blocks, counted in this launch's BLOCK_N), SLOTS = 1
    OVERFLOW: tl.constexpr,
):
    """Writes DV (WITH_DV), DLK and the partials DLQ_PART, DT_PART, DSLOPE_PART (WITH_DLAMBDA; see the module
    docstring).

    Grid: (SLOTS·B·Hkv,), launched for KB_START = 0, SLOTS, 2·SLOTS, … in turn: program (b, hk, slot) takes
    key block KB_START + slot and adds its partial dλq into slot `slot` of DLQ_PART, where the previous
    launch's block of that slot left its own (stream order makes the sum deterministic, no atomics): the
    scratch is SLOTS floats per query row whatever Tk.

    A pack (VARLEN): program (b, hk, slot) is key block KB_START + slot of sequence b, the launches running
    up to the longest sequence's key blocks; a program past its sequence's blocks exits, after writing the
    zeros of what no program of its sequence writes otherwise (`_zero_missing_blocks`)."""
    pid = tl.program_id(0)
    slot = pid % SLOTS
    pid_n = KB_START + slot
    if VARLEN:
        # b is the sequence (64-bit, as the dense build's batch: the bases below pass 2^31 elements); b = B (the
        # launcher's extra sequence) is the keys past the last sequence, with no queries: zero dV and dλk
        pid_bk = tl.cast(pid // SLOTS, tl.int64)
        Hkv = H // GROUP
        b = pid_bk // Hkv
        hk = pid_bk % Hkv
        # from here Tq and Tk are sequence b's lengths, its rows starting at q_seq0 of the pack's total_q
        # and its keys at k_seq0 of total_k: every mask and loop bound below is the sequence's own. The
        # offsets are clamped into the pack's rows (grid.sequence_rows): no offset reaches outside them.
        total_q = Tq
        total_k = Tk
        q_seq0, Tq = sequence_rows(CU_Q, b, B, total_q)
        k_seq0, Tk = sequence_rows(CU_K, b, B, total_k)
        Tq = tl.where(b < B, Tq, 0)
        num_kb = tl.cdiv(Tk, BLOCK_N)
        if (not OVERFLOW) and (pid_n >= num_kb):
            if WITH_DLAMBDA:
                _zero_missing_blocks(DLQ_PART, DT_PART, DSLOPE_PART, b, hk, slot, pid_n, KB_START, KB_COLS, B, H,
                                     total_q, q_seq0, Tq, GROUP=GROUP, HAS_ALIBI=HAS_ALIBI, BLOCK_M=BLOCK_M)
            return
        # max_seqlen_k only sizes the launches (KB_COLS = the key blocks they cover): the OVERFLOW launch (one
        # program per (sequence, kv head), its own BLOCK_N) steps over the blocks past them, adding into slot
        # 0 and DT_PART column 0, which the first launch wrote. A loop here, around every launch's body,
        # spilled 24-128 B in the main builds.
        if OVERFLOW:
            # slot 0 and column 0: written by the first launch (accumulate = 1), its rows zeroed there
            # (first_write = 0)
            for kb in range(KB_START, num_kb):
                _key_block(ROWS, LK, V, DO, TEMP, SLOPES, DV, DLK, DLQ_PART, DT_PART, DSLOPE_PART,
                           stride_lk_b, stride_lk_h, stride_lk_t, stride_v_b, stride_v_h, stride_v_t, stride_v_d,
                           stride_do_b, stride_do_h, stride_do_t, stride_do_d,
                           stride_dv_b, stride_dv_h, stride_dv_t, stride_dv_d,
                           B, H, Tq, Tk, Dv, 0, kb, 0, KB_COLS, 1, 0, b, hk, pid_bk, total_q, total_k,
                           q_seq0, k_seq0, GROUP=GROUP, IS_CAUSAL=IS_CAUSAL, HAS_ALIBI=HAS_ALIBI, BLOCK_M=BLOCK_M,
                           BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, EVEN_M=EVEN_M, EVEN_N=EVEN_N, MASK_D=MASK_D,
                           DOT_PRECISION=DOT_PRECISION, RED_PRECISION=RED_PRECISION, GPU=GPU, DT_TILE=DT_TILE,
                           WITH_DV=WITH_DV, WITH_DLAMBDA=WITH_DLAMBDA, VARLEN=VARLEN)
        else:
            _key_block(ROWS, LK, V, DO, TEMP, SLOPES, DV, DLK, DLQ_PART, DT_PART, DSLOPE_PART,
                       stride_lk_b, stride_lk_h, stride_lk_t, stride_v_b, stride_v_h, stride_v_t, stride_v_d,
                       stride_do_b, stride_do_h, stride_do_t, stride_do_d,
                       stride_dv_b, stride_dv_h, stride_dv_t, stride_dv_d,
                       B, H, Tq, Tk, Dv, slot, pid_n, pid_n, KB_COLS, (KB_START > 0).to(tl.int32), KB_START == 0,
                       b, hk, pid_bk,
                       total_q, total_k, q_seq0, k_seq0, GROUP=GROUP, IS_CAUSAL=IS_CAUSAL, HAS_ALIBI=HAS_ALIBI,
                       BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, EVEN_M=EVEN_M, EVEN_N=EVEN_N,
                       MASK_D=MASK_D, DOT_PRECISION=DOT_PRECISION, RED_PRECISION=RED_PRECISION, GPU=GPU,
                       DT_TILE=DT_TILE, WITH_DV=WITH_DV, WITH_DLAMBDA=WITH_DLAMBDA, VARLEN=VARLEN)
    else:
        num_kb = tl.cdiv(Tk, BLOCK_N)
        if pid_n >= num_kb:
            return
        # 64-bit from here: batch/head bases and (slot·B + b)·H·Tq pass 2^31 elements on large tensors
        pid_bk = tl.cast(pid // SLOTS, tl.int64)
        Hkv = H // GROUP
        b = pid_bk // Hkv
        hk = pid_bk % Hkv
        _key_block(ROWS, LK, V, DO, TEMP, SLOPES, DV, DLK, DLQ_PART, DT_PART, DSLOPE_PART,
                   stride_lk_b, stride_lk_h, stride_lk_t, stride_v_b, stride_v_h, stride_v_t, stride_v_d,
                   stride_do_b, stride_do_h, stride_do_t, stride_do_d,
                   stride_dv_b, stride_dv_h, stride_dv_t, stride_dv_d,
                   B, H, Tq, Tk, Dv, slot, pid_n, pid_n, num_kb, (KB_START > 0).to(tl.int32), KB_START == 0,
                   b, hk, pid_bk,
                   Tq, Tk, 0, 0,
                   GROUP=GROUP, IS_CAUSAL=IS_CAUSAL, HAS_ALIBI=HAS_ALIBI, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                   BLOCK_D=BLOCK_D, EVEN_M=EVEN_M, EVEN_N=EVEN_N, MASK_D=MASK_D, DOT_PRECISION=DOT_PRECISION,
                   RED_PRECISION=RED_PRECISION, GPU=GPU, DT_TILE=DT_TILE, WITH_DV=WITH_DV,
                   WITH_DLAMBDA=WITH_DLAMBDA, VARLEN=VARLEN)


@triton.jit
def _key_block(ROWS, LK, V, DO, TEMP, SLOPES, DV, DLK, DLQ_PART, DT_PART, DSLOPE_PART,
               stride_lk_b, stride_lk_h, stride_lk_t, stride_v_b, stride_v_h, stride_v_t, stride_v_d,
               stride_do_b, stride_do_h, stride_do_t, stride_do_d,
               stride_dv_b, stride_dv_h, stride_dv_t, stride_dv_d,
               B, H, Tq, Tk, Dv, slot, pid_n, dt_col, kb_cols, accumulate, first_write, b, hk, pid_bk, total_q,
               total_k, q_seq0, k_seq0,
               GROUP: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
               MASK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, RED_PRECISION: tl.constexpr, GPU: tl.constexpr,
               DT_TILE: tl.constexpr, WITH_DV: tl.constexpr, WITH_DLAMBDA: tl.constexpr, VARLEN: tl.constexpr):
    """Key block pid_n of (b, kv head hk), the kernel's constexprs (Tq, Tk: the sequence's lengths when
    VARLEN, its rows and keys from q_seq0, k_seq0 of the pack's total_q, total_k): dV and dλk of its keys,
    its partial dλq added into slot `slot` where `accumulate` (int32 1: the slot was written before;
    `first_write`: its rows before the first visible query are zeroed), dtemperature / dslope into DT_PART /
    DSLOPE_PART column
    dt_col of kb_cols (added where dt_col != pid_n: a pack's extra key blocks)."""
    off = Tk - Tq
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    if VARLEN:
        # the pack's batch strides are never read: its one batch row is at the base pointers
        LK_bh = LK + hk * stride_lk_h + tl.cast(k_seq0, tl.int64) * stride_lk_t
        V_bh = V + hk * stride_v_h + tl.cast(k_seq0, tl.int64) * stride_v_t
    else:
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
    if VARLEN:
        # Every iteration of the unmasked loop starts at a provable multiple of BLOCK_M and covers whole
        # blocks, without the row mask: a bound derived from the sequence's Tq (a loaded value of unknown
        # divisibility) would split the loop's ROWS loads and its partial-dλq accesses into scalar ones. So
        # the unmasked loop takes the whole blocks [q_full, q_whole) and the masked loop, besides its
        # [q_start, q_mid), the last, partial block if it lies past q_mid (one more masked iteration, whose
        # causal and key masks are all true there).
        q_full = tl.cdiv(q_mid, BLOCK_M) * BLOCK_M
        q_whole = (Tq // BLOCK_M) * BLOCK_M
        n_diag = tl.cdiv(q_mid - q_start, BLOCK_M)
        n_masked = n_diag + ((q_whole < Tq) & (q_whole >= q_full)).to(tl.int32)
        # the sequence's DLQ_PART rows include its padding up to a multiple of DLQ_ROW_ALIGN: a row mask
        # whose bound is a known multiple of the vector width keeps the partial-dλq accesses vectorised
        Tq_rows = tl.cdiv(Tq, DLQ_ROW_ALIGN) * DLQ_ROW_ALIGN
    else:
        q_full = q_mid
        q_whole = Tq
        Tq_rows = Tq

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
            if VARLEN:
                # no slope row for b = B (the keys past the last sequence)
                slope2 = tl.load(SLOPES + b * H + h, mask=b < B, other=0.0) * _LOG2E
            else:
                slope2 = tl.load(SLOPES + b * H + h) * _LOG2E
        else:
            slope2 = 0.0
        if VARLEN:
            # ROWS (H, total_q // BLOCK_M + B, 3, BLOCK_M) as the preprocess wrote it; DLQ_PART
            # (SLOTS, H, DLQ_ROW_ALIGN·(total_q // DLQ_ROW_ALIGN + B)), sequence b's rows from the aligned
            # row `_pack_row_block(q_seq0, b, DLQ_ROW_ALIGN)·DLQ_ROW_ALIGN` (see `_dlq_rows_of`)
            ROWS_bh = ROWS + (h * (total_q // BLOCK_M + B) + _pack_row_block(q_seq0, b, BLOCK_M)) * (3 * BLOCK_M)
            DO_bh = DO + h * stride_do_h + tl.cast(q_seq0, tl.int64) * stride_do_t
            DLQP_bh = _dlq_rows_of(DLQ_PART, slot * H + h, total_q, q_seq0, b, B)
        else:
            ROWS_bh = ROWS + (b * H + h) * (tl.cdiv(Tq, BLOCK_M) * 3 * BLOCK_M)
            DO_bh = DO + b * stride_do_b + h * stride_do_h
            DLQP_bh = DLQ_PART + ((slot * B + b) * H + h) * Tq
        if WITH_DLAMBDA:
            if first_write:
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
        if VARLEN:
            # the tiles of [q_start, q_mid), then the partial last block when it lies past q_mid
            for it in range(0, n_masked):
                start_m = tl.where(it < n_diag, q_start + it * BLOCK_M, q_whole)
                dv_acc, dlk_acc, dt_vec, dsl_vec = _bwd_tile(
                    dv_acc, dlk_acc, dt_vec, dsl_vec, lam_k, v, offs_n, start_n, offs_d, start_m, e0_q, e0_k,
                    ROWS_bh, DO_bh, DLQP_bh, accumulate, stride_do_t, stride_do_d,
                    Tq, Tq_rows, Tk, Dv, off, inv_t2, slope2,
                    IS_CAUSAL=IS_CAUSAL, HAS_ALIBI=HAS_ALIBI, MASK=True, MASK_Q=not EVEN_M, MASK_D=MASK_D,
                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION, RED_PRECISION=RED_PRECISION, GPU=GPU,
                    DT_TILE=False, WITH_DV=WITH_DV, WITH_DLAMBDA=WITH_DLAMBDA)
        else:
            for start_m in range(q_start, q_mid, BLOCK_M):
                dv_acc, dlk_acc, dt_vec, dsl_vec = _bwd_tile(
                    dv_acc, dlk_acc, dt_vec, dsl_vec, lam_k, v, offs_n, start_n, offs_d, start_m, e0_q, e0_k,
                    ROWS_bh, DO_bh, DLQP_bh, accumulate, stride_do_t, stride_do_d,
                    Tq, Tq_rows, Tk, Dv, off, inv_t2, slope2,
                    IS_CAUSAL=IS_CAUSAL, HAS_ALIBI=HAS_ALIBI, MASK=True, MASK_Q=not EVEN_M, MASK_D=MASK_D,
                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION, RED_PRECISION=RED_PRECISION, GPU=GPU,
                    DT_TILE=False, WITH_DV=WITH_DV, WITH_DLAMBDA=WITH_DLAMBDA)
        if DT_TILE:
            dt_acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            dt_acc = dt_vec
        for start_m in range(q_full, q_whole, BLOCK_M):
            dv_acc, dlk_acc, dt_acc, dsl_vec = _bwd_tile(
                dv_acc, dlk_acc, dt_acc, dsl_vec, lam_k, v, offs_n, start_n, offs_d, start_m, e0_q, e0_k,
                ROWS_bh, DO_bh, DLQP_bh, accumulate, stride_do_t, stride_do_d,
                Tq, Tq_rows, Tk, Dv, off, inv_t2, slope2,
                IS_CAUSAL=IS_CAUSAL, HAS_ALIBI=HAS_ALIBI, MASK=False, MASK_Q=not EVEN_M and not VARLEN,
                MASK_D=MASK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION,
                RED_PRECISION=RED_PRECISION, GPU=GPU, DT_TILE=DT_TILE, WITH_DV=WITH_DV, WITH_DLAMBDA=WITH_DLAMBDA)
        if WITH_DLAMBDA:
            dlk_total += dlk_acc * inv_t
            if DT_TILE:
                dt = tl.sum(tl.sum(dt_acc, 1) + dt_vec, 0) * (inv_t * inv_t)
            else:
                dt = tl.sum(dt_acc, 0) * (inv_t * inv_t)
            dt_ptr = DT_PART + (b * H + h) * kb_cols + dt_col
            dsl_ptr = DSLOPE_PART + (b * H + h) * kb_cols + dt_col
            dsl = -tl.sum(dsl_vec, 0)
            if VARLEN:
                # a pack's extra key block adds to what the program's first block stored
                extra = dt_col != pid_n
                dt += tl.load(dt_ptr, mask=extra, other=0.0)
                if HAS_ALIBI:
                    dsl += tl.load(dsl_ptr, mask=extra, other=0.0)
            tl.store(dt_ptr, dt)
            if HAS_ALIBI:
                tl.store(dsl_ptr, dsl)

    if WITH_DLAMBDA:
        dlk = tl.sum(dlk_total, 1)
        if VARLEN:
            # DLK (Hkv, total_k), from the sequence's first key
            DLK_b = DLK + hk * total_k + k_seq0
        else:
            DLK_b = DLK + pid_bk * Tk
        if EVEN_N:
            tl.store((DLK_b + start_n) + tl.arange(0, BLOCK_N), dlk)
        else:
            tl.store((DLK_b + start_n) + tl.arange(0, BLOCK_N), dlk, mask=offs_n < Tk)
    if WITH_DV:
        if VARLEN:
            DV_bh = DV + hk * stride_dv_h + tl.cast(k_seq0, tl.int64) * stride_dv_t
        else:
            DV_bh = DV + b * stride_dv_b + hk * stride_dv_h
        dv_ptrs = ((DV_bh + tl.cast(start_n, tl.int64) * stride_dv_t)
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
