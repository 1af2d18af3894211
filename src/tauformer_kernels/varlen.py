"""Packed variable-length sequences: FlashAttention's `cu_seqlens` convention, as every backend receives it.

A pack of B sequences stores its tokens back to back: q (total_q, H, F), k (total_k, Hkv, F), v (total_k,
Hkv, Dv); sequence b owns query rows cu_q[b] .. cu_q[b+1] and key rows cu_k[b] .. cu_k[b+1]. Attention
never crosses a sequence: each sequence is attended to as if it were alone (causal bottom-right aligned
inside it, ALiBi distances from its own start, slopes per sequence). docs/math.md §Packed sequences.

Backends see a pack as one batch row: λq (1, H, total_q), λk (1, Hkv, total_k), v (1, Hkv, total_k, Dv)
(strided views of the packed tensors), out (1, H, total_q, Dv) and lse (1, H, total_q), with `Seqs` beside
them; slopes are (B, H), one row per sequence.

Trusted offsets (max_seqlen_q/k given: nothing reads them on the host) may be wrong. Every backend then reads
them the same way (`effective`), so that all agree and no kernel reaches outside its tensors: sequence 0
starts at row 0, each later offset is the running maximum of the offsets so far, clamped into [0, rows];
rows past the last offset belong to no sequence. A query row that sees no key (in no sequence, in a
sequence without keys, or causal in front of its sequence's first key) gets output 0 and lse +inf (as
FlashAttention's empty rows); a key row in no sequence gets zero gradients. max_seqlen_q/k are only the
launch size of the Triton kernels (their programs loop until their sequence is covered), and must be >= 1
where there are rows.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from . import validation


class Seqs(NamedTuple):
    """The sequences of a pack: int32 offsets (B + 1,) from 0 into the query and key rows, and the longest
    query and key sequence (they size the grids; no kernel reads the offsets on the host)."""
    cu_q: Tensor
    cu_k: Tensor
    max_q: int
    max_k: int

    @property
    def count(self) -> int:
        return self.cu_q.shape[0] - 1


def check_offsets_shape(cu_q, cu_k, total_q: int, total_k: int, device: torch.device) -> None:
    """The checks that need no values (they run while torch.compile traces): dtype, shape, device, B."""
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        validation.require(isinstance(cu, Tensor), lambda: f"{name} must be a torch.Tensor, got {type(cu).__name__}",
                           TypeError)
        validation.require(cu.dtype == torch.int32, lambda: f"{name} must be int32 (FlashAttention's convention), "
                           f"got {cu.dtype}", TypeError)
        validation.require(cu.dim() == 1 and cu.shape[0] >= 1,
                           lambda: f"{name} must be a 1-D tensor of B + 1 offsets, got shape {tuple(cu.shape)}")
        validation.require(cu.device == device, lambda: f"{name} is on {cu.device}, the tensors on {device}")
    validation.require(cu_q.shape[0] == cu_k.shape[0], lambda: f"cu_seqlens_q has {cu_q.shape[0] - 1} sequences "
                       f"and cu_seqlens_k {cu_k.shape[0] - 1}: they must describe the same B")


def check_offsets_values(cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int, is_causal: bool) -> tuple[int, int]:
    """The checks that read the offsets (one transfer to the host): from 0, non-decreasing, ending at the
    tensors' row counts, and every sequence with queries has keys (causal: at least as many). Returns
    (max_q, max_k)."""
    offsets = torch.stack([cu_q, cu_k]).tolist()
    for name, cu, total in (("cu_seqlens_q", offsets[0], total_q), ("cu_seqlens_k", offsets[1], total_k)):
        validation.require(cu[0] == 0, lambda: f"{name} must start at 0, got {cu[0]}")
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        validation.require(all(n >= 0 for n in lengths), lambda: f"{name} must be non-decreasing, got {cu}")
        validation.require(cu[-1] == total, lambda: f"{name} ends at {cu[-1]}, but its tensor has {total} rows "
                           "(every row belongs to a sequence)")
    for b, (a, c, d, e) in enumerate(zip(offsets[0], offsets[0][1:], offsets[1], offsets[1][1:])):
        tq, tk = c - a, e - d
        if is_causal:
            validation.require(tq <= tk, lambda: f"is_causal needs Tq <= Tk in every sequence; sequence {b} has "
                               f"{tq} queries (cu_seqlens_q) and {tk} keys (cu_seqlens_k)")
        validation.require(tq == 0 or tk > 0, lambda: f"sequence {b} has {tq} queries and no keys (cu_seqlens_k)")
    return (max((b - a for a, b in zip(offsets[0], offsets[0][1:])), default=0),
            max((b - a for a, b in zip(offsets[1], offsets[1][1:])), default=0))


def check_max_lengths(seqs: Seqs, total_q: int, total_k: int) -> None:
    """max_seqlen_q/k >= 1 where the pack has rows: every backend checks it (a value on the host, no read of the
    offsets), so that all refuse the same calls; the Triton grids are sized by them."""
    for name, longest, total in (("max_seqlen_q", seqs.max_q, total_q), ("max_seqlen_k", seqs.max_k, total_k)):
        validation.require(longest >= 1 or total == 0, lambda: f"{name} must be >= 1 (the longest sequence's "
                           f"length, an upper bound is enough) for a pack of {total} rows, got {longest}")


def monotone(cu: Tensor) -> Tensor:
    """The running maximum of offsets, on their device (no host read): what the Triton kernels read, so that
    trusted offsets that decrease give sequences that do not overlap (the kernels clamp them into
    [0, rows] themselves)."""
    return cu if cu.numel() == 0 else cu.cummax(0).values


def effective(cu: list[int], total: int) -> list[int]:
    """Offsets read on the host as every backend reads them (see the module docstring): 0 first, then the
    running maximum clamped into [0, total]. Valid offsets come back unchanged."""
    out, running = [0], cu[0]
    for c in cu[1:]:
        running = max(running, c)
        out.append(min(max(running, 0), total))
    return out


def bounds(seqs: Seqs, total_q: int, total_k: int) -> list[tuple[int, int, int, int]]:
    """(q_start, q_end, k_start, k_end) of every sequence, read on the host (for the PyTorch backends), as
    `effective` reads the offsets."""
    q, k = torch.stack([seqs.cu_q, seqs.cu_k]).tolist()
    q, k = effective(q, total_q), effective(k, total_k)
    return list(zip(q, q[1:], k, k[1:]))


def segment_ids(cu: Tensor, total: int) -> Tensor:
    """The sequence of each of `total` rows (int64), B for a row past the last sequence, without a host sync:
    offsets read as `effective` reads them."""
    rows = torch.arange(total, device=cu.device, dtype=cu.dtype)
    # a row before the first offset is sequence 0's; clamping the offsets into [0, total] changes no count
    return (torch.searchsorted(monotone(cu), rows, right=True) - 1).clamp_min_(0)


def key_range(lk: Tensor, seqs: Optional[Seqs]) -> tuple[Tensor, Tensor]:
    """(min, max) of λk per (batch row, kv head) as fp32 (B, Hkv); per (sequence, kv head) for a pack, with
    one row more (B + 1, Hkv) for the keys past the last sequence. An empty sequence gets (+inf, -inf)."""
    if seqs is None:
        return lk.amin(dim=-1).float(), lk.amax(dim=-1).float()
    hkv, total = lk.shape[1], lk.shape[2]
    index = segment_ids(seqs.cu_k, total).expand(hkv, total)
    values = lk[0].float()
    lo = torch.full((hkv, seqs.count + 1), float("inf"), device=lk.device).scatter_reduce(1, index, values, "amin")
    hi = torch.full((hkv, seqs.count + 1), float("-inf"), device=lk.device).scatter_reduce(1, index, values, "amax")
    return lo.t().contiguous(), hi.t().contiguous()


def _packed(total: int, heads: int, dv: int, like: Tensor) -> Tensor:
    """A zeroed (1, heads, total, dv) view of packed (total, heads, dv) memory."""
    return empty_packed(total, heads, dv, like).zero_()


def visible_bounds(seq_bounds: list[tuple[int, int, int, int]], is_causal: bool) -> list[tuple[int, int, int, int]]:
    """The query rows of each sequence that see a key (the dense backends' softmax needs one): none without
    keys; causal, the last Tk (bottom-right alignment keeps every logit). The others keep output 0."""
    out = []
    for q0, q1, k0, k1 in seq_bounds:
        if k1 == k0:
            q0 = q1
        elif is_causal:
            q0 = max(q0, q1 - (k1 - k0))
        out.append((q0, q1, k0, k1))
    return out


# How much padding a group of sequences run as one batch may add: padded tokens <= this × real tokens.
# Batching matters on the CPU, where a call's cost at short lengths is mostly per-call overhead.
GROUP_WASTE = 1.25


def groups(seq_bounds: list[tuple[int, int, int, int]], is_causal: bool) -> list[list[int]]:
    """The sequences (indices) to run together as one right-padded batch, longest first. Only causal
    sequences with Tq = Tk share a batch: padding on the right is then invisible (a real query i sees keys
    j <= i, the padding starts past its own length). The others run alone; empty ones not at all."""
    alone, together = [], []
    for b, (q0, q1, k0, k1) in enumerate(seq_bounds):
        if q1 > q0:
            (together if is_causal and q1 - q0 == k1 - k0 else alone).append(b)
    together.sort(key=lambda b: seq_bounds[b][0] - seq_bounds[b][1])
    out, real = [], 0
    for b in together:
        n = seq_bounds[b][1] - seq_bounds[b][0]
        longest = seq_bounds[out[-1][0]][1] - seq_bounds[out[-1][0]][0] if out else 0
        if out and (len(out[-1]) + 1) * longest <= GROUP_WASTE * (real + n):
            out[-1].append(b)
            real += n
        else:
            out.append([b])
            real = n
    return out + [[b] for b in alone]


def _gather(t: Tensor, spans: list[tuple[int, int]], length: int) -> Tensor:
    """Rows spans[i] of a (1, H, total, ...) tensor as batch row i of (len(spans), H, length, ...), zero-padded."""
    out = t.new_zeros(len(spans), *t.shape[1:2], length, *t.shape[3:])
    for i, (start, stop) in enumerate(spans):
        out[i, :, :stop - start] = t[0, :, start:stop]
    return out


def _scatter(dst: Tensor, src: Tensor, spans: list[tuple[int, int]]) -> None:
    """The inverse of _gather: batch row i of src into rows spans[i] of dst (1, H, total, ...)."""
    for i, (start, stop) in enumerate(spans):
        dst[0, :, start:stop] = src[i, :, :stop - start]


# A dense call's fixed cost, in logits per head: consecutive sequences also share one masked dense pass
# (blocks()) when its logits exceed their own by at most GROUP_WASTE × theirs plus this many. A decode
# step of a serving batch (one query and a few hundred keys per sequence) is then a few passes instead of
# one backend call per sequence, whose Python and dispatch overhead was the whole cost
# (bench/results/cpu-fast-paths.md).
GROUP_SLACK = 1 << 16
# The most logits per head of such a pass (1 MiB of fp32): a long sequence runs alone, in its backend.
BLOCK_LOGITS = 1 << 18


def blocks(seq_bounds: list[tuple[int, int, int, int]]) -> list[list[int]]:
    """Runs of consecutive sequences (indices) with queries, each computed in one pass over the rows they
    span: n query rows against m key rows cost n·m logits, kept within GROUP_WASTE × the sequences' own
    Σ Tq·Tk + GROUP_SLACK and within BLOCK_LOGITS (a long sequence stays alone, and runs in its backend)."""
    out, real = [], 0
    for b, (q0, q1, k0, k1) in enumerate(seq_bounds):
        if q1 == q0:
            continue
        own = (q1 - q0) * (k1 - k0)
        if out:
            first = seq_bounds[out[-1][0]]
            span = (q1 - first[0]) * (k1 - first[2])
            if span <= min(GROUP_WASTE * (real + own) + GROUP_SLACK, BLOCK_LOGITS):
                out[-1].append(b)
                real += own
                continue
        out.append([b])
        real = own
    return out


def _block_forward(lq, lk, v, temperature, alibi_slopes, is_causal, seq_bounds, block):
    """(out, lse) of the query rows q0 of block[0] .. q1 of block[-1], its sequences' keys in one masked
    dense pass over the key rows they span (rows of no sequence of the block: out 0, lse +inf). Sequence s
    puts query i and key j at the bottom-right-aligned distance (i − q1_s) − (j − k1_s)."""
    h, hkv, dv = lq.shape[1], lk.shape[1], v.shape[-1]
    group = h // hkv
    (qa, _, ka, _), (_, qb, _, kb) = seq_bounds[block[0]], seq_bounds[block[-1]]
    dev, dt = lq.device, lq.dtype
    q_seq = torch.full((qb - qa,), -1, dtype=torch.long)
    k_seq = torch.full((kb - ka,), -2, dtype=torch.long)
    q_end = torch.zeros(qb - qa, dtype=torch.long)
    k_end = torch.zeros(kb - ka, dtype=torch.long)
    for b in block:  # host work on a few small tensors; the arithmetic below is one pass for the block
        q0, q1, k0, k1 = seq_bounds[b]
        q_seq[q0 - qa:q1 - qa], q_end[q0 - qa:q1 - qa] = b, q1
        k_seq[k0 - ka:k1 - ka], k_end[k0 - ka:k1 - ka] = b, k1
    q_seq, k_seq = q_seq.to(dev), k_seq.to(dev)
    seen = q_seq >= 0
    distance = ((torch.arange(qa, qb) - q_end)[:, None] - (torch.arange(ka, kb) - k_end)[None, :]).to(dev)
    hidden = q_seq[:, None] != k_seq[None, :]
    if is_causal:
        hidden |= distance < 0
    inv_t = (1.0 / temperature).view(hkv, group, 1, 1)
    logits = (lq[0, :, qa:qb].reshape(hkv, group, -1, 1) - lk[0, :, ka:kb].view(hkv, 1, 1, -1)).abs_().mul_(-inv_t)
    if alibi_slopes is not None:
        slopes = alibi_slopes.t()[:, q_seq.clamp_min(0)].view(hkv, group, -1, 1)
        logits -= slopes * distance.abs().to(dt)
    logits.masked_fill_(hidden, float("-inf"))
    row_max = logits.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)  # rows of no sequence see no key
    p = logits.sub_(row_max).exp_()
    row_sum = p.sum(-1, keepdim=True)
    o = (p.reshape(hkv, -1, kb - ka) @ v[0, :, ka:kb].to(dt)).view(hkv, group, -1, dv) / row_sum
    out = torch.where(seen[:, None], o.view(h, -1, dv), 0.0).to(v.dtype)
    lse = torch.where(seen, (row_max + row_sum.log()).view(h, -1), float("inf"))
    return out, lse


def forward_by_sequence(forward, lq, lk, v, temperature, alibi_slopes, is_causal, seqs: Seqs):
    """A dense backend forward over a pack, each sequence as if alone: (out, lse) in the pack's layout.
    Runs of short sequences (blocks()) share one masked pass; a sequence alone runs in `forward` on views
    of its rows (no copy). For the PyTorch backends."""
    h, total_q = lq.shape[1], lq.shape[2]
    check_max_lengths(seqs, total_q, lk.shape[2])
    out = _packed(total_q, h, v.shape[-1], v)
    # rows that see no key keep output 0 and lse +inf (see the module docstring)
    lse = torch.full((1, h, total_q), float("inf"), dtype=lq.dtype, device=lq.device)
    seq_bounds = visible_bounds(bounds(seqs, total_q, lk.shape[2]), is_causal)
    for block in blocks(seq_bounds):
        (qa, _, ka, _), (_, qb, _, kb) = seq_bounds[block[0]], seq_bounds[block[-1]]
        # a masked key still multiplies its V by 0: a non-finite V would reach the block's other sequences
        if len(block) > 1 and bool(torch.isfinite(v[0, :, ka:kb]).all()):
            out[0, :, qa:qb], lse[0, :, qa:qb] = _block_forward(lq, lk, v, temperature, alibi_slopes, is_causal,
                                                               seq_bounds, block)
            continue
        for b in block:
            q0, q1, k0, k1 = seq_bounds[b]
            slopes = None if alibi_slopes is None else alibi_slopes[b:b + 1]
            o, m = forward(lq[:, :, q0:q1], lk[:, :, k0:k1], v[:, :, k0:k1], temperature, slopes, is_causal)
            out[:, :, q0:q1], lse[:, :, q0:q1] = o, m
    return out, lse


def backward_by_sequence(backward, dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal, seqs: Seqs):
    """A dense backend backward run per group of sequences (as forward_by_sequence): the gradients in the
    pack's layout, summed over sequences for the temperature, one slope row per sequence. Padded rows carry
    a zero upstream gradient, so they add nothing."""
    hkv = lk.shape[1]
    dlq = torch.zeros(lq.shape, dtype=lq.dtype, device=lq.device)
    dlk = torch.zeros(lk.shape, dtype=lk.dtype, device=lk.device)
    dv = _packed(lk.shape[2], hkv, v.shape[-1], v)
    dtemp = torch.zeros_like(temperature)
    dalibi = None if alibi_slopes is None else torch.zeros_like(alibi_slopes)
    check_max_lengths(seqs, lq.shape[2], lk.shape[2])
    seq_bounds = visible_bounds(bounds(seqs, lq.shape[2], lk.shape[2]), is_causal)
    for group in groups(seq_bounds, is_causal):
        q_spans = [seq_bounds[b][:2] for b in group]
        k_spans = [seq_bounds[b][2:] for b in group]
        tq, tk = q_spans[0][1] - q_spans[0][0], k_spans[0][1] - k_spans[0][0]
        grads = backward(_gather(dout, q_spans, tq), _gather(lq, q_spans, tq), _gather(lk, k_spans, tk),
                         _gather(v, k_spans, tk), _gather(out, q_spans, tq), _gather(lse, q_spans, tq), temperature,
                         None if alibi_slopes is None else alibi_slopes[group], is_causal)
        _scatter(dlq, grads[0], q_spans)
        _scatter(dlk, grads[1], k_spans)
        _scatter(dv, grads[2], k_spans)
        dtemp += grads[3]
        if dalibi is not None:
            dalibi[group] = grads[4]
    return dlq, dlk, dv, dtemp, dalibi


def accepts_packs(by_sequence: Callable) -> Callable:
    """Decorator of a dense PyTorch backend function (forward or backward): the decorated one also takes a
    trailing `seqs` (positional or keyword) and runs a pack with `by_sequence` (forward_by_sequence or
    backward_by_sequence) over the dense function itself."""
    def decorate(dense: Callable) -> Callable:
        n_dense = len(inspect.signature(dense).parameters)

        @functools.wraps(dense)
        def run(*args, seqs: Optional[Seqs] = None):
            if len(args) > n_dense:
                args, seqs = args[:n_dense], args[n_dense]
            return dense(*args) if seqs is None else by_sequence(dense, *args, seqs)
        return run
    return decorate


def remove_translation(dlq: Tensor, dlk: Tensor, seqs: Seqs) -> tuple[Tensor, Tensor]:
    """reference.remove_translation for a pack: the shift of λ that changes nothing is per (sequence, kv
    head), so the mean violation is removed per sequence (docs/math.md §Attention logits)."""
    h, total_q = dlq.shape[1], dlq.shape[2]
    hkv, total_k = dlk.shape[1], dlk.shape[2]
    group = h // hkv
    dt = torch.float64 if dlq.dtype == torch.float64 else torch.float32
    q_rows = dlq[0].to(dt).view(hkv, group, total_q)
    k_rows = dlk[0].to(dt)
    q_seq, k_seq = segment_ids(seqs.cu_q, total_q), segment_ids(seqs.cu_k, total_k)
    # one column more for the rows past the last sequence (zero gradients: their shift is 0)
    sums = torch.zeros(hkv, seqs.count + 1, dtype=dt, device=dlq.device)
    sums.index_add_(1, q_seq, q_rows.sum(1)).index_add_(1, k_seq, k_rows)
    # the rows of each (index_add of ones: bincount would read its maximum on the host)
    counts = torch.zeros(seqs.count + 1, dtype=dt, device=dlq.device)
    counts.index_add_(0, q_seq, q_rows.new_full((total_q,), float(group)))
    counts.index_add_(0, k_seq, k_rows.new_ones(total_k))
    counts = counts.clamp_min_(1)
    shift = sums / counts
    q_new = q_rows - shift[:, None, :].index_select(2, q_seq)
    k_new = k_rows - shift.index_select(1, k_seq)
    return q_new.reshape(1, h, total_q).to(dlq.dtype), k_new.unsqueeze(0).to(dlk.dtype)


def as_packed(t: Tensor) -> Tensor:
    """A (1, H, total, D) tensor whose memory is packed (total, H, D): t itself when it is, else a copy (the
    layout the ops promise, and that their fake implementations describe)."""
    packed = t[0].movedim(1, 0)
    return t if packed.is_contiguous() else packed.contiguous().movedim(0, 1).unsqueeze(0)


def empty_packed(total: int, heads: int, dv: int, like: Tensor) -> Tensor:
    return like.new_empty(total, heads, dv).movedim(0, 1).unsqueeze(0)
