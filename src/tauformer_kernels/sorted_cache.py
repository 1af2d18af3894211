"""Decode with a sorted cache: one step of taumode attention without touching every cached key.

A `SortedCache` holds one layer's keys (λk) and values per (batch, kv head), for one query at the end of
the cache at a time (decode, SPEC §4). Its logit (SPEC §2, issue 10's slopes, bottom-right aligned):

    s_j = −|λq − λk_j| / T_h − m_{b,h}·(pos − j),     pos = length − 1 (the query sees every cached key)

Structure (a sqrt decomposition). Keys are appended to a short unsorted tail; every `block` keys the tail
is sealed into a block: its keys sorted by λk, and for every query head h of the group two scans over
them, ascending in λk (keys at or below a query) and descending (keys above), each partial sum kept
relative to its own reference key (`loglinear._scan`: the key with the largest partial logit among those
summed, so every exponent is ≤ 0). A step then costs, per block, one binary search and two row gathers,
plus dense attention over the tail:

    per decode step  O((T/C)·(log C + D) + C·D)     per head, C = block, D = Dv + 1
    append           O(D) per key, plus O(C·D·log C) per head once every C keys (sealing)

so about T/C + C rows of work instead of T (at T = 65536, C = 256: ≈ 2·256 rows instead of 65536).
Nothing exponentiates an absolute quantity: a query's factor for a block side is e^{(λ_ref − λq)/T +
m·(j_ref − pos)}, kept as a logarithm, and the blocks, both sides and the tail are combined with their max
subtracted, so temperatures down to 1e-4 and slopes up to 1 at any length stay finite and exact.

The scans depend on the temperatures and slopes: the cache is built for the ones given at creation
(one scan per query head, so its sums take H/Hkv times the memory of a per-kv-head table) and must be
rebuilt if they change; `attend` checks that it is called with the same ones.
"""
from __future__ import annotations

import torch

from .loglinear import _scan

# Keys per sealed block. √T-ish at the context lengths we decode at (1k–128k); 256 keeps the tail's dense
# attention and the per-block lookups about equal at 64k.
BLOCK = 256

_NEG_INF = float("-inf")


class SortedCache:
    """One layer's cache of (λk, v), sorted by λk in blocks, for exact decode in O(T/C + C) per step.

    temperature (H,) > 0 and alibi_slopes (B, H) or None are fixed for the life of the cache (see the
    module docstring). Keys arrive with `append(lk (B, Hkv, n), v (B, Hkv, n, Dv))`, n ≥ 1 (a prefill
    in one call, then one key per step); `attend(lq (B, H, 1), temperature, alibi_slopes)` returns
    out (B, H, 1, Dv) in v's dtype for a query at the end of the cache.
    """

    def __init__(self, temperature: torch.Tensor, num_kv_heads: int, alibi_slopes: torch.Tensor | None = None,
                 *, block: int = BLOCK):
        temperature = torch.as_tensor(temperature)
        if temperature.dim() != 1 or temperature.numel() % num_kv_heads != 0:
            raise ValueError(f"temperature must have shape (H,) with H a multiple of num_kv_heads="
                             f"{num_kv_heads}, got {tuple(temperature.shape)}")
        if not bool((temperature > 0).all()):
            raise ValueError("temperature must be > 0")
        if alibi_slopes is not None and (alibi_slopes.dim() != 2 or alibi_slopes.shape[1] != temperature.numel()):
            raise ValueError(f"alibi_slopes must have shape (B, H={temperature.numel()}), "
                             f"got {tuple(alibi_slopes.shape)}")
        if block < 2:
            raise ValueError(f"block must be ≥ 2, got {block}")
        self.heads, self.kv_heads, self.block = temperature.numel(), num_kv_heads, block
        self.group = self.heads // num_kv_heads
        self.temperature = temperature.detach().float().clone()
        self.alibi_slopes = None if alibi_slopes is None else alibi_slopes.detach().float().clone()
        self.length = 0
        self.sealed = 0  # blocks sealed
        self._batch = self._dv = self._dtype = None

    # ------------------------------------------------------------------------------------------------
    def _init_storage(self, lk: torch.Tensor, v: torch.Tensor):
        b, hkv, _ = lk.shape
        if self.alibi_slopes is not None and self.alibi_slopes.shape[0] != b:
            raise ValueError(f"alibi_slopes has batch {self.alibi_slopes.shape[0]}, keys have batch {b}")
        self._batch, self._dv, self._dtype, dev = b, v.shape[-1], v.dtype, lk.device
        g, d1 = self.group, self._dv + 1
        self.temperature = self.temperature.to(dev)
        self.inv_t = (1.0 / self.temperature).view(1, hkv, g)  # (1, Hkv, G)
        self.slope = None if self.alibi_slopes is None else self.alibi_slopes.to(dev).view(b, hkv, g)
        self.tail_lk = lk.new_empty(b, hkv, 0, dtype=torch.float32)
        self.tail_v = lk.new_empty(b, hkv, 0, self._dv, dtype=torch.float32)
        cap = 1
        # sealed blocks: sorted λk; per side (0: ascending prefix, 1: descending prefix) and query head,
        # the scanned sums [v, 1] and their reference coordinates (x: λ or −λ, y: key position)
        self.keys = lk.new_empty(cap, b, hkv, self.block, dtype=torch.float32)  # block-major: slices contiguous
        # block-major, so the sealed prefix is contiguous and a step reads whole rows by flat index
        self.sums = lk.new_empty(cap, 2, b, hkv, g, self.block, d1, dtype=torch.float32)
        self.ref_x = lk.new_empty(cap, 2, b, hkv, g, self.block, dtype=torch.float32)
        self.ref_y = None if self.slope is None else torch.empty_like(self.ref_x)

    def _grow(self, blocks: int):
        cap = self.keys.shape[0]
        if blocks <= cap:
            return
        new = max(blocks, 2 * cap)

        def grown(t, dim):
            if t is None:
                return None
            shape = list(t.shape)
            shape[dim] = new
            out = t.new_empty(shape)
            out.narrow(dim, 0, cap).copy_(t)
            return out

        self.keys = grown(self.keys, 0)
        self.sums = grown(self.sums, 0)
        self.ref_x = grown(self.ref_x, 0)
        self.ref_y = grown(self.ref_y, 0)

    def _seal(self, lk: torch.Tensor, v: torch.Tensor, first_pos: int):
        """Seal nb full blocks: lk (B, Hkv, nb, C), v (B, Hkv, nb, C, Dv) at positions first_pos + …"""
        b, hkv, nb, c = lk.shape
        g, d1 = self.group, self._dv + 1
        ks, perm = lk.sort(dim=-1)
        v1 = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
        w = v1.gather(-2, perm[..., None].expand(b, hkv, nb, c, d1))
        # both sides, per query head: (2, B, Hkv, G, nb, C)
        x = torch.stack([ks, -ks.flip(-1)])[:, :, :, None].expand(2, b, hkv, g, nb, c)
        w2 = torch.stack([w, w.flip(-2)])[:, :, :, None].expand(2, b, hkv, g, nb, c, d1)
        z = 2 * b * hkv * g * nb
        inv_t = self.inv_t[None, :, :, :, None].expand(2, b, hkv, g, nb).reshape(z, 1)
        y = slope = None
        if self.slope is not None:
            pos = (first_pos + perm + c * torch.arange(nb, device=lk.device).view(nb, 1)).float()
            y = torch.stack([pos, pos.flip(-1)])[:, :, :, None].expand(2, b, hkv, g, nb, c).reshape(z, c)
            slope = self.slope[None, :, :, :, None].expand(2, b, hkv, g, nb).reshape(z, 1)
        a, _, _, xr, yr, _ = _scan(x.reshape(z, c), y, None, w2.reshape(z, c, d1), inv_t, slope,
                                   monotone=slope is None)
        lo, hi = self.sealed, self.sealed + nb
        self._grow(hi)
        self.keys[lo:hi] = ks.permute(2, 0, 1, 3)
        self.sums[lo:hi] = a.view(2, b, hkv, g, nb, c, d1).permute(4, 0, 1, 2, 3, 5, 6)
        self.ref_x[lo:hi] = xr.view(2, b, hkv, g, nb, c).permute(4, 0, 1, 2, 3, 5)
        if slope is not None:
            self.ref_y[lo:hi] = yr.view(2, b, hkv, g, nb, c).permute(4, 0, 1, 2, 3, 5)
        self.sealed = hi

    # ------------------------------------------------------------------------------------------------
    def append(self, lk: torch.Tensor, v: torch.Tensor) -> None:
        """Append n ≥ 1 keys: lk (B, Hkv, n) fp32 λk, v (B, Hkv, n, Dv)."""
        if lk.dim() != 3 or v.dim() != 4 or lk.shape != v.shape[:3] or lk.shape[1] != self.kv_heads:
            raise ValueError(f"expected lk (B, Hkv={self.kv_heads}, n) and v (B, Hkv, n, Dv), "
                             f"got lk {tuple(lk.shape)}, v {tuple(v.shape)}")
        if lk.shape[-1] == 0:
            return
        if self._batch is None:
            self._init_storage(lk, v)
        elif lk.shape[0] != self._batch or v.shape[-1] != self._dv:
            raise ValueError(f"cache holds B={self._batch}, Dv={self._dv}; got lk {tuple(lk.shape)}, "
                             f"v {tuple(v.shape)}")
        tail_lk = torch.cat([self.tail_lk, lk.float()], dim=-1)
        tail_v = torch.cat([self.tail_v, v.float()], dim=-2)
        full = tail_lk.shape[-1] // self.block
        if full:
            b, hkv = tail_lk.shape[:2]
            n = full * self.block
            self._seal(tail_lk[..., :n].reshape(b, hkv, full, self.block),
                       tail_v[..., :n, :].reshape(b, hkv, full, self.block, self._dv), self.sealed * self.block)
            tail_lk, tail_v = tail_lk[..., n:].contiguous(), tail_v[..., n:, :].contiguous()
        self.tail_lk, self.tail_v = tail_lk, tail_v
        self.length += lk.shape[-1]

    def attend(self, lq: torch.Tensor, temperature: torch.Tensor | None = None,
               alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
        """out (B, H, 1, Dv) for lq (B, H, 1), a query at position length − 1 seeing every cached key.

        `temperature` and `alibi_slopes` are checked against the ones the cache was built for (a
        temperature of None skips the check; the slopes must match, None meaning none)."""
        if self.length == 0:
            raise ValueError("attend on an empty cache")
        b, hkv, g = self._batch, self.kv_heads, self.group
        if lq.shape != (b, self.heads, 1):
            raise ValueError(f"lq must have shape (B={b}, H={self.heads}, 1), got {tuple(lq.shape)}")
        if temperature is not None and not torch.equal(temperature.detach().float().to(self.temperature.device),
                                                       self.temperature):
            raise ValueError("the cache was built for other temperatures: rebuild it")
        if (alibi_slopes is None) != (self.slope is None) or (
                alibi_slopes is not None and not torch.equal(alibi_slopes.detach().float().view(b, hkv, g),
                                                             self.slope)):
            raise ValueError("the cache was built for other alibi_slopes: rebuild it")
        xq = lq.detach().float().view(b, hkv, g)
        pos = float(self.length - 1)
        inv_t, slope = self.inv_t, self.slope
        scales, vecs = [], []

        # sealed blocks: one binary search per block, the sums on each side of the query
        nb, c, d1 = self.sealed, self.block, self._dv + 1
        if nb:
            cnt = torch.searchsorted(self.keys[:nb], xq.expand(nb, b, hkv, g).contiguous(), right=True)
            cnt = cnt.permute(1, 2, 3, 0)  # (B, Hkv, G, nb): keys ≤ λq in each block
            # flat row of (block, side, b, h, g, position) in the block-major tables; an empty side
            # reads a finite row and gets scale −inf
            idx = torch.stack([cnt - 1, c - 1 - cnt], dim=-1).clamp_min_(0)  # (B, Hkv, G, nb, 2)
            lanes = 2 * b * hkv * g
            lane = (torch.arange(nb, device=xq.device).view(nb, 1) * lanes
                    + torch.arange(lanes, device=xq.device).view(2, b, hkv, g).permute(1, 2, 3, 0).reshape(-1, 2)
                    .view(b, hkv, g, 1, 2))
            rows = (lane * c + idx).reshape(-1)
            empty = torch.stack([cnt == 0, cnt == c], dim=-1)
            take = lambda t: t.view(-1).index_select(0, rows).view(b, hkv, g, nb, 2)  # noqa: E731
            q_coord = torch.stack([xq, -xq], dim=-1)[..., None, :]  # the side's coordinate of the query
            scale = (take(self.ref_x) - q_coord) * inv_t[..., None, None]
            if slope is not None:
                scale = scale + slope[..., None, None] * (take(self.ref_y) - pos)
            sums = self.sums.view(-1, d1).index_select(0, rows)
            scales.append(scale.masked_fill_(empty, _NEG_INF).reshape(b, hkv, g, 2 * nb))
            vecs.append(sums.view(b, hkv, g, 2 * nb, d1))

        # the unsealed tail: dense
        nt = self.tail_lk.shape[-1]
        if nt:
            s = -(xq[..., None] - self.tail_lk[:, :, None]).abs() * inv_t[..., None]  # (B, Hkv, G, nt)
            if slope is not None:
                first = self.length - nt
                dist = pos - torch.arange(first, self.length, device=xq.device, dtype=torch.float32)
                s = s - slope[..., None] * dist
            m = s.amax(-1, keepdim=True)
            p = torch.exp(s - m)
            tail_v1 = torch.cat([self.tail_v, self.tail_v.new_ones(b, hkv, nt, 1)], dim=-1)
            scales.append(m)
            vecs.append((p @ tail_v1)[..., None, :])  # (B, Hkv, G, 1, D + 1)

        scale = torch.cat(scales, dim=-1)  # (B, Hkv, G, parts)
        vec = torch.cat(vecs, dim=-2)  # (B, Hkv, G, parts, D + 1)
        top = scale.amax(-1, keepdim=True)  # finite: the cache is not empty
        total = (torch.exp(scale - top)[..., None] * vec).sum(-2)
        out = total[..., :-1] / total[..., -1:]
        return out.reshape(b, self.heads, 1, self._dv).to(self._dtype)
