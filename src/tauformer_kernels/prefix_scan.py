"""Stable prefix sums of exp-weighted rows: the scan behind sorted attention (docs/math.md §Sorted
(loglinear) attention, "Stability (the general scan)").

Items r = 0 … n − 1 (keys sorted by λk; in the backward's transposed problem, queries sorted by λq) carry
weights w_r (rows such as [v_r, 1]) and a partial logit

    φ_r = lam_r·inv_t + slope·pos_r + offset_r

(lam a λ-like coordinate, pos a position, offset a log-offset such as −lse; the last two optional). A
lookup between items needs Σ_{r ≤ p} e^{φ_r}·w_r, which overflows fp32 as soon as φ spans ~88 nats (1/T up
to 1e4, or λ = key positions). `prefix_sums` returns each prefix sum relative to its own reference,

    ref(p) = argmax_{r ≤ p} φ_r,     sums_p = Σ_{r ≤ p} e^{φ_r − φ_ref(p)}·w_r,

and the coordinates of ref(p); the caller multiplies by e^{φ_ref(p) − (its own reference)} ≤ 1.

Exact: e^{φ_ref(p)}·sums_p is the plain sum, term by term; nothing is dropped or approximated. Stable:
every exponent is ≤ 0 and the term r = ref(p) is exactly 1·w_r, so no prefix sum overflows, and none
vanishes while its dominant term is representable. Every exponent is formed from differences of
coordinates, (lam_r − lam_ref)·inv_t, never from lam·inv_t itself, so λ far outside [0, 1) keeps its
precision. `two_sided_sums` runs the two scans a split-point lookup needs: the keys at or below a query
(ascending λ) and those above it (descending λ, coordinate −λ).

Blocked, so that no loop runs over items: inside each chunk of `chunk` items the sums are one batched
product with dense lower-triangular chunk × chunk weights; the chunk totals are scanned the same way,
recursively (log_chunk(n) rounds), and carried into the next chunk.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# Items per chunk of the blocked scan: dense CHUNK × CHUNK weights inside each chunk.
CHUNK = 32

# Exponents are ≤ 0 in exact arithmetic, up to the rounding of the reference choice. The cap only bites
# for items that weigh nothing (w = 0 with log-offset ~ −1e30), whose fp32 φ cannot order them.
_EXP_CAP = 30.0


class PrefixSums(NamedTuple):
    """What `prefix_sums` returns; entry p of each field is about the items r ≤ p.

    sums        (Z, n, D)  Σ_{r ≤ p} e^{φ_r − φ_ref(p)}·w_r
    lam_moment  (Z, n, D)  Σ_{r ≤ p} e^{φ_r − φ_ref(p)}·(lam_ref(p) − lam_r)·w_r   (None without moments)
    pos_moment  (Z, n, D)  the same with pos                      (None without moments or positions)
    ref_lam     (Z, n)     lam of ref(p)
    ref_pos     (Z, n)     pos of ref(p)                          (None without positions)
    ref_offset  (Z, n)     offset of ref(p)                       (None without offsets)
    """
    sums: torch.Tensor
    lam_moment: torch.Tensor | None
    pos_moment: torch.Tensor | None
    ref_lam: torch.Tensor
    ref_pos: torch.Tensor | None
    ref_offset: torch.Tensor | None


class _Coords(NamedTuple):
    """The coordinates of items (or of their references) that φ is made of; pos and offset optional."""
    lam: torch.Tensor
    pos: torch.Tensor | None
    offset: torch.Tensor | None

    def map(self, fn) -> "_Coords":
        """fn applied to every coordinate that is present."""
        return _Coords(*(None if t is None else fn(t) for t in self))


def _phi_diff(inv_t, slope, a: _Coords, b: _Coords):
    """φ_a − φ_b, formed from differences of the coordinates so that a large lam·inv_t never appears."""
    diff = (a.lam - b.lam) * inv_t
    if slope is not None and a.pos is not None:
        diff = diff + slope * (a.pos - b.pos)
    if a.offset is not None:
        diff = diff + (a.offset - b.offset)
    return diff


def _running_refs(items: _Coords, inv_t, slope) -> _Coords:
    """The coordinates of ref(p) = argmax_{r ≤ p} φ_r, (Z, n) each.

    φ is only needed to order the items, so it is taken relative to the first item, and the offsets
    relative to their largest: huge negative offsets (−lse of queries that weigh nothing) cannot then
    swamp the other terms."""
    anchor = _Coords(items.lam[:, :1],
                     None if items.pos is None else items.pos[:, :1],
                     None if items.offset is None else items.offset.amax(-1, keepdim=True))
    ref = torch.cummax(_phi_diff(inv_t, slope, items, anchor), dim=-1).indices

    def at_ref(t):
        return t.gather(1, ref)

    return items.map(at_ref)


def _chunked(t, size, fill=None):
    """(Z, n, …) as (Z, ⌈n/size⌉, size, …), padded at the end with `fill`, or where `fill` is None with
    copies of the last entry (finite coordinates, never read by a real position)."""
    z, n = t.shape[:2]
    pad = -n % size
    if pad:
        tail = t[:, -1:].expand(z, pad, *t.shape[2:]) if fill is None else t.new_full((z, pad, *t.shape[2:]), fill)
        t = torch.cat([t, tail], dim=1)
    return t.reshape(z, (n + pad) // size, size, *t.shape[2:])


def _item_index(t):
    """A chunked coordinate (Z, chunks, size) as the item index r of a (…, p, r) weight matrix."""
    return t[:, :, None, :]


def _prefix_index(t):
    """A chunked coordinate (Z, chunks, size) as the prefix index p of a (…, p, r) weight matrix."""
    return t[:, :, :, None]


def _within_chunks(items: _Coords, refs: _Coords, weights, inv_t, slope, moments):
    """The sums over the items r ≤ p of p's own chunk: [sums, lam_moment, pos_moment] (Z, chunks, size, D),
    the moments None where not asked for. items and refs are chunked (Z, chunks, size)."""
    z, _, size = items.lam.shape
    inv_t = inv_t.view(z, 1, 1, 1)
    slope = None if slope is None else slope.view(z, 1, 1, 1)
    col, row = items.map(_item_index), refs.map(_prefix_index)
    exponent = _phi_diff(inv_t, slope, col, row)  # φ_r − φ_ref(p), ≤ 0 for r ≤ p
    causal = torch.ones(size, size, dtype=torch.bool, device=weights.device).tril()
    factor = torch.exp(exponent.masked_fill(~causal, float("-inf")).clamp_max_(_EXP_CAP))
    sums = [factor @ weights, None, None]
    if moments:
        sums[1] = (factor * (row.lam - col.lam)) @ weights
        if items.pos is not None:
            sums[2] = (factor * (row.pos - col.pos)) @ weights
    return sums


def _add_earlier_chunks(sums, refs: _Coords, inv_t, slope, chunk):
    """Add to every position of chunks 1, 2, … the sums over all earlier chunks (in place).

    The earlier chunks' totals are themselves a prefix scan, over the chunks' last positions: their
    references are running maxima, so φ is non-decreasing along them and the scan needs no cummax.
    Chunk k receives that scan's entry k − 1, moved from the reference of chunk k − 1's end to its own
    references by the factor e^{φ_end − φ_ref(p)} ≤ 1."""
    total, lam_moment, pos_moment = sums
    z, d = total.shape[0], total.shape[-1]
    moments = lam_moment is not None
    ends = refs.map(_last_of_chunk)
    carried = prefix_sums(ends.lam, torch.cat([t[:, :, -1] for t in sums if t is not None], dim=-1), inv_t,
                          pos=ends.pos, slope=slope, offset=ends.offset, moments=moments, monotone=True,
                          chunk=chunk)
    prev, here = ends.map(_before_next_chunk), refs.map(_from_second_chunk)
    factor = torch.exp(_phi_diff(inv_t.view(z, 1, 1), None if slope is None else slope.view(z, 1, 1), prev, here)
                       .clamp_max_(_EXP_CAP))[..., None]
    before = carried.sums[:, :-1, None, :]  # [sums, lam_moment, pos_moment] of the chunks up to k − 1
    total[:, 1:] += factor * before[..., :d]
    if moments:
        # Σ e·(lam_ref(p) − lam_r)·w = factor·[(lam_ref(p) − lam_end)·S + Σ e·(lam_end − lam_r)·w], the last
        # sum being the earlier chunks' own moments plus the correction between their references
        lam_part = before[..., d:2 * d] + carried.lam_moment[:, :-1, None, :d]
        lam_moment[:, 1:] += factor * (lam_part + (here.lam - prev.lam)[..., None] * before[..., :d])
        if pos_moment is not None:
            pos_part = before[..., 2 * d:3 * d] + carried.pos_moment[:, :-1, None, :d]
            pos_moment[:, 1:] += factor * (pos_part + (here.pos - prev.pos)[..., None] * before[..., :d])


def _last_of_chunk(t):
    return t[:, :, -1]


def _before_next_chunk(t):
    """Per-chunk values (Z, chunks) of chunks 0 … −2, broadcast over the positions of chunks 1 … −1."""
    return t[:, :-1, None]


def _from_second_chunk(t):
    return t[:, 1:]


def prefix_sums(lam, weights, inv_t, *, pos=None, slope=None, offset=None, moments=False, monotone=False,
                chunk=CHUNK) -> PrefixSums:
    """Prefix sums of e^{φ_r}·w_r, each relative to its own reference (see the module docstring).

    lam (Z, n) coordinate; weights (Z, n, D); inv_t (Z, 1); pos (Z, n) and slope (Z, 1) for the position
    term (both or neither); offset (Z, n) or None. φ_r = lam_r·inv_t + slope·pos_r + offset_r. With
    `moments`, also the first moments in lam (and in pos, with positions), relative to ref(p): the
    derivatives the backward needs. `monotone`: the caller knows φ is non-decreasing along r (no
    positions or offsets, lam ascending, inv_t ≥ 0), so ref(p) = p and the reference coordinates
    returned are the inputs themselves. Returns a `PrefixSums`; n ≥ 1; weights and coordinates share a
    floating dtype, in which everything is computed.
    """
    z, n, d = weights.shape
    items = _Coords(lam, pos, offset)
    refs = items if monotone else _running_refs(items, inv_t, slope)
    size = min(chunk, n)

    def chunked(t):
        return _chunked(t, size)

    refs_chunked = refs.map(chunked)
    sums = _within_chunks(items.map(chunked), refs_chunked, _chunked(weights, size, 0.0), inv_t, slope, moments)
    if sums[0].shape[1] > 1:
        _add_earlier_chunks(sums, refs_chunked, inv_t, slope, chunk)
    per_item = [None if t is None else t.reshape(z, -1, d)[:, :n] for t in sums]
    return PrefixSums(*per_item, *refs)


def two_sided_sums(lam, weights, inv_t, *, pos=None, slope=None, offset=None, moments=False,
                   chunk=CHUNK) -> tuple[PrefixSums, PrefixSums]:
    """The two scans of items sorted by λ that a split-point lookup reads: (ascending, descending).

    lam (*batch, n) sorted ascending; weights (*batch, n, D); inv_t (*batch, 1); pos and offset
    (*batch, n) and slope (*batch, 1), or None. Every argument has all the batch dimensions, which
    broadcast (size 1 where shared, e.g. keys shared by the query heads of a group): one scan runs per
    entry of the broadcast batch, and the shared inputs are copied once, into the scans' layout.

    ascending is `prefix_sums` of the items in order (entry p: the p + 1 smallest λ, φ = λ·inv_t + …);
    descending is that of the items reversed, in the coordinate −λ (entry p: the p + 1 largest λ,
    φ = −λ·inv_t + …; its ref_lam is −λ of the reference). For a lookup at λq the logit −|λq − λ|·inv_t
    is φ − λq·inv_t on the ascending side (λ ≤ λq) and φ + λq·inv_t on the descending side (λ > λq).
    Without positions and offsets φ is monotone on both sides. Both sides run as one batched scan. The
    fields of each side's PrefixSums have the shapes (*batch, n, …).
    """
    present = [t for t in (pos, slope, offset) if t is not None]
    batch = torch.broadcast_shapes(lam.shape[:-1], weights.shape[:-2], inv_t.shape[:-1],
                                   *(t.shape[:-1] for t in present))

    def problems(sides, *tail):  # (2, *batch broadcastable, *tail) → (2·problems, *tail)
        return sides.expand(2, *batch, *tail).reshape(-1, *tail)

    def both_orders(t, item_dim=-1):  # the items in order and reversed
        return None if t is None else problems(torch.stack([t, t.flip(item_dim)]), *t.shape[item_dim:])

    def both_sides(t):  # a per-problem scalar, the same on both sides
        return None if t is None else problems(t[None], 1)

    both = prefix_sums(problems(torch.stack([lam, -lam.flip(-1)]), lam.shape[-1]), both_orders(weights, -2),
                       both_sides(inv_t), pos=both_orders(pos), slope=both_sides(slope), offset=both_orders(offset),
                       moments=moments, monotone=(pos is None or slope is None) and offset is None, chunk=chunk)

    def side(k):
        return PrefixSums(*(None if t is None else t.reshape(2, *batch, *t.shape[1:])[k] for t in both))

    return side(0), side(1)
