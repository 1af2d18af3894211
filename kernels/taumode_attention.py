"""Taumode attention forward: softmax_j(-|λq_i - λk_j| / T_h - slope_bh·|i + Tk - Tq - j|) · V.

Device code only; the launcher is `tauformer_kernels.attention_triton.attention_fwd_triton`.

One program per (query block of BLOCK_M rows, batch·head). It reads λq (its rows), λk and V of the kv head
h // GROUP (GQA without expanding anything), and writes O and the natural-log logsumexp. All logits are
formed in fp32 in the log2 domain (scaled by log2(e)); P is cast to V's dtype for the tensor cores, with fp32
accumulation.

Two paths, chosen per program inside the kernel from the λ range (no host sync). The launcher launches the
kernel twice, PATH=1 (factorised) then PATH=2 (general); each program of each launch computes the same
condition and only the matching launch writes it, so each path is compiled alone (its own registers).

- Factorised (the fast path). With c the centre of the λ range of this block's rows and all keys of the
  head, x_i = (λq_i - c)/T·log2e and y_j = (λk_j - c)/T·log2e (log2 units), a logit without ALiBi is
  -|x_i - y_j| and
      2^(-|x_i - y_j|) = 2^-x_i · min(2^y_j, r_i·2^-y_j),   r_i = 2^(2x_i),
  so a tile costs O(rows + cols) exponentials and one multiply plus one min per score (packed half2 for
  fp16 V). The row factor 2^-x_i is the same for every key block: it is left out of the accumulators
  (it cancels in O = acc / rowsum) and added back to the logsumexp. The reference is fixed (every logit
  <= 0 and the row maximum >= -span), so there is no online max and no rescaling. Blocks on the causal
  diagonal or past Tk take an exponential per score with the same reference. With ALiBi (σ = slope·log2e, j0 the block
  start) a fully visible block has p_ij = min(u1_i·w1_j, u2_i·w2_j) with
      u1_i = 2^(-x_i - σ(i + off - j0 - N/2)), w1_j = 2^(y_j + σ(j - j0 - N/2)), u2, w2 likewise with ±x, ∓y,
  Valid when σ >= 0 and `span` (the program's λ range in log2 units) keeps every factor finite and every
  dropped (underflowed) product negligible: 1.5·span + σ·N/2 <= 96, and span <= FAST_SPAN, which bounds how far
  the row maximum can fall below the reference: 2^-span must stay inside the range of P's dtype (fp16:
  the binding limit). The proofs of these bounds are in docs/math.md §Fast path range. The row sums come
  from the tensor cores (P times a block of ones): they are sums of the same rounded P that multiplies V.

- General (any finite λ, any temperature): an explicit exponential per score with an online maximum
  and rescaling, as in FlashAttention-2, the mask applied only on blocks that need it. A zero product on
  the tensor cores gives the score tile the accumulator's register layout (see _explicit_tile).

Layouts: λq (B, H, Tq) fp32, λk (B, Hkv, Tk) fp32, V (B, Hkv, Tk, Dv) fp32/fp16/bf16, any strides;
temperature (H,) fp32; slopes (B, H) fp32 (read only when HAS_ALIBI); kmin/kmax (B, Hkv) fp32 = min/max of
λk over keys; O (B, H, Tq, Dv) in V's dtype, any strides; LSE (B, H, Tq) fp32 contiguous.

Packed sequences (VARLEN, docs/math.md §Packed sequences): the B sequences of a pack are one batch row,
λq (1, H, total_q), λk (1, Hkv, total_k), V (1, Hkv, total_k, Dv), O (1, H, total_q, Dv), LSE (1, H, total_q),
any strides, with int32 offsets CU_Q, CU_K (B + 1,): sequence b owns query rows CU_Q[b] .. CU_Q[b+1] and
keys CU_K[b] .. CU_K[b+1] (clamped into the rows, `grid.sequence_rows`). b indexes the sequences (slopes
and kmin/kmax have a row per sequence); the batch strides are not read. A program reads its sequence's
offsets and is then a dense program of a batch of one whose rows and keys start at those offsets, with Tq, Tk
its sequence's lengths: causality, the ALiBi distances and the key masks are per sequence, and no key of
another sequence is ever read unmasked.

Paged keys (PAGED, a VARLEN build; docs/math.md §The λ cache, In vLLM): λk and V live in a paged cache, λk
(N_PAGES, Hkv, PAGE_SIZE) fp32 and V (N_PAGES, Hkv, PAGE_SIZE, Dv), any strides (the launcher passes two views
of one (pages, Hkv, PAGE_SIZE, s + Dv) cache tensor); sequence b's key j is slot j % PAGE_SIZE of page
BLOCK_TABLE[b, j // PAGE_SIZE], for j < SEQ_LENS[b]. Queries are packed with CU_Q as above, bottom-right aligned
over the sequence's keys. Table entries are clamped into [0, N_PAGES) and the key counts into the table's
width: no input makes a program read outside the cache or the table. The factorised path's λk range of the
sequence comes from a pass over its λk in each program (_paged_key_range) instead of KMIN/KMAX.
"""
import triton
import triton.language as tl

from .grid import sequence_rows

# log2(e) and ln(2): logits are kept in the log2 domain for exp2
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# bound on the exponent magnitudes of the factorised path (log2 units): 1.5·span + σ·N/2 <= 96 keeps every
# factor within 2^±96 (fp32 spans 2^±126) and what underflow drops below 2^-30 of a row's mass
# (docs/math.md §Fast path range)
_FACTOR_LIMIT = tl.constexpr(96.0)


@triton.jit
def _wide(x, WIDE: tl.constexpr):
    """x as a 64-bit integer when WIDE (the launcher found an offset that passes 2^31 elements), else as
    it is: 32-bit offsets hold fewer registers, and the main loops run at the register limit."""
    if WIDE:
        y = tl.cast(x, tl.int64)
    else:
        y = x
    return y


@triton.jit
def _page_slots(pages, offs_n, Tk, PAGE_SIZE: tl.constexpr, MASK_KEYS: tl.constexpr):
    """(page, slot) of keys offs_n of a sequence in a paged cache: `pages` = (its block-table row, the cache's page
    count, the page strides of λk and V); page 64-bit. MASK_KEYS: keys at or past Tk read no table entry (the
    row may end there). Entries outside [0, pages) are clamped into it: no table, however wrong, reads outside
    the cache."""
    table_row, n_pages = pages[0], pages[1]
    if MASK_KEYS:
        page = tl.load(table_row + offs_n // PAGE_SIZE, mask=offs_n < Tk, other=0)
    else:
        page = tl.load(table_row + offs_n // PAGE_SIZE)
    page = tl.minimum(tl.maximum(page, 0), n_pages - 1)
    return tl.cast(page, tl.int64), offs_n % PAGE_SIZE


@triton.jit
def _key_ptrs(LK_bh, V_bh, k0, pages, offs_n, j0, offs_d, stride_lk_t, stride_v_t, stride_v_d, Tk,
              WIDE: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, MASK_KEYS: tl.constexpr):
    """Pointers to λk and V of keys offs_n (the block starting at j0) of a head whose key 0 is row k0 of LK_bh
    and V_bh (0, or a packed sequence's start). WIDE: a 64-bit block base plus 32-bit offsets inside the block
    (j·stride_t passes 2^31 elements); else 32-bit offsets from the head. PAGED: key j at slot j % PAGE_SIZE
    of page table_row[j // PAGE_SIZE] (`pages`, see _page_slots), the page offset 64-bit (a cache passes 2^31
    elements); MASK_KEYS: the block may run past Tk."""
    # k0 joins the key index rather than the base pointers: the bases stay uniform over the warp (derived
    # from program ids only: uniform registers) and k0 folds into the per-thread offsets that the loop
    # advances anyway, so a pack costs the factorised loop no register (it runs at the register limit)
    if PAGED:
        page, slot = _page_slots(pages, offs_n, Tk, PAGE_SIZE=PAGE_SIZE, MASK_KEYS=MASK_KEYS)
        lk_ptrs = LK_bh + (page * pages[2] + slot * stride_lk_t)
        v_ptrs = V_bh + (page * pages[3] + slot * stride_v_t)[:, None] + offs_d[None, :] * stride_v_d
    elif WIDE:
        rows = offs_n - j0
        lk_ptrs = (LK_bh + tl.cast(k0 + j0, tl.int64) * stride_lk_t) + rows * stride_lk_t
        v_ptrs = ((V_bh + tl.cast(k0 + j0, tl.int64) * stride_v_t) + rows[:, None] * stride_v_t
                  + offs_d[None, :] * stride_v_d)
    else:
        lk_ptrs = LK_bh + (k0 + offs_n) * stride_lk_t
        v_ptrs = V_bh + (k0 + offs_n)[:, None] * stride_v_t + offs_d[None, :] * stride_v_d
    return lk_ptrs, v_ptrs


@triton.jit
def _load_keys(LK_bh, V_bh, k0, pages, offs_n, j0, offs_d, stride_lk_t, stride_v_t, stride_v_d, Tk, Dv,
               # True where the block may run past Tk (mask the key loads)
               MASK_KEYS: tl.constexpr,
               # True where BLOCK_D > Dv (mask the feature columns of V)
               MASK_D: tl.constexpr,
               # 64-bit offsets (see _wide)
               WIDE: tl.constexpr,
               # keys through a block table (see _key_ptrs)
               PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """λk of the block (fp32) and its V tile (BLOCK_N, BLOCK_D) in V's dtype; masked entries are 0."""
    lk_ptrs, v_ptrs = _key_ptrs(LK_bh, V_bh, k0, pages, offs_n, j0, offs_d, stride_lk_t, stride_v_t, stride_v_d, Tk,
                                WIDE=WIDE, PAGED=PAGED, PAGE_SIZE=PAGE_SIZE, MASK_KEYS=MASK_KEYS)
    if MASK_KEYS:
        key_ok = offs_n < Tk
        lam_k = tl.load(lk_ptrs, mask=key_ok, other=0.0)
        v_mask = key_ok[:, None]
        if MASK_D:
            v_mask = v_mask & (offs_d[None, :] < Dv)
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
    else:
        lam_k = tl.load(lk_ptrs)
        if MASK_D:
            v = tl.load(v_ptrs, mask=offs_d[None, :] < Dv, other=0.0)
        else:
            v = tl.load(v_ptrs)
    return lam_k, v


@triton.jit
def _factorised_tile(acc, acc_l, x_row, r_row, i_rel, j0, ones, LK_bh, V_bh, k0, pages, offs_d, stride_lk_t,
                     stride_v_t, stride_v_d, Tk, Dv, centre, inv_t2, slope2,
                     # ALiBi term present (slope2 is read)
                     HAS_ALIBI: tl.constexpr,
                     BLOCK_N: tl.constexpr,
                     MASK_D: tl.constexpr,
                     # dtype of the per-score products (fp16 for fp16 V: packed half2 arithmetic; else fp32)
                     FACTOR_DTYPE: tl.constexpr,
                     # input_precision of the P·V dots (the launcher passes "tf32x3" for fp32 V; ignored for fp16/bf16)
                     DOT_PRECISION: tl.constexpr,
                     # 64-bit offsets (see _wide)
                     WIDE: tl.constexpr,
                     # keys through a block table (see _key_ptrs)
                     PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """One fully visible key block of the factorised path: acc += M V, acc_l += M 1.

    Without ALiBi the row factor 2^-x_i is the same for every key block, so it is left out of M (it
    cancels in O = acc / rowsum and is added back to the logsumexp): M_ij = P_ij·2^x_i =
    min(2^y_j, r_i·2^-y_j) with r_i = 2^(2x_i), one multiply and one min per score. With ALiBi the row
    factors change with the block: M = P = min(u1_i·w1_j, u2_i·w2_j)."""
    offs_n = j0 + tl.arange(0, BLOCK_N)
    lam_k, v = _load_keys(LK_bh, V_bh, k0, pages, offs_n, j0, offs_d, stride_lk_t, stride_v_t, stride_v_d, Tk, Dv,
                          MASK_KEYS=False, MASK_D=MASK_D, WIDE=WIDE, PAGED=PAGED,
                          PAGE_SIZE=PAGE_SIZE)
    y = (lam_k - centre) * inv_t2
    if HAS_ALIBI:
        col_alibi = slope2 * (tl.arange(0, BLOCK_N) - BLOCK_N // 2).to(tl.float32)
        # i + off - j0 - N/2 for each row: >= N/2 - 1 on a fully visible block
        row_alibi = slope2 * (i_rel - j0 - BLOCK_N // 2).to(tl.float32)
        u1 = tl.exp2(-x_row - row_alibi)
        u2 = tl.exp2(x_row - row_alibi)
        w1 = tl.exp2(y + col_alibi)
        w2 = tl.exp2(col_alibi - y)
        p = tl.minimum(u1[:, None] * w1[None, :], u2[:, None] * w2[None, :])
    else:
        w1 = tl.exp2(y).to(FACTOR_DTYPE)
        w2 = tl.exp2(-y).to(FACTOR_DTYPE)
        p = tl.minimum(w1[None, :], r_row[:, None] * w2[None, :])
    p = p.to(v.dtype)
    acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
    acc_l = tl.dot(p, ones, acc_l, input_precision=DOT_PRECISION)
    return acc, acc_l


@triton.jit
def _explicit_tile(acc, row_sum, row_ref, lam_q, i_rel, j0, ones, LK_bh, V_bh, k0, pages, offs_d, stride_lk_t,
                   stride_v_t, stride_v_d, Tk, Dv, inv_t2, slope2,
                   IS_CAUSAL: tl.constexpr,
                   HAS_ALIBI: tl.constexpr,
                   # keep a running row maximum and rescale (general path); else row_ref is fixed
                   ONLINE_MAX: tl.constexpr,
                   # apply the causal / key-range mask (blocks on the diagonal or past Tk)
                   MASK: tl.constexpr,
                   BLOCK_N: tl.constexpr,
                   MASK_D: tl.constexpr,
                   DOT_PRECISION: tl.constexpr,
                   # 64-bit offsets (see _wide)
                   WIDE: tl.constexpr,
                   # keys through a block table (see _key_ptrs)
                   PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """One key block with an exponential per score; row_ref and the logits in log2 units.

    ONLINE_MAX: row_sum is a (BLOCK_M,) vector; returns (acc, row_sum, row_ref) with acc += P V,
    row_sum += Σ_j P, both rescaled when the running maximum moves. Fixed reference: row_sum is the
    (BLOCK_M, 16) accumulator of P·1 and P = 2^(s - row_ref)."""
    offs_n = j0 + tl.arange(0, BLOCK_N)
    if MASK:
        # keys past Tk get λk = +inf: their logit is -inf whatever λq (finite) is, so no per-score key mask
        key_ok = offs_n < Tk
        lk_ptrs, v_ptrs = _key_ptrs(LK_bh, V_bh, k0, pages, offs_n, j0, offs_d, stride_lk_t, stride_v_t, stride_v_d, Tk,
                                    WIDE=WIDE, PAGED=PAGED, PAGE_SIZE=PAGE_SIZE, MASK_KEYS=True)
        lam_k = tl.load(lk_ptrs, mask=key_ok, other=float("inf"))
        v_mask = key_ok[:, None]
        if MASK_D:
            v_mask = v_mask & (offs_d[None, :] < Dv)
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
    else:
        lam_k, v = _load_keys(LK_bh, V_bh, k0, pages, offs_n, j0, offs_d, stride_lk_t, stride_v_t, stride_v_d, Tk, Dv,
                              MASK_KEYS=False, MASK_D=MASK_D, WIDE=WIDE, PAGED=PAGED, PAGE_SIZE=PAGE_SIZE)
    BLOCK_M: tl.constexpr = acc.shape[0]
    # a zero product on the tensor cores gives the score tile the accumulator's register layout, so the row
    # reductions are in-thread plus two shuffles and P feeds the next product without a trip through
    # shared memory (Triton would otherwise pick a row-per-warp layout for the broadcasts below)
    s = tl.dot(tl.zeros([BLOCK_M, 16], dtype=tl.float16), tl.zeros([16, BLOCK_N], dtype=tl.float16))
    # the difference first: exact for close λ, then one rounding (λ may be large, e.g. key positions)
    s = s - tl.abs(lam_q[:, None] - lam_k[None, :]) * inv_t2
    if HAS_ALIBI:
        # |i + Tk - Tq - j|
        s = s - slope2 * tl.abs(i_rel.to(tl.float32)[:, None] - offs_n.to(tl.float32)[None, :])
    if MASK:
        if IS_CAUSAL:
            s = tl.where(offs_n[None, :] <= i_rel[:, None], s, float("-inf"))
    if ONLINE_MAX:
        m_new = tl.maximum(row_ref, tl.max(s, 1))
        # a row with nothing visible yet keeps a finite reference (no -inf - -inf)
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(row_ref - m_new)
        p = tl.exp2(s - m_new[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        row_ref = m_new
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    else:
        # fixed reference: no reduction at all, the row sums come from the tensor cores (acc_l, passed as
        # row_sum), so the tile stays in the accumulator's register layout
        p = tl.exp2(s - row_ref[:, None]).to(v.dtype)
        acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
        row_sum = tl.dot(p, ones, row_sum, input_precision=DOT_PRECISION)
    return acc, row_sum, row_ref


@triton.jit
def _factorised_path(acc, lam_q, row_ok, i_rel, lo_end, hi, lam_lo, lam_hi, LK_bh, V_bh, k0, pages, offs_d, stride_lk_t,
                     stride_v_t, stride_v_d, Tk, Dv, inv_t2, slope2,
                     IS_CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, MASK_D: tl.constexpr, FACTOR_DTYPE: tl.constexpr,
                     DOT_PRECISION: tl.constexpr,
                     # 64-bit offsets (see _wide)
                     WIDE: tl.constexpr,
                     # keys through a block table (see _key_ptrs)
                     PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """The factorised path over keys [0, hi): returns (acc, row_sum, row_ref) with O = acc / row_sum and
    log2-sum-exp = row_ref + log2(row_sum)."""
    centre = 0.5 * (lam_lo + lam_hi)
    # rows past Tq get x = 0 so that their (unstored) factors stay finite
    x_row = tl.where(row_ok, (lam_q - centre) * inv_t2, 0.0)
    # fixed reference (log2): 0, or with ALiBi the term of the row's nearest key (non-causal, Tq > Tk)
    if HAS_ALIBI:
        row_ref = -slope2 * tl.maximum(-i_rel, 0).to(tl.float32)
        r_row = x_row  # unused
    else:
        # the accumulators hold P·2^x_i (see _factorised_tile): shift the reference by x_i
        row_ref = -x_row
        r_row = tl.exp2(2.0 * x_row).to(FACTOR_DTYPE)
    ones = tl.full([BLOCK_N, 16], 1.0, dtype=V_bh.dtype.element_ty)
    acc_l = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    for j0 in tl.range(0, lo_end, BLOCK_N):
        acc, acc_l = _factorised_tile(acc, acc_l, x_row, r_row, i_rel, j0, ones, LK_bh, V_bh, k0, pages, offs_d,
                                      stride_lk_t, stride_v_t, stride_v_d, Tk, Dv, centre, inv_t2, slope2,
                                      HAS_ALIBI=HAS_ALIBI, BLOCK_N=BLOCK_N, MASK_D=MASK_D, FACTOR_DTYPE=FACTOR_DTYPE,
                                      DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, PAGED=PAGED, PAGE_SIZE=PAGE_SIZE)
    # blocks on the diagonal or past Tk: an exponential per score (few blocks per row; with ALiBi the sign of
    # i + off - j changes inside them). Masking the factorised products instead (possible without ALiBi)
    # cost more registers than this tile and spilled at BLOCK_M = 128.
    if IS_CAUSAL:
        # at most BLOCK_M / BLOCK_N + 1 such blocks: peeled (unrolled) rather than looped
        for k in tl.static_range(BLOCK_M // BLOCK_N + 1):
            j0 = lo_end + k * BLOCK_N
            if j0 < hi:
                acc, acc_l, row_ref = _explicit_tile(acc, acc_l, row_ref, lam_q, i_rel, j0, ones, LK_bh, V_bh, k0,
                                                     pages, offs_d, stride_lk_t, stride_v_t, stride_v_d, Tk, Dv, inv_t2,
                                                     slope2, IS_CAUSAL=IS_CAUSAL, HAS_ALIBI=HAS_ALIBI,
                                                     ONLINE_MAX=False, MASK=True, BLOCK_N=BLOCK_N, MASK_D=MASK_D,
                                                     DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, PAGED=PAGED,
                                                     PAGE_SIZE=PAGE_SIZE)
    else:
        for j0 in tl.range(lo_end, hi, BLOCK_N):
            acc, acc_l, row_ref = _explicit_tile(acc, acc_l, row_ref, lam_q, i_rel, j0, ones, LK_bh, V_bh, k0, pages,
                                                 offs_d, stride_lk_t, stride_v_t, stride_v_d, Tk, Dv, inv_t2, slope2,
                                                 IS_CAUSAL=IS_CAUSAL, HAS_ALIBI=HAS_ALIBI, ONLINE_MAX=False,
                                                 MASK=True, BLOCK_N=BLOCK_N, MASK_D=MASK_D,
                                                 DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, PAGED=PAGED,
                                                 PAGE_SIZE=PAGE_SIZE)
    row_sum = tl.max(acc_l, 1)
    return acc, row_sum, row_ref


@triton.jit
def _general_path(acc, lam_q, i_rel, lo_end, hi, LK_bh, V_bh, k0, pages, offs_d, stride_lk_t, stride_v_t, stride_v_d,
                  Tk, Dv, inv_t2, slope2,
                  IS_CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  # 64-bit offsets (see _wide)
                  WIDE: tl.constexpr,
                  # keys through a block table (see _key_ptrs)
                  PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Exponential per score with an online maximum (any finite λ, any temperature); same returns."""
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_ref = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for j0 in tl.range(0, lo_end, BLOCK_N):
        acc, row_sum, row_ref = _explicit_tile(acc, row_sum, row_ref, lam_q, i_rel, j0, 0, LK_bh, V_bh, k0, pages,
                                               offs_d, stride_lk_t, stride_v_t, stride_v_d, Tk, Dv, inv_t2,
                                               slope2, IS_CAUSAL=IS_CAUSAL, HAS_ALIBI=HAS_ALIBI, ONLINE_MAX=True,
                                               MASK=False, BLOCK_N=BLOCK_N, MASK_D=MASK_D,
                                               DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, PAGED=PAGED,
                                               PAGE_SIZE=PAGE_SIZE)
    for j0 in tl.range(lo_end, hi, BLOCK_N):
        acc, row_sum, row_ref = _explicit_tile(acc, row_sum, row_ref, lam_q, i_rel, j0, 0, LK_bh, V_bh, k0, pages,
                                               offs_d, stride_lk_t, stride_v_t, stride_v_d, Tk, Dv, inv_t2,
                                               slope2, IS_CAUSAL=IS_CAUSAL, HAS_ALIBI=HAS_ALIBI, ONLINE_MAX=True,
                                               MASK=True, BLOCK_N=BLOCK_N, MASK_D=MASK_D,
                                               DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, PAGED=PAGED,
                                               PAGE_SIZE=PAGE_SIZE)

    return acc, row_sum, row_ref


@triton.jit
def _store_outputs(acc, row_sum, row_ref, OUT, LSE, b, h, pid_bh, i0, offs_m, offs_d, row_ok, write_lse, stride_o_b,
                   stride_o_h, stride_o_t, stride_o_d, stride_lse_h, q_start, Tq, Dv,
                   WIDE: tl.constexpr, VARLEN: tl.constexpr):
    """O = acc / row_sum in OUT's dtype; LSE = (row_ref + log2 row_sum)·ln 2 (where write_lse: the first
    column block). VARLEN: rows offs_m of a sequence that starts at row q_start of the pack."""
    # rows past Tq may see no key at all: keep their (unstored) values finite
    seen = row_sum > 0
    row_sum = tl.where(seen, row_sum, 1.0)
    out = acc / row_sum[:, None]
    lse = (row_ref + tl.log2(row_sum)) * _LN2
    if VARLEN:
        # a stored row that sees no key (trusted offsets: a sequence without keys, causal rows in front of the
        # first key, the rows past the last sequence): O = 0 and LSE = +inf, as FlashAttention's empty rows
        # (the backward's P = exp(s - lse) is then 0)
        lse = tl.where(seen, lse, float("inf"))
    if write_lse:
        if VARLEN:
            # the pack's LSE (1, H, total_q): the heads are total_q rows apart, not Tq (the sequence's length)
            lse_ptrs = LSE + (_wide(h, WIDE=WIDE) * stride_lse_h + _wide(q_start, WIDE=WIDE)) + offs_m
        else:
            # contiguous (B, H, Tq): the row base is (b·H + h)·Tq
            lse_ptrs = LSE + _wide(pid_bh, WIDE=WIDE) * Tq + offs_m
        tl.store(lse_ptrs, lse, mask=row_ok)
    if VARLEN:
        o_ptrs = ((OUT + (_wide(h, WIDE=WIDE) * stride_o_h + _wide(q_start + i0, WIDE=WIDE) * stride_o_t))
                  + (offs_m - i0)[:, None] * stride_o_t + offs_d[None, :] * stride_o_d)
    elif WIDE:
        o_ptrs = ((OUT + tl.cast(b, tl.int64) * stride_o_b + tl.cast(h, tl.int64) * stride_o_h
                   + tl.cast(i0, tl.int64) * stride_o_t) + (offs_m - i0)[:, None] * stride_o_t
                  + offs_d[None, :] * stride_o_d)
    else:
        o_ptrs = OUT + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_t + offs_d[None, :] * stride_o_d
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < Dv))


@triton.jit
def _paged_key_range(LK_bh, pages, stride_lk_t, Tk, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """(min, max) of λk over a sequence's Tk keys in a paged cache, NaN if one is: the factorised path's condition
    (a pack's launcher takes it from torch, varlen.key_range, which a block table would need a gather for). One
    pass over λk, 4 bytes per key against V's Dv values."""
    lo = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    hi = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    for j0 in range(0, Tk, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)
        page, slot = _page_slots(pages, offs_n, Tk, PAGE_SIZE=PAGE_SIZE, MASK_KEYS=True)
        key_ok = offs_n < Tk
        lam_k = tl.load(LK_bh + (page * pages[2] + slot * stride_lk_t), mask=key_ok, other=0.0)
        lo = tl.minimum(lo, tl.where(key_ok, lam_k, float("inf")), propagate_nan=tl.PropagateNan.ALL)
        hi = tl.maximum(hi, tl.where(key_ok, lam_k, float("-inf")), propagate_nan=tl.PropagateNan.ALL)
    return tl.min(lo, 0), tl.max(hi, 0)


@triton.jit
def _query_block(LQ, LK, V, TEMP, SLOPES, OUT, LSE, KMIN, KMAX, b, n_seqs, h, hk, pid_bh, i0, q_start, k_start, pages,
                 Tq, Tk, Dv, stride_lq_b, stride_lq_h, stride_lq_t, stride_lk_b, stride_lk_h, stride_lk_t, stride_v_b,
                 stride_v_h, stride_v_t, stride_v_d, stride_o_b, stride_o_h, stride_o_t, stride_o_d, stride_lse_h, H,
                 GROUP,
                 IS_CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, MASK_D: tl.constexpr, FAST_SPAN: tl.constexpr, FACTOR_DTYPE: tl.constexpr,
                 PATH: tl.constexpr, DOT_PRECISION: tl.constexpr, N_DCHUNK: tl.constexpr, WIDE: tl.constexpr,
                 VARLEN: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Query rows i0 .. i0 + BLOCK_M of (b, h) (the kernel's constexprs; Tq, Tk the sequence's lengths, its rows
    and keys from q_start, k_start of the pack when VARLEN; PAGED: its keys through `pages`, see _page_slots): O
    and LSE of the rows this launch's PATH takes."""
    off = Tk - Tq
    offs_m = i0 + tl.arange(0, BLOCK_M)
    # Dv > BLOCK_D is split over grid axis 2: each program recomputes P (cheap) for its BLOCK_D columns
    offs_d = (tl.program_id(2) % N_DCHUNK) * BLOCK_D + tl.arange(0, BLOCK_D)
    write_lse = tl.program_id(2) % N_DCHUNK == 0
    row_ok = offs_m < Tq
    # i + Tk - Tq: a key j is causally visible to row i when j <= i_rel
    i_rel = offs_m + off

    if VARLEN:
        # the pack is batch row 0 (b indexes the sequences), and the sequence's start joins the head's
        # offset in one sum: one base per tensor, as in the dense build. _wide: start·stride_t passes 2^31
        # elements exactly where the pack's offsets do (the launcher's WIDE).
        lq_ptrs = (LQ + (_wide(h, WIDE=WIDE) * stride_lq_h + _wide(q_start + i0, WIDE=WIDE) * stride_lq_t)
                   + tl.arange(0, BLOCK_M) * stride_lq_t)
    elif WIDE:
        lq_ptrs = (LQ + tl.cast(b, tl.int64) * stride_lq_b + tl.cast(h, tl.int64) * stride_lq_h
                   + tl.cast(i0, tl.int64) * stride_lq_t) + tl.arange(0, BLOCK_M) * stride_lq_t
    else:
        lq_ptrs = LQ + b * stride_lq_b + h * stride_lq_h + offs_m * stride_lq_t
    lam_q = tl.load(lq_ptrs, mask=row_ok, other=0.0)
    inv_t2 = _LOG2E / tl.load(TEMP + h)
    if HAS_ALIBI:
        if VARLEN:
            # no slope row for b = B (the rows past the last sequence)
            slope2 = tl.load(SLOPES + b * H + h, mask=b < n_seqs, other=0.0) * _LOG2E
        else:
            slope2 = tl.load(SLOPES + b * H + h) * _LOG2E
    else:
        slope2 = 0.0
    if VARLEN:
        # the head's keys start at row k_start of the pack: the tiles add it to the key index (_key_ptrs)
        LK_bh = LK + _wide(hk, WIDE=WIDE) * stride_lk_h
        V_bh = V + _wide(hk, WIDE=WIDE) * stride_v_h
    else:
        LK_bh = LK + _wide(b, WIDE=WIDE) * stride_lk_b + _wide(hk, WIDE=WIDE) * stride_lk_h
        V_bh = V + _wide(b, WIDE=WIDE) * stride_v_b + _wide(hk, WIDE=WIDE) * stride_v_h

    # key ranges: [0, lo_end) fully visible full blocks; [lo_end, hi) blocks that need a mask
    last_row = tl.minimum(i0 + BLOCK_M, Tq) - 1
    full_end = (Tk // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        lo_end = tl.minimum((tl.maximum(i0 + off + 1, 0) // BLOCK_N) * BLOCK_N, full_end)
        hi = tl.minimum(Tk, last_row + off + 1)
    else:
        if HAS_ALIBI:
            # |i + off - j| factorises only left of the diagonal: the rest goes through the explicit tile
            lo_end = tl.minimum((tl.maximum(i0 + off + 1, 0) // BLOCK_N) * BLOCK_N, full_end)
        else:
            lo_end = full_end
        hi = Tk
    if VARLEN:
        # the bound of the masked key loads: keys at or past hi are invisible to every stored row of this
        # block (causal: hi is past its last visible key; otherwise hi = Tk), so hi serves as well as Tk and
        # the sequence's Tk need not stay in a register across the main loop (the dense build reads its Tk
        # argument instead)
        key_end = hi
    else:
        key_end = Tk

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # the factorised path's condition: λ span of these rows and all keys, in log2 units
    q_lo = tl.min(tl.where(row_ok, lam_q, float("inf")), 0)
    q_hi = tl.max(tl.where(row_ok, lam_q, float("-inf")), 0)
    if PAGED:
        k_lo, k_hi = _paged_key_range(LK_bh, pages, stride_lk_t, Tk, BLOCK_N=BLOCK_N, PAGE_SIZE=PAGE_SIZE)
    else:
        k_lo = tl.load(KMIN + b * (H // GROUP) + hk)
        k_hi = tl.load(KMAX + b * (H // GROUP) + hk)
    lam_lo = tl.minimum(q_lo, k_lo)
    lam_hi = tl.maximum(q_hi, k_hi)
    span = (lam_hi - lam_lo) * inv_t2
    # a negative slope rewards distance: the row maximum is then far from the fixed reference (and the
    # row factors grow without bound with i - j0), so only slopes >= 0 take the factorised path
    # (docs/math.md §Fast path range)
    fast = (span <= FAST_SPAN) & (1.5 * span + slope2 * (BLOCK_N // 2) <= _FACTOR_LIMIT) & (slope2 >= 0.0)

    # PATH 1 writes the programs where the factorised path is exact, PATH 2 the others (PATH 3: all)
    if PATH == 1:
        if fast:
            acc, row_sum, row_ref = _factorised_path(
                acc, lam_q, row_ok, i_rel, lo_end, hi, lam_lo, lam_hi, LK_bh, V_bh, k_start, pages, offs_d,
                stride_lk_t, stride_v_t, stride_v_d, key_end, Dv, inv_t2, slope2, IS_CAUSAL=IS_CAUSAL,
                HAS_ALIBI=HAS_ALIBI, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASK_D=MASK_D,
                FACTOR_DTYPE=FACTOR_DTYPE, DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, PAGED=PAGED, PAGE_SIZE=PAGE_SIZE)
            _store_outputs(acc, row_sum, row_ref, OUT, LSE, b, h, pid_bh, i0, offs_m, offs_d, row_ok, write_lse,
                           stride_o_b, stride_o_h, stride_o_t, stride_o_d, stride_lse_h, q_start, Tq,
                           Dv, WIDE=WIDE, VARLEN=VARLEN)
    else:
        if (not fast) or (PATH == 3):
            acc, row_sum, row_ref = _general_path(
                acc, lam_q, i_rel, lo_end, hi, LK_bh, V_bh, k_start, pages, offs_d, stride_lk_t, stride_v_t, stride_v_d,
                key_end, Dv, inv_t2, slope2, IS_CAUSAL=IS_CAUSAL, HAS_ALIBI=HAS_ALIBI, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                MASK_D=MASK_D, DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, PAGED=PAGED, PAGE_SIZE=PAGE_SIZE)
            _store_outputs(acc, row_sum, row_ref, OUT, LSE, b, h, pid_bh, i0, offs_m, offs_d, row_ok, write_lse,
                           stride_o_b, stride_o_h, stride_o_t, stride_o_d, stride_lse_h, q_start, Tq,
                           Dv, WIDE=WIDE, VARLEN=VARLEN)


@triton.jit
def taumode_attention_fwd_kernel(
    LQ, LK, V, TEMP, SLOPES, KMIN, KMAX, OUT, LSE,
    stride_lq_b, stride_lq_h, stride_lq_t,
    stride_lk_b, stride_lk_h, stride_lk_t,
    stride_v_b, stride_v_h, stride_v_t, stride_v_d,
    stride_o_b, stride_o_h, stride_o_t, stride_o_d,
    # VARLEN: B is the number of sequences and Tq, Tk are unused (each program reads its sequence's lengths)
    BH, H, GROUP, Tq, Tk, Dv,
    # read only when VARLEN: int32 (B + 1,) sequence offsets into the query and key rows, and LSE's head
    # stride (the dense LSE is contiguous, its rows (b·H + h)·Tq). Last, so that the dense build's other
    # parameters keep their places (and its code its constant loads).
    CU_Q, CU_K, stride_lse_h,
    # read only by the OVERFLOW launch: the query rows per sequence that the other launches cover (their grid)
    Q_ROWS,
    # read only when PAGED: the block table (B, width) int32 (row stride stride_bt), the sequences' key counts
    # (B,) int32 and the cache's page count. Last, as CU_Q above; a build without pages gets None constants.
    BLOCK_TABLE, SEQ_LENS, stride_bt, N_PAGES,
    # bottom-right causal mask j <= i + Tk - Tq
    IS_CAUSAL: tl.constexpr,
    # ALiBi slopes given (SLOPES is read)
    HAS_ALIBI: tl.constexpr,
    # query rows per program
    BLOCK_M: tl.constexpr,
    # keys per loop iteration
    BLOCK_N: tl.constexpr,
    # columns of V and O per program: Dv padded to a power of two (>= 16), at most 128 (larger Dv is split
    # over grid axis 2, N_DCHUNK)
    BLOCK_D: tl.constexpr,
    # Dv is not a multiple of BLOCK_D: mask V's and O's feature columns
    MASK_D: tl.constexpr,
    # largest λ span (log2 units, (max - min)·log2e/T) the factorised path accepts: bounds how far the row
    # maximum can fall below the fixed reference 0, so it depends on P's dtype range (0 disables the path)
    FAST_SPAN: tl.constexpr,
    # dtype of the factorised path's per-score products: fp16 (packed half2) for fp16 V, else fp32
    FACTOR_DTYPE: tl.constexpr,
    # which programs this launch writes: 1 those whose rows take the factorised path (exact there), 2 the
    # others (general path), 3 all of them with the general path. The launcher runs 1 then 2: each path is
    # its own kernel, so neither pays the other's registers, and the choice needs no host sync.
    PATH: tl.constexpr,
    # input_precision of tl.dot: the launcher passes "tf32x3" for fp32 V (tf32 alone misses 1e-5; "ieee" would
    # be exact but runs on the FMA units); ignored for fp16/bf16
    DOT_PRECISION: tl.constexpr,
    # column blocks of V per head: cdiv(Dv, BLOCK_D) (they share grid axis 2 with the high part of b·h)
    N_DCHUNK: tl.constexpr,
    # some offset (b·stride_b, (b·H + h)·Tq, j·stride_t, ...) may pass 2^31 elements: form them in 64 bits
    WIDE: tl.constexpr,
    # packed variable-length sequences (CU_Q, CU_K; see the module docstring): False compiles the dense kernel
    VARLEN: tl.constexpr,
    # VARLEN: the launch of one program per (sequence, head) that covers the query rows past Q_ROWS (a
    # max_seqlen_q smaller than the longest sequence), on the general path (PATH 3)
    OVERFLOW: tl.constexpr,
    # VARLEN with the keys in a paged cache (see the module docstring): key j of sequence b at slot
    # j % PAGE_SIZE of page BLOCK_TABLE[b, j // PAGE_SIZE]; CU_K is not read
    PAGED: tl.constexpr,
    # keys per page (PAGED)
    PAGE_SIZE: tl.constexpr,
):
    """Writes OUT (B, H, Tq, Dv) in V's dtype and LSE (B, H, Tq) fp32 (natural-log logsumexp of the logits).

    Grid: (cdiv(Tq, BLOCK_M), min(B·H, 65535), cdiv(B·H, 65535)·N_DCHUNK): b·h = axis-1 index + 65535 ×
    (axis-2 index // N_DCHUNK), so any B·H launches (each axis but 0 takes at most 65535 programs); programs
    past B·H exit. VARLEN: B·H counts B + 1 sequences (the last: the rows past the pack's last offset, written
    as rows that see no key); axis 0 covers Q_BLOCKS = cdiv(max_seqlen_q, BLOCK_M) blocks, and programs whose
    block starts at or past their sequence's Tq exit (no padding to max_q is stored). The OVERFLOW launch
    (axis 0 of size 1) covers each sequence's rows from Q_ROWS = Q_BLOCKS·BLOCK_M on, so max_seqlen_q is only
    a hint."""
    # longest query blocks first when causal (their key ranges are the longest)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1) + tl.num_programs(1) * (tl.program_id(2) // N_DCHUNK)
    if pid_bh >= BH:
        return
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    if VARLEN:
        # sequence b as a batch of one (docs/math.md §Packed sequences): its rows and keys start at
        # q_start, k_start of the pack; Tq, Tk become its lengths, so everything below (masks, key ranges,
        # i + Tk - Tq, the factorised path's bounds) is per sequence. The offsets are clamped into the pack's
        # rows (Tq, Tk: its totals), so no offset reaches outside the tensors. b = B (the launcher's extra
        # sequence) is the rows past the last sequence, with no keys: they are written as rows that see
        # nothing (O = 0, LSE = +inf).
        n_seqs = BH // H - 1
        q_start, Tq = sequence_rows(CU_Q, b, n_seqs, Tq)
        if PAGED:
            # sequence b's keys are 0 .. SEQ_LENS[b] - 1 of its table row, the count clamped into [0, Tk] (Tk:
            # the keys a row of the table holds), so no key reads past the row
            k_start = 0
            Tk = tl.minimum(tl.maximum(tl.load(SEQ_LENS + b, mask=b < n_seqs, other=0), 0), Tk)
            # the page strides are λk's and V's batch strides
            pages = (BLOCK_TABLE + b * stride_bt, N_PAGES, stride_lk_b, stride_v_b)
        else:
            k_start, Tk = sequence_rows(CU_K, b, n_seqs, Tk)
            Tk = tl.where(b < n_seqs, Tk, 0)
            pages = (CU_K, 0, 0, 0)  # unused
        if not OVERFLOW:
            if pid_m * BLOCK_M >= Tq:
                return
    else:
        n_seqs = BH
        q_start = 0
        k_start = 0
        pages = (CU_K, 0, 0, 0)  # unused
    if OVERFLOW:
        # max_seqlen_q (the grid of the other launches, Q_ROWS query rows) is only a hint: this launch's one
        # program per (sequence, head) steps over the rows past it, on the general path (exact for any input;
        # its own, smaller tiles); a loop around the main launches' paths spilled them
        for i0 in range(Q_ROWS, Tq, BLOCK_M):
            _query_block(LQ, LK, V, TEMP, SLOPES, OUT, LSE, KMIN, KMAX, b, n_seqs, h, hk, pid_bh, i0, q_start,
                         k_start, pages, Tq, Tk, Dv,
                         stride_lq_b, stride_lq_h, stride_lq_t, stride_lk_b, stride_lk_h, stride_lk_t, stride_v_b,
                         stride_v_h, stride_v_t, stride_v_d, stride_o_b, stride_o_h, stride_o_t, stride_o_d,
                         stride_lse_h, H, GROUP,
                         IS_CAUSAL=IS_CAUSAL, HAS_ALIBI=HAS_ALIBI, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                         MASK_D=MASK_D, FAST_SPAN=FAST_SPAN, FACTOR_DTYPE=FACTOR_DTYPE, PATH=3,
                         DOT_PRECISION=DOT_PRECISION, N_DCHUNK=N_DCHUNK, WIDE=WIDE, VARLEN=VARLEN, PAGED=PAGED,
                         PAGE_SIZE=PAGE_SIZE)
    else:
        _query_block(LQ, LK, V, TEMP, SLOPES, OUT, LSE, KMIN, KMAX, b, n_seqs, h, hk, pid_bh, pid_m * BLOCK_M,
                     q_start, k_start, pages, Tq, Tk, Dv,
                     stride_lq_b, stride_lq_h, stride_lq_t, stride_lk_b, stride_lk_h, stride_lk_t, stride_v_b,
                     stride_v_h, stride_v_t, stride_v_d, stride_o_b, stride_o_h, stride_o_t, stride_o_d,
                     stride_lse_h, H, GROUP,
                     IS_CAUSAL=IS_CAUSAL, HAS_ALIBI=HAS_ALIBI, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                     MASK_D=MASK_D, FAST_SPAN=FAST_SPAN, FACTOR_DTYPE=FACTOR_DTYPE, PATH=PATH,
                     DOT_PRECISION=DOT_PRECISION, N_DCHUNK=N_DCHUNK, WIDE=WIDE, VARLEN=VARLEN, PAGED=PAGED,
                         PAGE_SIZE=PAGE_SIZE)
