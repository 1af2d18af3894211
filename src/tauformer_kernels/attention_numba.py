"""Taumode attention on the CPU, compiled by numba: the exact sorted algorithm as one loop per head.

For query i at position p = i + Tk − Tq (bottom-right aligned) and a key j ≤ p, the logit
−|λq_i − λk_j|/T − s·(p − j) is a key term minus a query term, on each side of λk:

    λk ≤ λq:  (λk/T + s·j) − (λq/T + s·p)          λk > λq:  (−λk/T + s·j) − (−λq/T + s·p)

Keys enter two Fenwick trees in time order, at their λk rank (ascending for the first side, descending for
the second); a query reads the prefix of ranks on each side: O(log T) nodes of [Σ e^{a_j − ref} v_j,
Σ e^{a_j − ref}], where ref is the node's largest key term (a node rescales when a larger one enters: the
online softmax of one node), so every exponent is ≤ 0 and any temperature or slope stays finite. The
backward runs the same query pass again (P, O, lse and D from one float64 computation, as autograd forms
them) and its transpose: queries enter trees at their λq rank in reverse time order with weights
e^{−lse}·[dO, D], and each key reads the sums over the queries that see it, by the side and sign of λq − λk.
The temperature and slope gradients follow from the per-row and per-column sums (docs/math.md §Sorted
(loglinear) attention). Everything runs in float64; O(T·log T·Dv) per head. Few queries per head (decode)
take the dense loop instead: one pass over the keys, exponentials of the visible logits only.

Non-causal attention with ALiBi slopes (keys on both sides of a query at a distance) is not written here:
the backend functions hand it to the PyTorch loglinear backend.

Numba compiles each function on its first call (cached on disk beside this file after that); the first-call
latency is in kernels/DESIGN.md §CPU.
"""
from __future__ import annotations

import contextlib
import functools
import math

import numba
import numpy as np
import torch

from . import loglinear, reference, varlen

# Queries per (sequence, head) up to which the forward is the dense loop: a Fenwick pass first sorts the
# keys (O(Tk log Tk)), which a few queries do not repay (measured crossover: kernels/DESIGN.md §CPU).
DENSE_MAX_QUERIES = 16

_JIT = dict(cache=True, nogil=True)
_NEG_INF = -np.inf


# A tree whose key terms span at most this many nats (in float64 e^-600 is still normal) takes one reference
# for all its nodes, the largest key term: a key is scaled once and added to its nodes, a query scales each
# side's prefix sum once (one exponential per key and per lookup instead of one per node). Wider spans (a
# cold temperature over a wide λ range, steep slopes over long sequences) rescale node by node.
FIXED_REFERENCE_SPAN = 600.0


@numba.njit(**_JIT)
def _reference(terms, count):
    """The fixed reference of a tree over terms[:count] (their maximum), or NaN where they span more than
    FIXED_REFERENCE_SPAN (the tree then rescales per node). Infinite and NaN terms are never inserted."""
    hi, lo = _NEG_INF, np.inf
    for j in range(count):
        t = terms[j]
        if not math.isinf(t) and not math.isnan(t):
            hi = max(hi, t)
            lo = min(lo, t)
    if hi == _NEG_INF:
        return 0.0
    return hi if hi - lo <= FIXED_REFERENCE_SPAN else np.nan


@numba.njit(**_JIT)
def _insert(ref, acc, index, a, row, fixed):
    """Adds e^{a − ref}·row to every Fenwick node over `index` (1-based). With a fixed reference (not NaN)
    ref is `fixed` for every node; else each node's ref is its largest a, rescaled when a larger one enters."""
    n, width = ref.shape[0] - 1, row.shape[0]
    if fixed == fixed:
        f = math.exp(a - fixed)
        while index <= n:
            for d in range(width):
                acc[index, d] += f * row[d]
            index += index & (-index)
        return
    while index <= n:
        r = ref[index]
        if a > r:
            f = math.exp(r - a)  # 0 for an empty node (r = −inf)
            for d in range(width):
                acc[index, d] = acc[index, d] * f + row[d]
            ref[index] = a
        else:
            f = math.exp(a - r)
            for d in range(width):
                acc[index, d] += f * row[d]
        index += index & (-index)


@numba.njit(**_JIT)
def _prefix_max(ref, acc, index, b, fixed):
    """max over the non-empty nodes of the prefix 1..index of (ref − b): the largest logit scale a query meets
    there (−inf when the prefix holds no key)."""
    m = _NEG_INF
    last = acc.shape[1] - 1
    while index > 0:
        if acc[index, last] > 0.0:
            m = max(m, (fixed if fixed == fixed else ref[index]) - b)
        index -= index & (-index)
    return m


@numba.njit(**_JIT)
def _prefix_add(ref, acc, index, shift, out, sign, fixed):
    """out += sign·Σ over the prefix nodes of e^{ref − shift}·acc."""
    width = out.shape[0]
    if fixed == fixed:
        f = sign * math.exp(fixed - shift)
        while index > 0:
            for d in range(width):
                out[d] += f * acc[index, d]
            index -= index & (-index)
        return
    while index > 0:
        f = sign * math.exp(ref[index] - shift)
        if f != 0.0:
            for d in range(width):
                out[d] += f * acc[index, d]
        index -= index & (-index)


@numba.njit(**_JIT)
def _ranks(values, n):
    """(sorted values, 1-based ascending rank of each) of the first n entries."""
    order = np.argsort(values[:n], kind="mergesort")
    ranks = np.empty(n, np.int64)
    for r in range(n):
        ranks[order[r]] = r + 1
    return values[:n][order], ranks


@numba.njit(**_JIT)
def _has_nan(x):
    return np.isnan(x).any()


@numba.njit(**_JIT)
def _query_sums(lqh, lkh, vh, inv_t, slope, tq, tk, causal, strict, m_out, le_out, gt_out, lt_out):
    """The query pass of one (sequence, head): for each query i, m_out[i] = the largest logit it sees, and the
    sums of e^{logit − m}·[v, 1] over its visible keys with λk ≤ λq (le_out), λk > λq (gt_out) and, when
    `strict`, λk < λq (lt_out). lqh (tq,), lkh (tk,), vh (tk, Dv) of this head, float64 views or arrays."""
    dv = vh.shape[1]
    width = dv + 1
    sorted_k, rank = _ranks(lkh, tk)
    a_le, a_gt = np.empty(tk), np.empty(tk)
    for j in range(tk):
        a_le[j] = lkh[j] * inv_t + slope * j
        a_gt[j] = -lkh[j] * inv_t + slope * j
    fixed_le, fixed_gt = _reference(a_le, tk), _reference(a_gt, tk)
    ref_le, ref_gt = np.full(tk + 1, _NEG_INF), np.full(tk + 1, _NEG_INF)
    acc_le, acc_gt = np.zeros((tk + 1, width)), np.zeros((tk + 1, width))
    row = np.empty(width)
    row[dv] = 1.0
    entered = 0
    for i in range(tq):
        p = i + tk - tq
        last = p if causal else tk - 1
        while entered <= last and entered < tk:
            j = entered
            entered += 1
            if math.isinf(lkh[j]):  # weight 0 for every finite query
                continue
            for d in range(dv):
                row[d] = vh[j, d]
            _insert(ref_le, acc_le, rank[j], a_le[j], row, fixed_le)
            _insert(ref_gt, acc_gt, tk + 1 - rank[j], a_gt[j], row, fixed_gt)
        b_le = lqh[i] * inv_t + slope * p
        b_gt = -lqh[i] * inv_t + slope * p
        r_right = np.searchsorted(sorted_k, lqh[i], side="right")
        if fixed_le == fixed_le and fixed_gt == fixed_gt:  # one walk per side: plain sums, scaled after
            le_out[i, :] = 0.0
            gt_out[i, :] = 0.0
            _prefix_add(ref_le, acc_le, r_right, fixed_le, le_out[i], 1.0, fixed_le)
            _prefix_add(ref_gt, acc_gt, tk - r_right, fixed_gt, gt_out[i], 1.0, fixed_gt)
            x_le = fixed_le - b_le if le_out[i, dv] > 0.0 else _NEG_INF
            x_gt = fixed_gt - b_gt if gt_out[i, dv] > 0.0 else _NEG_INF
            m = max(x_le, x_gt)
            m_out[i] = m
            if m == _NEG_INF or math.isnan(m):
                continue
            f_le, f_gt = math.exp(x_le - m), math.exp(x_gt - m)
            for d in range(width):
                le_out[i, d] *= f_le
                gt_out[i, d] *= f_gt
            if strict:
                r_left = np.searchsorted(sorted_k, lqh[i], side="left")
                if r_left == r_right:  # no key ties λq: λk < λq is λk <= λq
                    lt_out[i, :] = le_out[i, :]
                else:
                    lt_out[i, :] = 0.0
                    _prefix_add(ref_le, acc_le, r_left, fixed_le - x_le + m, lt_out[i], 1.0, fixed_le)
            continue
        m = max(_prefix_max(ref_le, acc_le, r_right, b_le, fixed_le),
                _prefix_max(ref_gt, acc_gt, tk - r_right, b_gt, fixed_gt))
        m_out[i] = m
        le_out[i, :] = 0.0
        gt_out[i, :] = 0.0
        if m == _NEG_INF or math.isnan(m):
            continue
        _prefix_add(ref_le, acc_le, r_right, b_le + m, le_out[i], 1.0, fixed_le)
        _prefix_add(ref_gt, acc_gt, tk - r_right, b_gt + m, gt_out[i], 1.0, fixed_gt)
        if strict:
            r_left = np.searchsorted(sorted_k, lqh[i], side="left")
            if r_left == r_right:
                lt_out[i, :] = le_out[i, :]
            else:
                lt_out[i, :] = 0.0
                _prefix_add(ref_le, acc_le, r_left, b_le + m, lt_out[i], 1.0, fixed_le)


@numba.njit(parallel=True, **_JIT)
def _forward_sorted(lq, lk, v, temperature, slopes, jobs, group, causal, out, lse):
    """Forward over (sequence, query head) pairs in parallel. jobs (n, 6): batch row, q0, q1, k0, k1, slope
    row. out and lse are written at the jobs' rows only."""
    n_heads = lq.shape[1]
    dv = v.shape[3]
    for task in numba.prange(jobs.shape[0] * n_heads):
        job, h = task // n_heads, task % n_heads
        bi, q0, q1, k0, k1, srow = jobs[job]
        tq, tk = q1 - q0, k1 - k0
        if tq <= 0:
            continue
        g = h // group
        inv_t = 1.0 / temperature[h]
        slope = slopes[srow, h] if slopes.shape[0] > 0 else 0.0
        lqh = lq[bi, h, q0:q1].astype(np.float64)
        lkh = lk[bi, g, k0:k1].astype(np.float64)
        if tk == 0 or _has_nan(lqh) or _has_nan(lkh):
            _fill_rows(out, lse, bi, h, q0, q1, tk)
            continue
        vh = v[bi, g, k0:k1].astype(np.float64)
        m = np.empty(tq)
        le, gt = np.empty((tq, dv + 1)), np.empty((tq, dv + 1))
        _query_sums(lqh, lkh, vh, inv_t, slope, tq, tk, causal, False, m, le, gt, le)
        for i in range(tq):
            den = le[i, dv] + gt[i, dv]
            if den > 0.0 and not math.isinf(lqh[i]):
                for d in range(dv):
                    out[bi, h, q0 + i, d] = (le[i, d] + gt[i, d]) / den
                lse[bi, h, q0 + i] = m[i] + math.log(den)
            else:
                _empty_row(out, lse, bi, h, q0 + i, lqh[i])


@numba.njit(**_JIT)
def _empty_row(out, lse, bi, h, row, lam):
    """A query that sees no key: output 0, lse +inf (FlashAttention's empty rows); NaN for an infinite λq
    (the reference's softmax of a row of −inf)."""
    value = np.nan if math.isinf(lam) else 0.0
    for d in range(out.shape[3]):
        out[bi, h, row, d] = value
    lse[bi, h, row] = np.nan if math.isinf(lam) else np.inf


@numba.njit(**_JIT)
def _fill_rows(out, lse, bi, h, q0, q1, tk):
    """A sequence with a NaN λ (NaN everywhere, as the reference's softmax gives) or without keys (empty rows)."""
    value = 0.0 if tk == 0 else np.nan
    for i in range(q0, q1):
        for d in range(out.shape[3]):
            out[bi, h, i, d] = value
        lse[bi, h, i] = np.inf if tk == 0 else np.nan


@numba.njit(parallel=True, **_JIT)
def _forward_dense(lq, lk, v, temperature, slopes, jobs, group, causal, out, lse):
    """The same forward as one pass over the visible keys per query (decode and short prompts)."""
    n_heads = lq.shape[1]
    dv = v.shape[3]
    for task in numba.prange(jobs.shape[0] * n_heads):
        job, h = task // n_heads, task % n_heads
        bi, q0, q1, k0, k1, srow = jobs[job]
        tq, tk = q1 - q0, k1 - k0
        g = h // group
        inv_t = 1.0 / temperature[h]
        slope = slopes[srow, h] if slopes.shape[0] > 0 else 0.0
        logits = np.empty(max(tk, 1))
        acc = np.empty(dv)
        for i in range(tq):
            p = i + tk - tq
            last = min(p, tk - 1) if causal else tk - 1
            lam = np.float64(lq[bi, h, q0 + i])
            m = _NEG_INF
            for j in range(last + 1):
                s = -abs(lam - np.float64(lk[bi, g, k0 + j])) * inv_t - slope * abs(p - j)
                logits[j] = s
                if s > m or math.isnan(s):
                    m = s
            if m == _NEG_INF or math.isnan(m):
                if math.isnan(m):
                    for d in range(dv):
                        out[bi, h, q0 + i, d] = np.nan
                    lse[bi, h, q0 + i] = np.nan
                else:
                    _empty_row(out, lse, bi, h, q0 + i, lam)
                continue
            acc[:] = 0.0
            den = 0.0
            for j in range(last + 1):
                s = logits[j] - m
                if s > -745.0:  # e^s underflows to 0 below: skip the slow subnormal exponentials
                    w = math.exp(s)
                    den += w
                    for d in range(dv):
                        acc[d] += w * v[bi, g, k0 + j, d]
            for d in range(dv):
                out[bi, h, q0 + i, d] = acc[d] / den
            lse[bi, h, q0 + i] = m + math.log(den)


@numba.njit(parallel=True, **_JIT)
def _backward_sorted(dout, lq, lk, v, temperature, slopes, jobs, group, causal, dlq, dlk, dv_out, dtemp, dslope):
    """Backward over (sequence, kv head) pairs in parallel (the query heads of a group add into one dλk and
    dv). dtemp (n_jobs, H) and dslope (n_jobs, H) are per job; the caller sums them."""
    n_kv = lk.shape[1]
    dv = v.shape[3]
    width = dv + 1
    for task in numba.prange(jobs.shape[0] * n_kv):
        job, g = task // n_kv, task % n_kv
        bi, q0, q1, k0, k1, srow = jobs[job]
        tq, tk = q1 - q0, k1 - k0
        if tq <= 0 or tk <= 0:
            continue
        lkh = lk[bi, g, k0:k1].astype(np.float64)
        vh = v[bi, g, k0:k1].astype(np.float64)
        for h in range(g * group, (g + 1) * group):
            inv_t = 1.0 / temperature[h]
            slope = slopes[srow, h] if slopes.shape[0] > 0 else 0.0
            lqh = lq[bi, h, q0:q1].astype(np.float64)
            doh = dout[bi, h, q0:q1].astype(np.float64)
            if _has_nan(lqh) or _has_nan(lkh) or _has_nan(doh):
                for i in range(tq):
                    dlq[bi, h, q0 + i] = np.nan
                for j in range(tk):
                    dlk[bi, g, k0 + j] = np.nan
                dtemp[job, h] = np.nan
                dslope[job, h] = np.nan
                continue
            # the query pass: P, O, lse and D in float64, and dλq from the signed sums
            m = np.empty(tq)
            le, gt, lt = np.empty((tq, width)), np.empty((tq, width)), np.empty((tq, width))
            _query_sums(lqh, lkh, vh, inv_t, slope, tq, tk, causal, True, m, le, gt, lt)
            lse = np.full(tq, np.inf)
            delta = np.zeros(tq)
            moment_q = 0.0  # Σ_i λq_i·dλq_i (centred) for the temperature gradient
            center = 0.0
            for i in range(tq):
                center += lqh[i]
            center /= tq
            for i in range(tq):
                den = le[i, dv] + gt[i, dv]
                if not den > 0.0:
                    dlq[bi, h, q0 + i] = 0.0
                    continue
                lse[i] = m[i] + math.log(den)
                d_i = 0.0
                signed = 0.0
                for d in range(dv):
                    d_i += doh[i, d] * (le[i, d] + gt[i, d])
                d_i /= den
                delta[i] = d_i
                for d in range(dv):
                    signed += doh[i, d] * (lt[i, d] - gt[i, d])
                signed -= d_i * (lt[i, dv] - gt[i, dv])
                g_q = -inv_t * signed / den
                dlq[bi, h, q0 + i] = g_q
                moment_q += (lqh[i] - center) * g_q
            # the key pass: queries enter in reverse time order at their λq rank, weights e^{−lse}·[dO, D]
            sorted_q, rank = _ranks(lqh, tq)
            c_up, c_dn = np.empty(tq), np.empty(tq)
            for i in range(tq):
                p = i + tk - tq
                c_up[i] = -lqh[i] * inv_t - slope * p - lse[i]
                c_dn[i] = lqh[i] * inv_t - slope * p - lse[i]
            fixed_up, fixed_dn = _reference(c_up, tq), _reference(c_dn, tq)
            # a key's factor e^{fixed + d_j} must stay finite: past it, rescale per node
            top_up, top_dn = _NEG_INF, _NEG_INF
            for j in range(tk):
                if not math.isinf(lkh[j]):
                    top_up = max(top_up, lkh[j] * inv_t + slope * j)
                    top_dn = max(top_dn, -lkh[j] * inv_t + slope * j)
            if fixed_up + top_up > FIXED_REFERENCE_SPAN:
                fixed_up = np.nan
            if fixed_dn + top_dn > FIXED_REFERENCE_SPAN:
                fixed_dn = np.nan
            ref_up, ref_dn = np.full(tq + 1, _NEG_INF), np.full(tq + 1, _NEG_INF)
            acc_up, acc_dn = np.zeros((tq + 1, width)), np.zeros((tq + 1, width))
            row = np.empty(width)
            s_ge, s_gt, s_lt = np.empty(width), np.empty(width), np.empty(width)
            entered = tq - 1
            moment_k = 0.0
            moment_j = 0.0
            for j in range(tk - 1, -1, -1):
                # causal: the queries at positions p >= j see key j; otherwise all of them
                first = j - (tk - tq) if causal else 0
                while entered >= max(first, 0):
                    i = entered
                    entered -= 1
                    if math.isinf(lse[i]):
                        continue
                    for d in range(dv):
                        row[d] = doh[i, d]
                    row[dv] = delta[i]
                    # λq >= λk: e^{(λk/T + s·j) + c_up}; λq < λk: e^{(−λk/T + s·j) + c_dn}
                    _insert(ref_up, acc_up, tq + 1 - rank[i], c_up[i], row, fixed_up)
                    _insert(ref_dn, acc_dn, rank[i], c_dn[i], row, fixed_dn)
                if math.isinf(lkh[j]):
                    continue
                r_left = np.searchsorted(sorted_q, lkh[j], side="left")  # queries with λq < λk
                r_right = np.searchsorted(sorted_q, lkh[j], side="right")  # λq <= λk
                s_ge[:] = 0.0
                s_gt[:] = 0.0
                s_lt[:] = 0.0
                key_up = lkh[j] * inv_t + slope * j
                key_dn = -lkh[j] * inv_t + slope * j
                _prefix_add(ref_up, acc_up, tq - r_left, -key_up, s_ge, 1.0, fixed_up)
                if r_left == r_right:  # no query ties λk: λq > λk is λq >= λk
                    s_gt[:] = s_ge
                else:
                    _prefix_add(ref_up, acc_up, tq - r_right, -key_up, s_gt, 1.0, fixed_up)
                _prefix_add(ref_dn, acc_dn, r_left, -key_dn, s_lt, 1.0, fixed_dn)
                col = 0.0  # Σ_i dS_ij
                signed = 0.0  # Σ_i dS_ij sign(λq_i − λk_j)
                for d in range(dv):
                    dv_out[bi, g, k0 + j, d] += s_ge[d] + s_lt[d]
                    col += vh[j, d] * (s_ge[d] + s_lt[d])
                    signed += vh[j, d] * (s_gt[d] - s_lt[d])
                col -= s_ge[dv] + s_lt[dv]
                signed -= s_gt[dv] - s_lt[dv]
                g_k = inv_t * signed
                dlk[bi, g, k0 + j] += g_k
                moment_k += (lkh[j] - center) * g_k
                moment_j += (j - 0.5 * tk) * col
            # dT = Σ dS·|Δλ|/T² = −(1/T)(Σ_i λq_i dλq_i + Σ_j λk_j dλk_j) (shift-free: Σ dλq + Σ dλk = 0);
            # dslope = −Σ dS·(p − j) = Σ_j j·Σ_i dS_ij (each row of dS sums to 0)
            dtemp[job, h] = -inv_t * (moment_q + moment_k)
            dslope[job, h] = moment_j


@functools.lru_cache(maxsize=64)
def _batch_jobs(b: int, tq: int, tk: int) -> np.ndarray:
    jobs = np.array([(i, 0, tq, 0, tk, i) for i in range(b)], dtype=np.int64).reshape(-1, 6)
    jobs.setflags(write=False)  # shared between calls
    return jobs


def _jobs(b: int, tq: int, tk: int, seqs) -> np.ndarray:
    """(batch row, q0, q1, k0, k1, slope row) of every independent attention problem."""
    if seqs is None:
        return _batch_jobs(b, tq, tk)
    spans = varlen.visible_bounds(varlen.bounds(seqs, tq, tk), False)
    return np.array([(0, q0, q1, k0, k1, s) for s, (q0, q1, k0, k1) in enumerate(spans)],
                    dtype=np.int64).reshape(-1, 6)


def _array(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (float32/float64 kept; half types widened to float32, which numpy lacks)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.detach().numpy()


# Below this many multiply-adds a call runs on one thread: waking numba's workers costs more than it saves
# (a decode step over a short cache).
PARALLEL_MIN_WORK = 1 << 20


@contextlib.contextmanager
def _threads(work: float):
    """Runs a kernel call on torch's thread count (torch.set_num_threads, OMP_NUM_THREADS), or on 1 for small
    work. numba's OpenMP threading layer shares libgomp with torch, and its first launch sets libgomp's count
    to NUMBA_NUM_THREADS (the cores), which torch then reports and uses: a process told to use 1 thread ran
    its torch ops on 2 beside other jobs. The caller's count is put back after the call."""
    torch_threads = torch.get_num_threads()
    want = 1 if work < PARALLEL_MIN_WORK else max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != want:
        numba.set_num_threads(want)
    try:
        yield
    finally:
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)


def _slopes(alibi_slopes, dt) -> np.ndarray:
    """The slopes as an array of the compute dtype, an empty one without slopes (one compiled signature)."""
    if alibi_slopes is None:
        return np.zeros((0, 0), dtype=np.float64 if dt == torch.float64 else np.float32)
    return _array(alibi_slopes.to(dt))


def attention_fwd_numba(lq, lk, v, temperature, alibi_slopes, is_causal, seqs=None):
    """The numba forward (the contract's attention_fwd; a pack with its varlen.Seqs). Returns (out, lse)."""
    if alibi_slopes is not None and not is_causal:
        return loglinear.attention_fwd_loglinear(lq, lk, v, temperature, alibi_slopes, is_causal, seqs=seqs)
    b, h, tq = lq.shape
    hkv, tk, dv = lk.shape[1], lk.shape[2], v.shape[-1]
    if seqs is not None:
        varlen.check_max_lengths(seqs, tq, tk)
    dt = reference.compute_dtype(lq)
    if seqs is None:  # every row is written
        out, lse = torch.empty(b, h, tq, dv, dtype=dt), torch.empty(b, h, tq, dtype=dt)
    else:  # rows of no sequence keep output 0 and lse +inf
        out, lse = torch.zeros(b, h, tq, dv, dtype=dt), torch.full((b, h, tq), float("inf"), dtype=dt)
    jobs = _jobs(b, tq, tk, seqs)
    longest = int((jobs[:, 2] - jobs[:, 1]).max()) if len(jobs) else 0
    dense = longest <= DENSE_MAX_QUERIES
    with _threads(b * h * dv * (tq * tk if dense else (tq + tk) * max(1, tk.bit_length()))):
        (_forward_dense if dense else _forward_sorted)(
            _array(lq), _array(lk), _array(v), _array(temperature), _slopes(alibi_slopes, dt), jobs, h // hkv,
            bool(is_causal), out.numpy(), lse.numpy())
    if seqs is not None:
        return varlen.as_packed(out.to(v.dtype)), lse
    return out.to(v.dtype), lse


def attention_bwd_numba(dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal, seqs=None):
    """The numba backward (the contract's attention_bwd): (dlq, dlk, dv, dtemperature, dalibi). P, O and lse
    are recomputed in float64 (`out` and `lse` are not read)."""
    if alibi_slopes is not None and not is_causal:
        return loglinear.attention_bwd_loglinear(dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal,
                                                 seqs=seqs)
    b, h, tq = lq.shape
    hkv, tk, dv = lk.shape[1], lk.shape[2], v.shape[-1]
    if seqs is not None:
        varlen.check_max_lengths(seqs, tq, tk)
    dt = reference.compute_dtype(lq)
    jobs = _jobs(b, tq, tk, seqs)
    dlq = torch.zeros(b, h, tq, dtype=dt)
    dlk = torch.zeros(b, hkv, tk, dtype=dt)
    dv_acc = torch.zeros(b, hkv, tk, dv, dtype=torch.float64)
    dtemp = np.zeros((len(jobs), h))
    dslope = np.zeros((len(jobs), h))
    with _threads(b * h * dv * (tq + tk) * max(1, tk.bit_length())):
        _backward_sorted(_array(dout), _array(lq), _array(lk), _array(v), _array(temperature),
                         _slopes(alibi_slopes, dt), jobs, h // hkv, bool(is_causal), dlq.numpy(), dlk.numpy(),
                         dv_acc.numpy(), dtemp, dslope)
    dtemperature = torch.from_numpy(dtemp.sum(0)).to(temperature.dtype)
    dalibi = None
    if alibi_slopes is not None:  # one row per batch row, or per sequence of a pack (the jobs' order)
        dalibi = torch.from_numpy(dslope).to(alibi_slopes.dtype)
    dv_out = dv_acc.to(v.dtype)
    if seqs is not None:
        dv_out = varlen.as_packed(dv_out)
    return dlq, dlk, dv_out, dtemperature, dalibi


# ----------------------------------------------------------------------------------------------------
# The λ projection (docs/math.md §The λ projection): one pass per vector, L x and the two dot products fused
# ----------------------------------------------------------------------------------------------------

# The λ loops may reassociate their sums (vectorised dot products over F); NaN and inf keep their meaning.
_LAMBDA_JIT = dict(_JIT, fastmath={"reassoc", "contract"})


@numba.njit(**_LAMBDA_JIT)
def _quadratic_form(xv, laplacian):
    """(xᵀLx, xᵀx) of one vector, summed in float64."""
    quad = 0.0
    norm = 0.0
    for i in range(xv.shape[0]):
        lx_i = 0.0
        for j in range(xv.shape[0]):
            lx_i += laplacian[i, j] * xv[j]
        x_i = np.float64(xv[i])
        quad += x_i * lx_i
        norm += x_i * x_i
    return quad, norm


@numba.njit(parallel=True, **_LAMBDA_JIT)
def _lambda_forward(x, laplacian, tau, per_vector, eps, lam):
    """λ of every vector of x (B, Hx, T, F): E = max(xᵀLx / (xᵀx + eps), 0), λ = E / (E + tau)."""
    b_n, h_n, t_n, f_n = x.shape
    for n in numba.prange(b_n * h_n * t_n):
        b, h, t = n // (h_n * t_n), (n // t_n) % h_n, n % t_n
        xv = x[b, h, t]
        quad, norm = _quadratic_form(xv, laplacian)
        energy = max(quad / (norm + eps), 0.0)
        t_v = tau[b, h, t] if per_vector else tau[0, h, 0]
        lam[b, h, t] = energy / (energy + t_v)


@numba.njit(parallel=True, **_LAMBDA_JIT)
def _lambda_backward(dlam, x, laplacian, l_sym, tau, per_vector, eps, dx, dtau):
    """(l_sym = L + Lᵀ.) dx = dE·(L + Lᵀ)x/s − 2·dE·E_raw·x/s with dE = dλ·tau/(E + tau)² where E_raw >= 0 (else 0);
    dtau = −dλ·E/(E + tau)² per vector (the caller sums it per head)."""
    b_n, h_n, t_n, f_n = x.shape
    for n in numba.prange(b_n * h_n * t_n):
        b, h, t = n // (h_n * t_n), (n // t_n) % h_n, n % t_n
        xv = x[b, h, t]
        quad, norm = _quadratic_form(xv, laplacian)
        s = norm + eps
        e_raw = quad / s
        energy = max(e_raw, 0.0)
        t_v = tau[b, h, t] if per_vector else tau[0, h, 0]
        denom = (energy + t_v) ** 2
        g = np.float64(dlam[b, h, t])
        d_energy = g * t_v / denom if e_raw >= 0.0 else 0.0
        dtau[b, h, t] = -g * energy / denom
        scale = d_energy / s
        for i in range(f_n):
            sym_i = 0.0  # ((L + Lᵀ) x)_i
            for j in range(f_n):
                sym_i += l_sym[i, j] * xv[j]
            dx[b, h, t, i] = scale * (sym_i - 2.0 * e_raw * xv[i])


def _tau_array(tau: torch.Tensor, x: torch.Tensor, dt) -> tuple[np.ndarray, bool]:
    """tau as a (B, Hx, T) array (per vector) or (1, Hx, 1) (per head), and which."""
    per_vector = tau.dim() == 3
    t = tau.to(dt) if per_vector else tau.to(dt).reshape(1, -1, 1)
    return _array(t.contiguous()), per_vector


def lambda_fwd_numba(x, laplacian, tau, eps):
    """The contract's lambda_fwd: x (B, Hx, T, F), laplacian (F, F) dense, tau (Hx,) or (B, Hx, T)."""
    dt = reference.compute_dtype(x)
    lam = torch.empty(x.shape[:-1], dtype=dt)
    tau_a, per_vector = _tau_array(tau, x, dt)
    lap = laplacian.to(torch.float64).contiguous()
    with _threads(x.numel() * x.shape[-1]):
        _lambda_forward(_array(x), lap.numpy(), tau_a, per_vector, float(eps), lam.numpy())
    return lam


def lambda_bwd_numba(dlam, x, laplacian, tau, eps):
    """The contract's lambda_bwd: (dx like x, dtau like tau)."""
    dt = reference.compute_dtype(x)
    dx = torch.empty(x.shape, dtype=dt)
    dtau = torch.empty(x.shape[:-1], dtype=dt)
    tau_a, per_vector = _tau_array(tau, x, dt)
    lap = laplacian.to(torch.float64).contiguous()
    with _threads(2 * x.numel() * x.shape[-1]):
        _lambda_backward(_array(dlam), _array(x), lap.numpy(), (lap + lap.T).contiguous().numpy(), tau_a,
                         per_vector, float(eps), dx.numpy(), dtau.numpy())
    return dx.to(x.dtype), reference._tau_grad(dtau, tau)
