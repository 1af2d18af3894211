"""Decode with a sorted cache: one step of taumode attention without touching every cached key.

A `SortedCache` holds one layer's keys (λk) and values per (batch, kv head), for one query at the end of
the cache at a time (decode, SPEC §4). Its logit (SPEC §2, issue 10's slopes, bottom-right aligned):

    s_j = −|λq − λk_j| / T_h − m_{b,h}·(pos − j),     pos = length − 1 (the query sees every cached key)

Structure (a log-structured merge of sorted blocks). Keys are written into a preallocated tail of
`block` = C slots; a full tail is sealed into a level-0 block, and when a level holds F = `fanout`
blocks they are merged into one block of the next level (sizes C, C·F, …, C·F^(levels−1)); the last
level is never merged and just grows. A block keeps its
keys sorted by λk and, for every query head h of the group, two scans over them, ascending in λk (the
keys at or below a query) and descending (the keys above). Entry k of a side holds the sum over its
first k keys of e^{φ_j − φ_ref}·[v_j, 1], where φ is the side's partial logit and ref the key with the
largest φ among those summed (`loglinear._scan`), so every exponent is ≤ 0; entry 0 is the empty sum,
whose reference is so low that it weighs exactly 0. A step costs, per block, one binary search and one
row gather per side, plus dense attention over the tail:

    per decode step  O((F·(levels − 1) + T/(C·F^(levels−1)))·(log T + D) + C·D)   per head, D = Dv + 1
    append           O(D) per key, plus a merge of F·size keys every F·size keys (amortised O(D·log T))

With the defaults (C = 512, F = 16, two levels) a step at T = 65536 reads at most 23 blocks (< 16 of 512
keys, 8 of 8192) and a tail of < 512 keys: a few hundred rows instead of 65536; at 128k, 31 blocks. Rows
gathered at random from tables of tens of MB cost a cache miss each, which is why blocks are merged
rather than left at C keys (256 blocks of 256 at 64k: 2–4× slower). Merging is bounded at two levels
because a merge is a latency spike on the step that triggers it, the re-sort and re-scan of F·size
keys: ~0.05 s for 4096 keys, ~0.1 s for 8192, but seconds for 65536. A level's step is a fixed number of tensor ops (one
searchsorted and one gather for all its blocks), since at these sizes a CPU step costs more in op
launches than in arithmetic.

Nothing exponentiates an absolute quantity: a query's factor for a block side is e^{(x_ref − x_q)/T +
m·(j_ref − pos)} (x = λ on the ascending side, −λ on the descending one), and the blocks, both sides and
the tail are combined with their max subtracted, so temperatures down to 1e-4 and slopes up to 1 at any
length stay finite and exact.

The scans depend on the temperatures and slopes: the cache is built for the ones given at creation
(one scan per query head, so its tables take about 2·H/Hkv + 1 times the bytes of the plain (V, λk)
cache, which the merged levels also hold, sorted, for their next merge)
and must be rebuilt if they change; `attend` checks that it is called with the same ones.
"""
from __future__ import annotations

import torch

from .loglinear import _scan

# Keys per level-0 block (the tail's length), blocks per merge, and block sizes. Measured at 64k (1 and 2
# threads, append + attend per step over a full merge period): C = 256, F = 16 0.44–0.50 ms; 512, 8
# 0.39–0.45; 512, 16 0.35–0.37; 1024, 8 0.36–0.38. A sequential tail is cheaper per key than the random
# rows of the blocks, so the tail may be long; a merge of C·F = 8192 keys costs ~0.1 s once per 8192 steps.
BLOCK = 512
FANOUT = 16
LEVELS = 2

# x_ref of an empty prefix (entry 0 of a side): its scale is about −1e30/T, so it weighs exactly 0, and
# being finite it multiplies that zero weight to 0 when the whole table row goes through one matmul.
_EMPTY_REF = -1e30


class _Level:
    """Up to `fanout` blocks of `size` keys (block-major, so the filled prefix is contiguous): the sorted
    λk (n, B, Hkv, S), the sorted [v, 1] and positions (kept for the next merge), and the scan tables
    (n, 2, B, Hkv, G, S + 1, width) with `base` (B, Hkv, G, n, 2), the flat row of each block side's entry 0."""

    def __init__(self, size: int, like: torch.Tensor, b: int, hkv: int, g: int, dv: int, width: int,
                 merged: bool, with_pos: bool):
        self.size, self.count, self.merged = size, 0, merged
        self.keys = like.new_empty(0, b, hkv, size)
        self.w = like.new_empty(0, b, hkv, size, dv + 1) if merged else None
        self.pos = like.new_empty(0, b, hkv, size) if merged and with_pos else None
        self.table = like.new_empty(0, 2, b, hkv, g, size + 1, width)
        self.base = like.new_empty(b, hkv, g, 0, 2, dtype=torch.long)

    def reserve(self, blocks: int) -> None:
        cap = self.keys.shape[0]
        if blocks <= cap:
            return
        new = max(blocks, 2 * cap)

        def grown(t):
            if t is None:
                return None
            out = t.new_empty(new, *t.shape[1:])
            out[:cap] = t
            return out

        self.keys, self.w, self.pos, self.table = map(grown, (self.keys, self.w, self.pos, self.table))
        # the descending side's entry index is S − (keys ≤ λq), so its base includes + S: a step's
        # rows are base + sign·count
        _, _, b, hkv, g, s1, _ = self.table.shape
        lanes = torch.arange(new * 2 * b * hkv * g, device=self.keys.device).view(new, 2, b, hkv, g)
        self.base = (lanes.permute(2, 3, 4, 0, 1) * s1 + torch.tensor([0, self.size], device=self.keys.device)).contiguous()

    def take_all(self):
        """The keys, [v, 1] and positions of all blocks as one unsorted run (B, Hkv, 1, count·S)."""
        n = self.count
        run = lambda t: None if t is None else t[:n].movedim(0, 2).reshape(*t.shape[1:3], 1, n * self.size, *t.shape[4:])  # noqa: E731
        out = run(self.keys), run(self.w), run(self.pos)
        self.count = 0
        return out


class SortedCache:
    """One layer's cache of (λk, v), in merged blocks sorted by λk, for exact decode in O(log T) blocks.

    temperature (H,) > 0 and alibi_slopes (B, H) or None are fixed for the life of the cache (see the
    module docstring; `block`, `fanout` and `levels` shape its structure, not its results; `capacity`,
    the number of keys expected, reserves the storage up front so that no step pays for a regrowth of the
    last level's tables). Keys arrive with `append(lk (B, Hkv, n), v (B, Hkv, n, Dv))`, n ≥ 1 (a prefill
    in one call, then one key per step); `attend(lq (B, H, 1), temperature, alibi_slopes)` returns
    out (B, H, 1, Dv) in v's dtype for a query at the end of the cache.
    """

    def __init__(self, temperature: torch.Tensor, num_kv_heads: int, alibi_slopes: torch.Tensor | None = None,
                 *, block: int = BLOCK, fanout: int = FANOUT, levels: int = LEVELS, capacity: int | None = None):
        temperature = torch.as_tensor(temperature)
        if temperature.dim() != 1 or temperature.numel() % num_kv_heads != 0:
            raise ValueError(f"temperature must have shape (H,) with H a multiple of num_kv_heads="
                             f"{num_kv_heads}, got {tuple(temperature.shape)}")
        if not bool((temperature > 0).all()):
            raise ValueError("temperature must be > 0")
        if alibi_slopes is not None and (alibi_slopes.dim() != 2 or alibi_slopes.shape[1] != temperature.numel()):
            raise ValueError(f"alibi_slopes must have shape (B, H={temperature.numel()}), "
                             f"got {tuple(alibi_slopes.shape)}")
        if block < 2 or fanout < 2 or levels < 1:
            raise ValueError(f"block and fanout must be ≥ 2 and levels ≥ 1, got block={block}, fanout={fanout}, "
                             f"levels={levels}")
        self.heads, self.kv_heads, self.block, self.fanout = temperature.numel(), num_kv_heads, block, fanout
        self.max_levels, self.capacity = levels, capacity
        self.group = self.heads // num_kv_heads
        self.temperature = temperature.detach().float().clone()
        self.alibi_slopes = None if alibi_slopes is None else alibi_slopes.detach().float().clone()
        self.length = 0
        self.n_tail = 0  # keys in the tail
        self.levels: list[_Level] = []
        self._batch = self._dv = self._dtype = None

    # ------------------------------------------------------------------------------------------------
    def _init_storage(self, lk: torch.Tensor, v: torch.Tensor):
        b, hkv, _ = lk.shape
        if self.alibi_slopes is not None and self.alibi_slopes.shape[0] != b:
            raise ValueError(f"alibi_slopes has batch {self.alibi_slopes.shape[0]}, keys have batch {b}")
        self._batch, self._dv, self._dtype, dev = b, v.shape[-1], v.dtype, lk.device
        g, c = self.group, self.block
        self.temperature = self.temperature.to(dev)
        self.inv_t = (1.0 / self.temperature).view(1, hkv, g)  # (1, Hkv, G)
        self.slope = None if self.alibi_slopes is None else self.alibi_slopes.to(dev).view(b, hkv, g)
        # a table row: [Σ e^{φ−φ_ref} v, Σ e^{φ−φ_ref}, x_ref, (y_ref with slopes)]
        self._width = self._dv + 2 + (self.slope is not None)
        self.tail_lk = torch.empty(b, hkv, c, device=dev)
        self.tail_v1 = torch.ones(b, hkv, c, self._dv + 1, device=dev)  # [v, 1]: the tail's denominator column
        # positions of the tail slots (with slopes) and pos − j of its last slots
        self.tail_pos = torch.arange(c, device=dev, dtype=torch.float32)
        self.tail_dist = torch.arange(c - 1, -1, -1, device=dev, dtype=torch.float32)
        self.side_sign = torch.tensor([1, -1], device=dev)
        self.inv_t_side = self.inv_t[..., None, None]  # (1, Hkv, G, 1, 1): broadcasts over (B, Hkv, G, nb, side)
        self.slope_side = None if self.slope is None else self.slope[..., None, None]

    def _store(self, level: _Level, lk: torch.Tensor, w: torch.Tensor, pos: torch.Tensor | None):
        """Sort and scan nb blocks into `level`: lk (B, Hkv, nb, S), w = [v, 1] (B, Hkv, nb, S, D + 1) fp32,
        pos (B, Hkv, nb, S) float positions (None without slopes)."""
        b, hkv, nb, c = lk.shape
        g, d1 = self.group, self._dv + 1
        ks, perm = lk.sort(dim=-1)
        w = w.gather(-2, perm[..., None].expand(b, hkv, nb, c, d1))
        # both sides, per query head: (2, B, Hkv, G, nb, S)
        x = torch.stack([ks, -ks.flip(-1)])[:, :, :, None].expand(2, b, hkv, g, nb, c)
        w2 = torch.stack([w, w.flip(-2)])[:, :, :, None].expand(2, b, hkv, g, nb, c, d1)
        z = 2 * b * hkv * g * nb
        inv_t = self.inv_t[None, :, :, :, None].expand(2, b, hkv, g, nb).reshape(z, 1)
        y = slope = None
        if pos is not None:
            pos = pos.gather(-1, perm)
            y = torch.stack([pos, pos.flip(-1)])[:, :, :, None].expand(2, b, hkv, g, nb, c).reshape(z, c)
            slope = self.slope[None, :, :, :, None].expand(2, b, hkv, g, nb).reshape(z, 1)
        a, _, _, xr, yr, _ = _scan(x.reshape(z, c), y, None, w2.reshape(z, c, d1), inv_t, slope,
                                   monotone=slope is None)
        lo, hi = level.count, level.count + nb
        level.reserve(hi)
        level.keys[lo:hi] = ks.movedim(2, 0)
        if level.merged:
            level.w[lo:hi] = w.movedim(2, 0)
        if level.pos is not None:
            level.pos[lo:hi] = pos.movedim(2, 0)
        new = level.table[lo:hi]  # (nb, 2, B, Hkv, G, S + 1, W)
        new[..., 0, :] = 0.0
        new[..., 0, d1] = _EMPTY_REF
        to_table = lambda t: t.view(2, b, hkv, g, nb, c, -1).permute(4, 0, 1, 2, 3, 5, 6)  # noqa: E731
        new[..., 1:, :d1] = to_table(a)
        new[..., 1:, d1] = to_table(xr)[..., 0]
        if pos is not None:
            new[..., 1:, d1 + 1] = to_table(yr)[..., 0]
        level.count = hi

    def _push(self, depth: int, lk: torch.Tensor, w: torch.Tensor, pos: torch.Tensor | None):
        """Add nb blocks of level `depth`'s size, merging each level that fills up into the next."""
        if depth == len(self.levels):
            size, merged = self.block * self.fanout ** depth, depth + 1 < self.max_levels
            level = _Level(size, self.tail_lk, self._batch, self.kv_heads, self.group, self._dv, self._width,
                           merged, pos is not None)
            if self.capacity:
                level.reserve(self.fanout if merged else -(-self.capacity // size))
            self.levels.append(level)
        level, i, nb = self.levels[depth], 0, lk.shape[2]
        if not level.merged:
            self._store(level, lk, w, pos)
            return
        while i < nb:
            take = min(nb - i, self.fanout - level.count)
            part = lambda t: None if t is None else t[:, :, i:i + take]  # noqa: E731
            self._store(level, part(lk), part(w), part(pos))
            i += take
            if level.count == self.fanout:
                self._push(depth + 1, *level.take_all())

    # ------------------------------------------------------------------------------------------------
    def append(self, lk: torch.Tensor, v: torch.Tensor) -> None:
        """Append n ≥ 1 keys: lk (B, Hkv, n) fp32 λk, v (B, Hkv, n, Dv)."""
        if lk.dim() != 3 or v.dim() != 4 or lk.shape != v.shape[:3] or lk.shape[1] != self.kv_heads:
            raise ValueError(f"expected lk (B, Hkv={self.kv_heads}, n) and v (B, Hkv, n, Dv), "
                             f"got lk {tuple(lk.shape)}, v {tuple(v.shape)}")
        n = lk.shape[-1]
        if n == 0:
            return
        if self._batch is None:
            self._init_storage(lk, v)
        elif lk.shape[0] != self._batch or v.shape[-1] != self._dv:
            raise ValueError(f"cache holds B={self._batch}, Dv={self._dv}; got lk {tuple(lk.shape)}, "
                             f"v {tuple(v.shape)}")
        b, hkv = lk.shape[:2]
        c, i, slopes = self.block, 0, self.slope is not None
        while i < n:
            start = self.length + i  # position of key i
            if self.n_tail == 0 and n - i >= c:  # whole blocks straight from the input (a prefill)
                full = (n - i) // c
                j = i + full * c
                w = torch.cat([v[..., i:j, :].float(), v.new_ones(b, hkv, j - i, 1, dtype=torch.float32)], -1)
                pos = (start + torch.arange(j - i, device=lk.device, dtype=torch.float32)).expand(b, hkv, -1)
                self._push(0, lk[..., i:j].float().reshape(b, hkv, full, c), w.view(b, hkv, full, c, -1),
                           pos.reshape(b, hkv, full, c) if slopes else None)
                i = j
                continue
            take = min(c - self.n_tail, n - i)
            lo, hi = self.n_tail, self.n_tail + take
            self.tail_lk[..., lo:hi] = lk[..., i:i + take]
            self.tail_v1[..., lo:hi, :-1] = v[..., i:i + take, :]
            self.n_tail, i = hi, i + take
            if self.n_tail == c:
                first = start + take - c
                pos = (first + self.tail_pos).expand(b, hkv, 1, c) if slopes else None
                self._push(0, self.tail_lk[:, :, None], self.tail_v1[:, :, None], pos)
                self.n_tail = 0
        self.length += n

    @property
    def nbytes(self) -> int:
        """Bytes held (capacity included)."""
        held = [self.tail_lk, self.tail_v1] if self._batch is not None else []
        for lev in self.levels:
            held += [t for t in (lev.keys, lev.w, lev.pos, lev.table, lev.base) if t is not None]
        return sum(t.nbytes for t in held)

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
        inv_t, slope, d1, nt = self.inv_t, self.slope, self._dv + 1, self.n_tail
        q_side = xq[..., None] * self.side_sign  # the query's coordinate on each side (B, Hkv, G, 2)
        tops, totals = [], []  # per part: its max scale (B, Hkv, G) and its sums relative to it (B, Hkv, G, D + 1)

        gathered = []  # per level: one binary search per block, one gather for all its block sides
        for level in self.levels:
            nb = level.count
            if nb == 0:
                continue
            cnt = torch.searchsorted(level.keys[:nb], xq.expand(nb, b, hkv, g).contiguous(), right=True)
            # rows in (B, Hkv, G, nb, side) order, so that each lane's rows are one matrix for the matmul
            rows = torch.addcmul(level.base[:, :, :, :nb], cnt.permute(1, 2, 3, 0)[..., None], self.side_sign)
            gathered.append(level.table.view(-1, self._width).index_select(0, rows.reshape(-1))
                            .view(*rows.shape, -1))
        if gathered:  # all the levels' rows at once: (B, Hkv, G, blocks, side, W)
            got = gathered[0] if len(gathered) == 1 else torch.cat(gathered, dim=3)
            scale = (got[..., d1] - q_side[..., None, :]) * self.inv_t_side
            if slope is not None:
                scale = torch.addcmul(scale, self.slope_side, got[..., d1 + 1] - pos)
            top = scale.amax(dim=(-2, -1))  # finite: one side of every block holds keys
            tops.append(top)
            # the whole row, x_ref and y_ref columns included: entry 0's x_ref (−1e30) meets weight 0
            weight = torch.exp(scale - top[..., None, None]).view(b, hkv, g, 1, -1)
            totals.append((weight @ got.view(b, hkv, g, weight.shape[-1], -1))[..., 0, :d1])

        if nt:  # the tail: dense
            s = (xq[..., None] - self.tail_lk[:, :, None, :nt]).abs_().mul_(-inv_t[..., None])  # (B, Hkv, G, nt)
            if slope is not None:
                s -= slope[..., None] * self.tail_dist[self.block - nt:]
            top = s.amax(-1)
            tops.append(top)
            totals.append(torch.exp(s - top[..., None]) @ self.tail_v1[:, :, :nt])

        if len(tops) == 1:
            total = totals[0]
        else:
            top = torch.stack(tops, dim=-1)
            total = (torch.exp(top - top.amax(-1, keepdim=True))[..., None, :] @ torch.stack(totals, dim=-2))[..., 0, :]
        out = total[..., :-1] / total[..., -1:]
        return out.reshape(b, self.heads, 1, self._dv).to(self._dtype)
