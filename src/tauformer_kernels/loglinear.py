"""Exact taumode attention in O(T log T): sorting, prefix sums and divide-and-conquer over time.

`backend="loglinear"` (docs/internal-contract.md). Pure PyTorch ops, device-agnostic. The mathematics,
and why it is exact, is docs/math.md §Sorted (loglinear) attention; the logits are those of
docs/math.md §Attention logits:

    s_ij = −|λq_i − λk_j| / T − m·|i' − j|,      i' = i + Tk − Tq

For a fixed query, the keys with λk ≤ λq contribute e^{(λk−λq)/T} and those above e^{(λq−λk)/T}: with the
keys sorted by λk, each query needs one prefix sum and one suffix sum of e^{±λk/T}·[v, 1] (the ones column
gives the softmax denominator), found by binary search. Causality is handled by divide-and-conquer over
time: dense attention inside leaf blocks of C tokens; at each level (blocks of S = C·2^l) the keys of every
left half are sorted, scanned, and every query of the right half looks up its split point. Each (query,
key) pair with j ≤ i' is counted exactly once: in the leaf, or at the one level where they part.
Non-causal attention without slopes is one global level; with slopes it is the causal part plus the
time-mirrored strictly-anti-causal part.

Stability. With 1/T up to 1e4 the factorisation e^{−λq/T}·e^{λk/T} overflows, so nothing here
exponentiates an absolute quantity: the scans (`prefix_scan.two_sided_sums`) keep every prefix sum
relative to its own reference key, the one with the largest partial logit among the keys summed, so
every exponent is ≤ 0. A query then multiplies by e^{φ_ref − φ_q} ≤ 1, and the leaf and the levels are
combined by a max-shifted running logsumexp. Where every logit lies in a bounded range, plain cumulative
sums replace the referenced scans (`_causal_dc_fast`, docs/math.md §Fast path range).

Backward: `attention_bwd_loglinear` is O(T log T) as well (see its docstring); it reuses the same scans
with first moments Σ e·(x_ref − x_r)·w for the temperature and slope gradients.
"""
from __future__ import annotations

import math

import torch

from . import prefix_scan, reference, varlen

# Leaf block (tokens) of the divide-and-conquer: dense C×C attention inside each leaf.
LEAF = 128
# Chunk of the blocked scans: dense G×G weights inside each chunk of sorted keys. Read at each call, so
# that a test can shrink it to run deep recursive scans on short sequences.
SCAN_CHUNK = prefix_scan.CHUNK
# Below this many queries (or where the D&C does not apply) the dense chunked reference is as fast.
DENSE_QUERIES = 64

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------
# One level: items sorted by a coordinate, lookups finding their split points
# ----------------------------------------------------------------------------------------------------

def _sides(xs, ys, cs, w, inv_t, slope, xq, yq, splits=("le", "gt"), moments=False):
    """Sums over sorted items on either side of each lookup, each relative to its own log-scale.

    xs (Z, S) item coordinates sorted ascending (λk of keys, or λq of queries in the transposed problem);
    ys (Z, S) item positions relative to the level's split point, or None; cs (Z, S) item log-offsets
    or None; w (Z, S, D) item weights; inv_t (Z, 1); slope (Z, 1) or None; xq (Z, M) lookup
    coordinates; yq (Z, M) or (M,) lookup positions relative to the split (or None).

    The logit of a lookup and an item is −|xq − x|·inv_t + slope·(y − yq) + c. For each requested split
    returns (scale (Z, M), a (Z, M, D), mx, my) with sum = e^{scale}·a over the items with
      "le": x ≤ xq,  "lt": x < xq,  "gt": x > xq
    (scale −inf where there are none). With `moments`: mx = Σ e^{logit − scale}·|xq − x|·w and
    my = Σ e^{logit − scale}·(yq − y)·w (else None).
    """
    s = xs.shape[1]
    scans = prefix_scan.two_sided_sums(xs, w, inv_t, pos=ys, slope=slope, offset=cs, moments=moments,
                                       chunk=SCAN_CHUNK)
    xs_c = xs.contiguous()
    xq_c = xq.contiguous()
    right = torch.searchsorted(xs_c, xq_c, right=True)
    left = torch.searchsorted(xs_c, xq_c, right=False) if "lt" in splits else None
    out = []
    for kind in splits:
        if kind == "gt":  # the s − right largest items: entry s − 1 − right of the descending scan
            scan, idx, empty, q_coord = scans[1], s - 1 - right, right == s, -xq
        else:  # the first `split` items: entry split − 1 of the ascending scan
            split = right if kind == "le" else left
            scan, idx, empty, q_coord = scans[0], split - 1, split == 0, xq
        out.append(_lookup(scan, idx.clamp_min(0), empty, q_coord, yq, inv_t, slope, moments))
    return out


def _lookup(scan: prefix_scan.PrefixSums, idx, empty, q_coord, yq, inv_t, slope, moments):
    """Entry idx (Z, M) of one side's scan for every lookup, as (scale, a, mx, my) of `_sides`.

    The entry's sum is relative to its reference; scale moves it to the lookup's logit, formed from the
    differences of the reference's coordinates and the lookup's (q_coord is the lookup's coordinate on
    that side: xq ascending, −xq descending). `empty` marks lookups with no item on that side."""
    z, m = idx.shape
    row_idx = idx[..., None].expand(z, m, scan.sums.shape[-1])
    ref_lam = scan.ref_lam.gather(1, idx)
    scale = (ref_lam - q_coord) * inv_t
    if slope is not None:
        ref_pos = scan.ref_pos.gather(1, idx)
        scale = scale + slope * (ref_pos - yq)
    if scan.ref_offset is not None:
        scale = scale + scan.ref_offset.gather(1, idx)
    sums = scan.sums.gather(1, row_idx)
    mx = my = None
    if moments:  # moments relative to the reference, moved to the lookup: |xq − x| = (q − ref) + (ref − x)
        mx = scan.lam_moment.gather(1, row_idx) + (q_coord - ref_lam)[..., None] * sums
        if slope is not None:
            my = scan.pos_moment.gather(1, row_idx) + (yq - ref_pos)[..., None] * sums
    return scale.masked_fill(empty, _NEG_INF), sums, mx, my


def _combine(m_run, acc, scale, vec):
    """acc·e^{m_run} += vec·e^{scale}, keeping acc relative to the running max (in place)."""
    new = torch.maximum(m_run, scale)
    safe = new.masked_fill(torch.isinf(new), 0.0)
    acc.mul_(torch.exp(m_run - safe)[..., None]).add_(vec * torch.exp(scale - safe)[..., None])
    m_run.copy_(new)


def _each_query_head(t, grp, item_dim):
    """t (B, Hkv, …), per kv head, repeated for the grp query heads of its group and flattened to
    (problems, items, …): items is dimension `item_dim` of t, problems all dimensions before it, G included."""
    if t is None:
        return None
    return t[:, :, None].expand(*t.shape[:2], grp, *t.shape[2:]).reshape(-1, *t.shape[item_dim:])


def _each_block(t, blocks):
    """A per-head scalar (B, Hkv, G, 1), or None, for each of a level's `blocks` blocks: (B·Hkv·G·blocks, 1)."""
    if t is None:
        return None
    return t[..., None].expand(*t.shape[:3], blocks, 1).reshape(-1, 1)


def _half(t, size, k):
    """Half k (0 left, 1 right) of every block of 2·size positions of a time axis (B, Hkv, G, N, …), as a
    view (B, Hkv, G, N / (2·size), size, …)."""
    return t.view(*t.shape[:3], -1, 2, size, *t.shape[4:])[:, :, :, :, k]


def _as_weights(scale, lse=None):
    """e^{scale} (e^{scale − lse} with lse) as a column that weighs rows (…, D)."""
    return torch.exp(scale if lse is None else scale - lse)[..., None]


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------

def _leaf_logits(lq_ax, lk, inv_t, slope, strict, leaf):
    """Dense logits inside each leaf block, (B, Hkv, G, N/C, C, C), plus Δλ = λq − λk and the distance."""
    b, hkv, grp, n = lq_ax.shape
    nb = n // leaf
    qb = lq_ax.view(b, hkv, grp, nb, leaf)
    kb = lk.view(b, hkv, 1, nb, leaf)
    diff = qb[..., :, None] - kb[..., None, :]
    s = diff.abs().mul_(-inv_t[..., None, None])
    ar = torch.arange(leaf, device=lq_ax.device)
    dist = (ar[:, None] - ar[None, :]).to(s.dtype)
    if slope is not None:
        s.sub_(slope[..., None, None] * dist)
    mask = dist < 0 if not strict else dist <= 0
    s.masked_fill_(mask, _NEG_INF)
    return s, diff, dist


def _leaf(lq_ax, lk, v1, inv_t, slope, strict, leaf):
    """Dense attention inside each leaf block: returns (m, acc) on the axis."""
    b, hkv, grp, n = lq_ax.shape
    nb = n // leaf
    s, _, _ = _leaf_logits(lq_ax, lk, inv_t, slope, strict, leaf)
    m = s.amax(-1)
    safe = m.masked_fill(torch.isinf(m), 0.0)
    p = torch.exp_(s.sub_(safe[..., None]))
    acc = p @ v1.view(b, hkv, 1, nb, leaf, -1)
    return m.reshape(b, hkv, grp, n), acc.reshape(b, hkv, grp, n, -1)


def _level_keys(lk, v1, size, slope):
    """The left halves of one level, sorted by λk: (ks, perm, w, yk) with yk = position − split."""
    b, hkv, n = lk.shape
    d = v1.shape[-1]
    p = n // (2 * size)
    ks, perm = lk.view(b, hkv, p, 2, size)[:, :, :, 0].sort(dim=-1)
    w = v1.view(b, hkv, p, 2, size, d)[:, :, :, 0].gather(-2, perm[..., None].expand(b, hkv, p, size, d))
    yk = None if slope is None else (perm - size).to(lk.dtype)
    return ks, perm, w, yk


def _causal_dc(lq_ax, lk, v1, inv_t, slope, strict, leaf):
    """Causal attention on a common time axis of N = leaf·2^L positions (keys and queries aligned).

    lq_ax (B, Hkv, G, N) the queries on the key axis; lk (B, Hkv, N); v1 (B, Hkv, N, D) with the ones
    column; query i sees keys j ≤ i (j < i when `strict`). Returns (m, acc) with
    acc = Σ_j e^{s_ij − m_i}·[v_j, 1].
    """
    b, hkv, grp, n = lq_ax.shape
    d = v1.shape[-1]
    m_run, acc = _leaf(lq_ax, lk, v1, inv_t, slope, strict, leaf)
    size = leaf
    while size < n:
        p = n // (2 * size)
        full = (b, hkv, grp, p, size)
        ks, _, w, yk = _level_keys(lk, v1, size, slope)
        yq = None if slope is None else torch.arange(size, device=lk.device, dtype=lk.dtype)
        res = _sides(_each_query_head(ks, grp, 3), _each_query_head(yk, grp, 3), None, _each_query_head(w, grp, 3),
                     _each_block(inv_t, p), _each_block(slope, p), _half(lq_ax, size, 1).reshape(-1, size), yq)
        m_r, acc_r = _half(m_run, size, 1), _half(acc, size, 1)
        for scale, vec, _, _ in res:
            _combine(m_r, acc_r, scale.view(full), vec.view(*full, d))
        size *= 2
    return m_run, acc


# ----------------------------------------------------------------------------------------------------
# The bounded-range fast path
# ----------------------------------------------------------------------------------------------------
#
# When every logit of the problem lies within FAST_RANGE nats (λ spread · 1/T plus, with slopes, slope ·
# axis length: temperatures ≳ 0.02 for λ ∈ [0, 1) without slopes), no running references are needed:
# with c the midpoint of all λ, every factor e^{±(λ − c)/T} lies in [e^{−FAST_RANGE/2}, e^{FAST_RANGE/2}],
# so prefix sums of e^{(λk − c)/T}·[v, 1] over sorted keys are plain `cumsum`s with no overflow and no
# underflow, and a query's contribution e^{(c − λq)/T}·prefix is an exact fp32 product (every logit ≤ 0,
# so the absolute reference 0 replaces the online max; docs/math.md §Fast path range). Each level is then
# one sort, one gather of the keys' rows, two scaled cumsums, one searchsorted and two gathers; nothing
# else. Outside that range the general path (`_causal_dc`, running references) is used.

# Largest logit range (nats) for the fast path: factors stay within e^{±30}, logits within e^{−60} of 1.
FAST_RANGE = 60.0


def _fast_center(lqg, lk, inv_t, slope, n):
    """The midpoint c of all λ when every logit of the causal problem on an n-long axis lies within
    FAST_RANGE nats of 0, else None (one host sync)."""
    lo = torch.minimum(lqg.amin(), lk.amin())
    hi = torch.maximum(lqg.amax(), lk.amax())
    span = (hi - lo) * inv_t.amax()
    if slope is not None:
        span = span + slope.abs().amax() * n
    if not bool(torch.isfinite(span)) or float(span) > FAST_RANGE:
        return None
    return 0.5 * (lo + hi)


def _causal_dc_fast(lq_ax, lk, v1, inv_t, slope, strict, leaf, center):
    """`_causal_dc` for a bounded logit range (see above): returns (m = 0, acc = Σ_j e^{s_ij}·[v_j, 1]).

    Every factor is per position, the same at every level: key j carries e^{(λk_j − c)/T + m·(j − n/2)}
    (prefix side) or e^{−(λk_j − c)/T + m·(j − n/2)} (suffix side), query i the reciprocal-side factors,
    so the rows [v, 1]·factor are formed once; a level only gathers them in λk order, scans them, and adds
    the scan at each query's split point times the query's factor.
    """
    b, hkv, grp, n = lq_ax.shape
    k_up, k_dn, q_dn, q_up = _fast_factors(lq_ax, lk, inv_t, slope, center)
    acc = _fast_leaves(k_up, k_dn, q_dn, q_up, v1, strict, leaf)
    if n > leaf:
        # rows [v, 1]·factor, prefix side then suffix side: (2·R, D) with R = B·Hkv·G·N
        rows = (torch.stack([k_up, k_dn])[..., None] * v1[:, :, None]).view(2 * b * hkv * grp * n, v1.shape[-1])
        q_fac = torch.stack([q_dn, q_up], dim=-1)  # (B, Hkv, G, N, 2)
        size = leaf
        while size < n:
            _fast_level(acc, rows, q_fac, lq_ax, lk, size)
            size *= 2
    return lq_ax.new_zeros(b, hkv, grp, n), acc


def _fast_factors(lq_ax, lk, inv_t, slope, center):
    """The fast path's per-position factors (B, Hkv, G, N): keys' prefix and suffix sides, then queries'
    factors for the prefix side (e^{−(λq − c)/T − m·(i − n/2)}) and the suffix side (e^{+(λq − c)/T − …})."""
    n = lq_ax.shape[-1]
    xk = (lk - center)[:, :, None] * inv_t  # (B, Hkv, G, N)
    xq = (lq_ax - center) * inv_t
    k_up, k_dn, q_dn, q_up = xk, -xk, -xq, xq
    if slope is not None:
        pos = slope * (torch.arange(n, device=lk.device, dtype=lk.dtype) - n / 2)
        k_up, k_dn, q_dn, q_up = k_up + pos, k_dn + pos, q_dn - pos, q_up - pos
    # the clamp only touches padding (zero rows, λ = 0 may sit far from c): real exponents are ≤ FAST_RANGE/2
    return tuple(t.clamp_max(FAST_RANGE).exp_() for t in (k_up, k_dn, q_dn, q_up))


def _fast_leaves(k_up, k_dn, q_dn, q_up, v1, strict, leaf):
    """Dense attention inside each leaf from the factors: acc (B, Hkv, G, N, D) = Σ_j e^{s_ij}·[v_j, 1] over
    the keys j of i's leaf with j ≤ i (j < i when `strict`)."""
    b, hkv, grp, n = q_up.shape
    nb, d = n // leaf, v1.shape[-1]

    def per_leaf(t):
        return t.view(b, hkv, grp, nb, leaf)

    # e^{s_ij} = min(e^{−(λq−c)/T}·e^{(λk−c)/T}, e^{(λq−c)/T}·e^{−(λk−c)/T}) (times the slope factors)
    p_leaf = per_leaf(q_dn)[..., :, None] * per_leaf(k_up)[..., None, :]
    p_leaf = torch.minimum(p_leaf, per_leaf(q_up)[..., :, None] * per_leaf(k_dn)[..., None, :], out=p_leaf)
    ar = torch.arange(leaf, device=v1.device)
    mask = ar[:, None] <= ar[None, :] if strict else ar[:, None] < ar[None, :]
    p_leaf.masked_fill_(mask, 0.0)
    return (p_leaf @ v1.view(b, hkv, 1, nb, leaf, d)).view(b, hkv, grp, n, d)


def _fast_level(acc, rows, q_fac, lq_ax, lk, size):
    """One level of the fast path, in place on acc: the queries of every right half of 2·size positions add
    the cumulative sums of their left half's key rows (`rows`, see `_causal_dc_fast`) at their split point,
    times their factors q_fac (B, Hkv, G, N, 2)."""
    b, hkv, grp, n = lq_ax.shape
    d, dev = acc.shape[-1], lk.device
    p = n // (2 * size)
    full = (b, hkv, grp, p, size)
    r_all, m_all = b * hkv * grp * n, b * hkv * grp * p * size
    ks, perm = lk.view(b, hkv, p, 2, size)[:, :, :, 0].sort(dim=-1)
    # whole-row copies with index_select (much cheaper than a gather with an expanded index):
    # the left halves' rows in ascending λk (prefix side) and in descending λk (suffix side)
    head_base = torch.arange(b * hkv * grp, device=dev).view(b, hkv, grp, 1, 1) * n
    key_rows = (perm + (torch.arange(p, device=dev) * (2 * size)).view(p, 1))[:, :, None] + head_base
    side_rows = torch.stack([key_rows, key_rows.flip(-1) + r_all])
    scan = rows.index_select(0, side_rows.view(-1)).view(2, *full, d).cumsum_(-2).view(2 * m_all, d)
    # each right-half query: keys with λk ≤ λq are the first cnt ascending, the others the first
    # size − cnt descending; an empty side reads some finite row with a zero factor
    q = _half(lq_ax, size, 1)
    cnt = torch.searchsorted(ks[:, :, None].expand(full).contiguous(), q.contiguous(), right=True)
    base = torch.arange(0, m_all, size, device=dev).view(b, hkv, grp, p, 1)
    look = torch.stack([cnt - 1 + base, (size - 1 + m_all) - cnt + base], dim=-1)  # (…, S, 2)
    f = _half(q_fac, size, 1) * torch.stack([cnt > 0, cnt < size], dim=-1)
    look.clamp_min_(0)
    g = scan.index_select(0, look.view(-1)).view(*full, 2, d)
    _half(acc, size, 1).addcmul_(g[..., 0, :], f[..., 0, None]).addcmul_(g[..., 1, :], f[..., 1, None])


def _leaf_size(t: int) -> int:
    return max(16, min(LEAF, 1 << max(0, (t - 1).bit_length())))


def _axis_len(tk: int, leaf: int) -> int:
    return leaf << max(0, math.ceil(math.log2(max(1, tk) / leaf)))


def _to_axis(t, n, dim, start=0, value=0.0):
    """Place `t` at [start, start + len) of a length-n axis along `dim`, filled with `value` elsewhere."""
    if start == 0 and t.shape[dim] == n:
        return t
    dim = dim % t.dim()
    shape = list(t.shape)
    shape[dim] = n
    out = t.new_full(shape, value)
    out.narrow(dim, start, t.shape[dim]).copy_(t)
    return out


def _prepare(lq, lk, v, temperature, alibi_slopes):
    b, h, tq = lq.shape
    hkv = lk.shape[1]
    grp = h // hkv
    dt = reference.compute_dtype(lq)
    lqg = lq.to(dt).reshape(b, hkv, grp, tq)
    inv_t = (1.0 / temperature.to(dt)).view(1, hkv, grp, 1).expand(b, hkv, grp, 1)
    slope = None if alibi_slopes is None else alibi_slopes.to(dt).view(b, hkv, grp, 1)
    v1 = torch.cat([v.to(dt), v.new_ones(*v.shape[:-1], 1, dtype=dt)], dim=-1)
    lkf, finite = _finite_keys(lk.to(dt))
    return lqg, lkf, v1 * finite[..., None], inv_t, slope


def _finite_keys(lk):
    """λk with every infinite entry replaced, and the mask of the finite ones. A key at λ = ±inf has weight
    0 for every finite query (its logit is -inf, as in the reference and Triton); the scans form differences
    of λ, which it would turn into NaN. It takes its nearest finite neighbour's λ (the one before it, else
    the one after it: a logit next to the row's own, so no stabilising maximum moves far) and its row of
    [v, 1] is zeroed, so that it adds nothing. No host read."""
    infinite = torch.isinf(lk)
    tk = lk.shape[-1]
    pos = torch.arange(tk, device=lk.device).expand(lk.shape)
    before = torch.where(infinite, -1, pos).cummax(-1).values
    after = torch.where(infinite, tk, pos).flip(-1).cummin(-1).values.flip(-1)
    source = torch.where(before >= 0, before, after.clamp(max=tk - 1))
    # keys of a head whose keys are all infinite: any finite λ (every weight is 0, as every logit is -inf)
    filled = torch.nan_to_num(lk.gather(-1, source), posinf=0.0, neginf=0.0)
    return torch.where(infinite, filled, lk), ~infinite


def _causal_part(lqg, lk, v1, inv_t, slope, strict, q_start):
    """Queries at positions q_start … q_start + Tq − 1 of the Tk-long key axis: (m, acc) for them."""
    tq = lqg.shape[-1]
    tk = lk.shape[-1]
    leaf = _leaf_size(tk)
    n = _axis_len(tk, leaf)
    lq_ax = _to_axis(lqg, n, -1, q_start)
    lk_ax, v1_ax = _to_axis(lk, n, -1), _to_axis(v1, n, -2)
    center = _fast_center(lqg, lk, inv_t, slope, n)
    if center is None:
        m, acc = _causal_dc(lq_ax, lk_ax, v1_ax, inv_t, slope, strict, leaf)
    else:
        m, acc = _causal_dc_fast(lq_ax, lk_ax, v1_ax, inv_t, slope, strict, leaf, center)
    return m[..., q_start: q_start + tq], acc[..., q_start: q_start + tq, :]


def _global_part(lqg, lk, v1, inv_t):
    """Non-causal without slopes: one level over all keys sorted once."""
    b, hkv, grp, tq = lqg.shape
    d = v1.shape[-1]
    ks, perm = lk.sort(dim=-1)
    w = v1.gather(-2, perm[..., None].expand_as(v1))
    res = _sides(_each_query_head(ks, grp, 2), None, None, _each_query_head(w, grp, 2), inv_t.reshape(-1, 1), None,
                 lqg.reshape(-1, tq), None)
    (s_lo, a_lo, _, _), (s_up, a_up, _, _) = res
    m = torch.maximum(s_lo, s_up)
    acc = a_lo * torch.exp(s_lo - m)[..., None] + a_up * torch.exp(s_up - m)[..., None]
    return m.view(b, hkv, grp, tq), acc.view(b, hkv, grp, tq, d)


def _use_dense(tq, tk, is_causal, slopes):
    if tq <= DENSE_QUERIES or tk <= DENSE_QUERIES:
        return True
    return not is_causal and slopes is not None and tq > tk


def _forward_parts(lq, lk, v, temperature, alibi_slopes, is_causal):
    """(m, acc) per query, (B, Hkv, G, Tq) and (B, Hkv, G, Tq, Dv + 1)."""
    lqg, lkf, v1, inv_t, slope = _prepare(lq, lk, v, temperature, alibi_slopes)
    tk, tq = lkf.shape[-1], lqg.shape[-1]
    if is_causal:
        return _causal_part(lqg, lkf, v1, inv_t, slope, False, tk - tq)
    if slope is None:
        return _global_part(lqg, lkf, v1, inv_t)
    m, acc = _causal_part(lqg, lkf, v1, inv_t, slope, False, tk - tq)
    # keys after the query: the causal problem on the time-reversed sequences, strictly causal. Query i
    # (position i' = i + Tk − Tq) sits at Tk − 1 − i' there, so the reversed queries fill positions 0 … Tq−1.
    m2, acc2 = _causal_part(lqg.flip(-1), lkf.flip(-1), v1.flip(-2), inv_t, slope, True, 0)
    _combine(m, acc, m2.flip(-1), acc2.flip(-2))
    return m, acc


@varlen.accepts_packs(varlen.forward_by_sequence)
def attention_fwd_loglinear(lq, lk, v, temperature, alibi_slopes, is_causal):
    """Exact taumode attention in O(T·D·log T) (see the module docstring). Returns (out, lse).

    lq (B, H, Tq); lk (B, Hkv, Tk); v (B, Hkv, Tk, Dv); temperature (H,); alibi_slopes (B, H)
    or None, all in the compute dtype (float64 for float64 inputs, else fp32: the whole computation runs in
    it). Causal is bottom-right aligned (Tq ≤ Tk). out in v.dtype, lse (B, H, Tq) in the compute dtype.
    Few queries (decode, short prompts) go to the dense chunked path, which is cheaper there. A pack (a
    trailing varlen.Seqs) runs per group of sequences: each sorted and scanned alone, O(T log T) in total.
    """
    b, h, tq = lq.shape
    tk, dv = lk.shape[2], v.shape[-1]
    if _use_dense(tq, tk, is_causal, alibi_slopes):
        return reference.attention_fwd_chunked(lq, lk, v, temperature, alibi_slopes, is_causal)
    m, acc = _forward_parts(lq, lk, v, temperature, alibi_slopes, is_causal)
    den = acc[..., dv]
    out = (acc[..., :dv] / den[..., None]).reshape(b, h, tq, dv).to(v.dtype)
    lse = (m + den.log()).reshape(b, h, tq)
    return out, lse


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------
#
# With P_ij = e^{s_ij − lse_i}, dS = P∘(dO·v_j − D_i), D_i = dO_i·O_i (docs/math.md §Attention logits,
# "Gradients"), every gradient is a contraction of P-weighted sums that the same machinery computes:
#   query side (over keys j, weights [v_j, 1]):
#     Qsign_i = Σ_j P_ij sign(λq_i − λk_j)[v_j, 1]   → dλq_i = −(1/T)(dO_i·Qsign_v − D_i·Qsign_1)
#     M_i     = Σ_j P_ij |λq_i − λk_j| [v_j, 1]      → dT   = (1/T²) Σ_i (dO_i·M_v − D_i·M_1)
#     N_i     = Σ_j P_ij |i' − j| [v_j, 1]            → dm   = −Σ_i (dO_i·N_v − D_i·N_1)
#   key side (the transposed problem, over queries i, weights [dO_i, D_i], log-offset −lse_i):
#     Kall_j  = Σ_i P_ij [dO_i, D_i]                  → dv_j = Kall_dO
#     Ksign_j = Σ_i P_ij sign(λq_i − λk_j)[dO_i, D_i] → dλk_j = (1/T)(v_j·Ksign_dO − Ksign_D)
# Signs come from looking up both sides of the tie group (searchsorted left and right), so sign(0) = 0.

def _bwd_leaf(lq_ax, lk, v1, g1, lse_ax, inv_t, slope, strict, leaf, acc):
    b, hkv, grp, n = lq_ax.shape
    nb, d = n // leaf, v1.shape[-1]
    s, diff, dist = _leaf_logits(lq_ax, lk, inv_t, slope, strict, leaf)
    p = torch.exp_(s.sub_(lse_ax.view(b, hkv, grp, nb, leaf)[..., None]))
    ps = p * torch.sign(diff)
    v1b = v1.view(b, hkv, 1, nb, leaf, d)
    g1b = g1.view(b, hkv, grp, nb, leaf, d)

    def add(name, t):
        acc[name].view(b, hkv, grp, nb, leaf, d).add_(t)

    add("qsign", ps @ v1b)
    add("m", (p * diff.abs_()) @ v1b)
    if slope is not None:
        add("n", (p * dist.clamp_min(0)) @ v1b)
    add("kall", p.transpose(-1, -2) @ g1b)
    add("ksign", ps.transpose(-1, -2) @ g1b)


def _bwd_level(acc, lq_ax, lk, v1, g1, lse_ax, inv_t, slope, size):
    """One level of the causal D&C: the right halves' queries against the left halves' keys."""
    b, hkv, grp, n = lq_ax.shape
    d = v1.shape[-1]
    p = n // (2 * size)
    full = (b, hkv, grp, p, size)
    it, sl = _each_block(inv_t, p), _each_block(slope, p)
    ar = torch.arange(size, device=lk.device, dtype=lk.dtype)
    lse_r = _half(lse_ax, size, 1).reshape(-1, size)

    def add(name, half, t):
        _half(acc[name], size, half).add_(t.view(*full, d))

    # query side: items are the left halves' keys sorted by λk; lookups the right halves' queries
    ks, _, w, yk = _level_keys(lk, v1, size, slope)
    q = _half(lq_ax, size, 1).reshape(-1, size)
    res = _sides(_each_query_head(ks, grp, 3), _each_query_head(yk, grp, 3), None, _each_query_head(w, grp, 3),
                 it, sl, q, None if slope is None else ar, splits=("le", "lt", "gt"), moments=True)
    (s_le, _, mx_le, my_le), (s_lt, a_lt, _, _), (s_gt, a_gt, mx_gt, my_gt) = res
    e_le, e_gt = _as_weights(s_le, lse_r), _as_weights(s_gt, lse_r)
    add("qsign", 1, _as_weights(s_lt, lse_r) * a_lt - e_gt * a_gt)
    add("m", 1, e_le * mx_le + e_gt * mx_gt)
    if slope is not None:
        add("n", 1, e_le * my_le + e_gt * my_gt)

    # key side: items are the right halves' queries sorted by λq (per query head), log-offset −lse;
    # lookups the left halves' keys. Item position s − i' = −(i' − s), lookup position s − j.
    qs, qperm = q.sort(dim=-1)
    wq = _half(g1, size, 1).reshape(-1, size, d).gather(1, qperm[..., None].expand(-1, -1, d))
    cq = -lse_r.gather(1, qperm)
    yqi = None if slope is None else -qperm.to(lk.dtype)
    kl = _each_query_head(lk.view(b, hkv, p, 2, size)[:, :, :, 0], grp, 3)
    res = _sides(qs, yqi, cq, wq, it, sl, kl, None if slope is None else size - ar, splits=("le", "lt", "gt"))
    (s_le, a_le, _, _), (s_lt, a_lt, _, _), (s_gt, a_gt, _, _) = res
    e_gt = _as_weights(s_gt)
    add("kall", 0, _as_weights(s_le) * a_le + e_gt * a_gt)
    add("ksign", 0, e_gt * a_gt - _as_weights(s_lt) * a_lt)


def _bwd_causal_part(lqg, lk, v1, g1, lse, inv_t, slope, strict, q_start):
    """Accumulators (see above) of the causal problem with queries at q_start … q_start + Tq − 1."""
    b, hkv, grp, tq = lqg.shape
    tk, d = lk.shape[-1], v1.shape[-1]
    leaf = _leaf_size(tk)
    n = _axis_len(tk, leaf)
    lq_ax = _to_axis(lqg, n, -1, q_start)
    lk_ax = _to_axis(lk, n, -1)
    v1_ax = _to_axis(v1, n, -2)
    g1_ax = _to_axis(g1, n, -2, q_start)
    # queries that are not real (before q_start, axis padding) weigh nothing: lse = +1e30 ⇒ P = 0
    lse_ax = _to_axis(lse, n, -1, q_start, value=1e30)
    names = ["qsign", "m", "kall", "ksign"] + (["n"] if slope is not None else [])
    acc = {k: lq_ax.new_zeros(b, hkv, grp, n, d) for k in names}
    _bwd_leaf(lq_ax, lk_ax, v1_ax, g1_ax, lse_ax, inv_t, slope, strict, leaf, acc)
    size = leaf
    while size < n:
        _bwd_level(acc, lq_ax, lk_ax, v1_ax, g1_ax, lse_ax, inv_t, slope, size)
        size *= 2
    out = {}
    for k, t in acc.items():
        out[k] = t[..., :tk, :] if k.startswith("k") else t[..., q_start: q_start + tq, :]
    return out


def _bwd_global_part(lqg, lk, v1, g1, lse, inv_t):
    """Non-causal without slopes: one level, all keys against all queries."""
    b, hkv, grp, tq = lqg.shape
    d = v1.shape[-1]
    it = inv_t.reshape(-1, 1)
    ks, perm = lk.sort(dim=-1)
    w = v1.gather(-2, perm[..., None].expand_as(v1))
    lse_f = lse.reshape(-1, tq)
    res = _sides(_each_query_head(ks, grp, 2), None, None, _each_query_head(w, grp, 2), it, None, lqg.reshape(-1, tq),
                 None, splits=("le", "lt", "gt"), moments=True)
    (s_le, _, mx_le, _), (s_lt, a_lt, _, _), (s_gt, a_gt, mx_gt, _) = res
    e_gt = _as_weights(s_gt, lse_f)
    acc = {"qsign": _as_weights(s_lt, lse_f) * a_lt - e_gt * a_gt, "m": _as_weights(s_le, lse_f) * mx_le + e_gt * mx_gt}
    qs, qperm = lqg.reshape(-1, tq).sort(dim=-1)
    wq = g1.reshape(-1, tq, d).gather(1, qperm[..., None].expand(-1, -1, d))
    res = _sides(qs, None, -lse_f.gather(1, qperm), wq, it, None, _each_query_head(lk, grp, 2), None,
                 splits=("le", "lt", "gt"))
    (s_le, a_le, _, _), (s_lt, a_lt, _, _), (s_gt, a_gt, _, _) = res
    e_gt = _as_weights(s_gt)
    acc["kall"] = _as_weights(s_le) * a_le + e_gt * a_gt
    acc["ksign"] = e_gt * a_gt - _as_weights(s_lt) * a_lt
    return {k: t.view(b, hkv, grp, -1, d) for k, t in acc.items()}


@varlen.accepts_packs(varlen.backward_by_sequence)
def attention_bwd_loglinear(dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal):
    """Exact gradients in O(T·D·log T): the forward's D&C run on the query side (P-weighted sums of
    [v, 1] split by sign, with first moments in |Δλ| and |i' − j|) and on the transposed key side (keys
    looking up sums over later queries of e^{−lse}·[dO, D]). Same cases as the forward; few queries go
    to the dense chunked backward. Returns (dlq, dlk, dv, dtemperature, dalibi) per the contract. A pack (a
    trailing varlen.Seqs) runs per group of sequences.
    """
    b, h, tq = lq.shape
    hkv, tk, dv_dim = lk.shape[1], lk.shape[2], v.shape[-1]
    grp = h // hkv
    if _use_dense(tq, tk, is_causal, alibi_slopes):
        return reference.attention_bwd_chunked(dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal)
    lqg, lkf, v1, inv_t, slope = _prepare(lq, lk, v, temperature, alibi_slopes)
    dt = lqg.dtype
    do = dout.to(dt).reshape(b, hkv, grp, tq, dv_dim)
    delta = (do * out.to(dt).reshape(b, hkv, grp, tq, dv_dim)).sum(-1)
    g1 = torch.cat([do, delta[..., None]], dim=-1)
    lse_g = lse.to(dt).reshape(b, hkv, grp, tq)
    if is_causal:
        acc = _bwd_causal_part(lqg, lkf, v1, g1, lse_g, inv_t, slope, False, tk - tq)
    elif slope is None:
        acc = _bwd_global_part(lqg, lkf, v1, g1, lse_g, inv_t)
    else:
        acc = _bwd_causal_part(lqg, lkf, v1, g1, lse_g, inv_t, slope, False, tk - tq)
        rev = _bwd_causal_part(lqg.flip(-1), lkf.flip(-1), v1.flip(-2), g1.flip(-2), lse_g.flip(-1),
                               inv_t, slope, True, 0)
        for k in acc:
            acc[k] = acc[k] + rev[k].flip(-2)

    o = out.to(dt).reshape(b, hkv, grp, tq, dv_dim)

    def contract(t):  # dO_i·t_v − D_i·t_1 = dO_i·(t_v − O_i t_1) for the query-side sums, (B, Hkv, G, Tq)
        return (do * (t[..., :dv_dim] - o * t[..., dv_dim:])).sum(-1)

    it = inv_t  # (B, Hkv, G, 1)
    dlq = (-it * contract(acc["qsign"])).reshape(b, h, tq)
    dtemp = (it * it * contract(acc["m"])).sum(dim=(0, 3)).reshape(h)
    dalibi = None if slope is None else (-contract(acc["n"]).sum(-1)).reshape(b, h)
    # a key at λ = ±inf has weight 0 (_finite_keys): no gradient reaches it (its stand-in λ gave it sums)
    weighted = v1[..., dv_dim]
    dv = acc["kall"][..., :dv_dim].sum(2) * weighted[..., None]
    ks = acc["ksign"]
    dlk = (it * ((v1[:, :, None, :, :dv_dim] * ks[..., :dv_dim]).sum(-1) - ks[..., dv_dim])).sum(2) * weighted
    return dlq, dlk, dv.to(v.dtype), dtemp, dalibi
