"""Decode with a sorted cache: one step of taumode attention without touching every cached key.

A `SortedCache` holds one layer's keys (λk) and values per (batch, kv head), for one query at the end of
the cache at a time (decode: docs/math.md §The λ cache, and §Sorted (loglinear) attention, "Decode with a
sorted cache"). Its logit (docs/math.md §Attention logits, with recency slopes, bottom-right aligned):

    s_j = −|λq − λk_j| / T_h − m_{b,h}·(pos − j),     pos = length − 1 (the query sees every cached key)

Structure (a log-structured merge of sorted blocks). Keys are written into a `recent` buffer of
C·F^(levels−1) slots (C = `block`, F = `fanout`). Every C keys the last C are sealed into a level-0
block; every C·F keys the level-0 blocks are dropped and the last C·F keys form one level-1 block; and so
on, until the buffer is full: its keys form one block of the last level, which is never merged, and the
buffer starts over. A block is always formed from a contiguous run of the buffer, so a merge is a sort
and scan of that run, never a combination of tables. A block keeps its keys sorted by λk and, for every
query head h of the group, two scans over them, ascending in λk (the keys at or below a query) and
descending (the keys above). Entry k of a side holds the sum over its first k keys of e^{φ_j −
φ_ref}·[v_j, 1], where φ is the side's partial logit and ref the key with the largest φ among those
summed (`prefix_scan.two_sided_sums`), so every exponent is ≤ 0; entry 0 is the empty sum, whose
reference is so far away that it weighs exactly 0.

One table holds everything a step reads, as rows [Σ e^{φ−φ_ref}·v, Σ e^{φ−φ_ref}, λ_ref, (j_ref)]: for a
query with k keys of a block at or below it, the block contributes e^{−|λ_ref − λq|/T − m·(pos − j_ref)}
times two rows, the ascending entry k and the descending entry C − k, stored side by side. A key of the
tail (the keys not yet in a block, < C) is a row of its own, [v_j, 1, λ_j, j] with the same factor, so
the recent buffer lives in the table too, two keys to a pair of rows. A step is then a fixed handful of
tensor ops whatever the levels: one `searchsorted` over all blocks' keys (each block's padded with +inf
to the largest size), one row gather for all blocks and the tail, one exp, one matmul:

    per decode step  O((F·(levels − 1) + T/(C·F^(levels−1)))·(log T + D) + C·D)   per head, D = Dv + 1
    append           O(D) per key, plus a sort and scan (per query head) of C·F^d keys every C·F^d keys for
                     each level d: amortised O(levels·G·D) per key

With the defaults (C = 32, F = 16, three levels) a step at T ≈ 65536 reads at most 38 pairs of rows per
head for the blocks (8 of 8192 keys, ≤ 15 of 512, ≤ 15 of 32) and 16 for the tail, instead of 65536 keys.

The blocks form a stack: a block of level d only ever appears when every level below d is empty (their
keys have just been merged into it), so the deepest blocks sit at the bottom and a step reads a prefix of
every buffer. At these sizes a CPU step costs more in op launches and cache misses than in arithmetic:
rows gathered from tables of tens of MB cost a miss each, which is why blocks are merged rather than
left at C keys. Merging is bounded (the default is three levels) because a merge is a latency spike on
the step that triggers it: the sort and scan of C·F^(levels−1) keys, ~0.1 s for 8192.

Nothing exponentiates an absolute quantity: every factor is e^{−|λ_ref − λq|/T − m·(pos − j_ref)} ≤ 1
relative to the step's largest, so temperatures down to 1e-4 and slopes up to 1 stay finite and exact
at any length (up to 2^24 keys with slopes: positions are float32).

The scans depend on the temperatures and slopes: the cache is built for the ones given at creation
(one scan per query head, so its tables take about 2·H/Hkv times the bytes of the plain (V, λk) cache,
plus the recent buffer and the blocks' keys, each padded to the largest block) and must be rebuilt if
they change; `attend` checks the ones it is given (none: no check).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from .prefix_scan import two_sided_sums

# Keys per level-0 block (the longest tail; even, two tail keys share a gathered pair of rows), blocks
# per merge, and levels: blocks of 32, 512 and 8192 keys. Measured at 64k, per step with λ over a whole
# period, interleaved (kernels/NOTES.md, "Sorted-cache decode"): 32/16/3 0.33–0.41 ms, 64/16/3 0.32–0.43,
# 64/8/3 0.33–0.43, 128/8/3 0.33–0.35, 256/8/3 0.36–0.41, 512/16/2 0.45–0.47, 64/8/4 0.40–0.50; the
# largest block's formation is the worst step's spike (8192 keys ~0.1 s, 16384 ~0.2 s).
BLOCK = 32
FANOUT = 16
LEVELS = 3

# λ_ref of an empty prefix (entry 0 of a side) and of a tail slot not yet written: its factor is about
# e^{−1e30/T} = 0 exactly, and being finite it multiplies that zero weight to 0 in the matmul.
_EMPTY_REF = -1e30

# Positions (for the slopes) are float32: exact integers up to 2^24.
_MAX_POSITIONS = 2 ** 24


class SortedCache:
    """One layer's cache of (λk, v), in merged blocks sorted by λk, for exact decode in O(log T) blocks.

    temperature (H,) > 0 and alibi_slopes (B, H) or None are fixed for the life of the cache (see the
    module docstring); `block` (even), `fanout` and `levels` shape its structure, not its results;
    `capacity`, the number of keys expected, reserves the storage up front so that no step pays for a
    regrowth, and drops the levels whose blocks would hold more keys than that (more keys may still
    come). Keys arrive with `append(lk (B, Hkv, n), v (B, Hkv, n, Dv))`, n ≥ 1 (a prefill in one
    call, then one key per step); `attend(lq (B, H, 1), temperature, alibi_slopes)` returns out
    (B, H, 1, Dv) in the dtype of the first appended v, for a query at the end of the cache (computed in
    fp32). A non-finite λq gives NaN, as the dense softmax does.
    """

    def __init__(self, temperature: torch.Tensor, num_kv_heads: int, alibi_slopes: torch.Tensor | None = None,
                 *, block: int = BLOCK, fanout: int = FANOUT, levels: int = LEVELS, capacity: int | None = None):
        temperature = torch.as_tensor(temperature)
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1:
            raise ValueError(f"num_kv_heads must be an int >= 1, got {num_kv_heads!r}")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be None or an int >= 1 (the keys expected), got {capacity!r}")
        if temperature.dim() != 1 or temperature.numel() % num_kv_heads != 0:
            raise ValueError(f"temperature must have shape (H,) with H a multiple of num_kv_heads="
                             f"{num_kv_heads}, got {tuple(temperature.shape)}")
        if not bool((temperature > 0).all()):
            raise ValueError("temperature must be > 0")
        if alibi_slopes is not None and (alibi_slopes.dim() != 2 or alibi_slopes.shape[1] != temperature.numel()):
            raise ValueError(f"alibi_slopes must have shape (B, H={temperature.numel()}), "
                             f"got {tuple(alibi_slopes.shape)}")
        if block < 2 or block % 2 or fanout < 2 or levels < 1:
            raise ValueError(f"block must be even and ≥ 2, fanout ≥ 2 and levels ≥ 1, got block={block}, "
                             f"fanout={fanout}, levels={levels}")
        self.heads, self.kv_heads, self.group = temperature.numel(), num_kv_heads, temperature.numel() // num_kv_heads
        if capacity:
            # no level whose blocks are larger than the keys expected: the recent buffer (the largest
            # block's keys, kept in the table) stays ≤ capacity, and a short cache is small
            while levels > 1 and block * fanout ** (levels - 1) > capacity:
                levels -= 1
        self.block, self.fanout, self.levels, self.capacity = block, fanout, levels, capacity
        self.sizes = [block * fanout ** d for d in range(levels)]  # keys per block of each level
        self.temperature = temperature.detach().float().clone()
        self.alibi_slopes = None if alibi_slopes is None else alibi_slopes.detach().float().clone()
        # attend skips comparing the temperature and slopes it is given with these when they are the very
        # tensors given here, unmodified (same version counter; a write through .data is not seen)
        given = {"temperature": temperature, "alibi_slopes": alibi_slopes}
        self._given = {name: (t, t._version) for name, t in given.items() if t is not None}
        self.length = 0
        self.n_recent = 0  # keys in the recent buffer
        self.blocks: list[tuple[int, int]] = []  # the stack, bottom first: (level, first table row)
        self._batch = self._dv = self._dtype = None

    @property
    def n_tail(self) -> int:
        """Keys attended one by one: those of the recent buffer not yet sealed into a block."""
        return self.n_recent % self.block

    def block_sizes(self) -> list[int]:
        """Keys per block, bottom of the stack first."""
        return [self.sizes[level] for level, _ in self.blocks]

    # ------------------------------------------------------------------------------------------------
    def _init_storage(self, lk: torch.Tensor, v: torch.Tensor):
        b, hkv, _ = lk.shape
        if self.alibi_slopes is not None and self.alibi_slopes.shape[0] != b:
            raise ValueError(f"alibi_slopes has batch {self.alibi_slopes.shape[0]}, keys have batch {b}")
        self._batch, self._dv, self._dtype, dev = b, v.shape[-1], v.dtype, lk.device
        g, top = self.group, self.sizes[-1]
        self.temperature = self.temperature.to(dev)
        inv_t = (1.0 / self.temperature).view(1, hkv, g)
        self.slope = None if self.alibi_slopes is None else self.alibi_slopes.to(dev).view(b, hkv, g)
        # broadcast over a step's gathered (B, Hkv, G, items, pair): the factor's −1/T and slope
        self.neg_inv_t = -inv_t[..., None, None]
        self.slope_pair = None if self.slope is None else self.slope[..., None, None]
        self.inv_t = inv_t
        # a row: [Σ e^{φ−φ_ref} v, Σ e^{φ−φ_ref}, λ_ref, (j_ref with slopes)]
        self._width = self._dv + 2 + (self.slope is not None)
        self._lanes = b * hkv * g
        # the table (pairs, 2, W): first the recent buffer, (B, Hkv, top/2) pairs of tail keys; then the
        # blocks, a stack of rows, a block of level d taking lanes·(size_d + 1) pairs (see _push); then
        # spare pairs, since a non-finite λq may count up to `top` keys in any block.
        self._recent_pairs = b * hkv * top // 2
        self._spare_rows = top + 1
        self.table = lk.new_zeros(self._recent_pairs + self._spare_rows, 2, self._width, dtype=torch.float32)
        self._rows_used = self._recent_pairs
        # the stack's keys (slots, B, Hkv, top) sorted and +inf-padded; base (B, Hkv, G, slots), the pair
        # of count 0 of each block and lane, so a block's pair is base + count
        self.keys = lk.new_empty(0, b, hkv, top, dtype=torch.float32)
        self.base = lk.new_empty(b, hkv, g, 0, dtype=torch.long)
        kv_lane = torch.arange(b * hkv, device=dev).view(b, hkv, 1, 1).expand(b, hkv, g, 1)
        self._tail_pairs = kv_lane * (top // 2) + torch.arange(self.block // 2, device=dev)
        self._step = None  # the buffers and views of a step, for the current stack (see _plan_step)
        self._recent_views()
        self.recent_v1[..., -1] = 1.0  # [v, 1]: the denominator column
        self._reset_recent(0)
        if self.capacity:  # the most blocks of each level that `capacity` keys can hold at once
            blocks = [min(self.fanout - 1, self.capacity // size) for size in self.sizes[:-1]]
            blocks.append(self.capacity // top)
            self._reserve(sum(blocks), self._recent_pairs + sum(n * self._rows(d) for d, n in enumerate(blocks)))

    def _recent_views(self) -> None:
        """The recent buffer's columns as (B, Hkv, top) views into the table (after it moves)."""
        rows = self.table[:self._recent_pairs].view(self._batch, self.kv_heads, self.sizes[-1], self._width)
        self.recent_v1, self.recent_lk = rows[..., :self._dv + 1], rows[..., self._dv + 1]
        self.recent_pos = rows[..., self._dv + 2] if self.slope is not None else None

    def _reset_recent(self, first: int) -> None:
        """An empty recent buffer whose slot i will hold position first + i: unwritten slots weigh 0."""
        self.recent_lk.fill_(_EMPTY_REF)
        if self.recent_pos is not None:
            top = self.sizes[-1]
            self.recent_pos.copy_(torch.arange(first, first + top, device=self.table.device, dtype=torch.float32))

    def _rows(self, level: int) -> int:
        return self._lanes * (self.sizes[level] + 1)

    def _reserve(self, slots: int, rows: int) -> None:
        """Grow the stack (doubling) to hold `slots` blocks and `rows` table pairs."""
        have = self.keys.shape[0]
        if slots > have:
            new = max(slots, 2 * have)
            keys = self.keys.new_empty(new, *self.keys.shape[1:])
            keys[:have] = self.keys
            base = self.base.new_empty(*self.base.shape[:3], new)
            base[..., :have] = self.base
            self.keys, self.base = keys, base
        have = self.table.shape[0] - self._spare_rows
        if rows > have:  # the blocks' rows double; the recent buffer's and the spare ones stay
            blocks = max(rows - self._recent_pairs, 2 * (have - self._recent_pairs))
            table = self.table.new_zeros(self._recent_pairs + blocks + self._spare_rows, *self.table.shape[1:])
            table[:self._rows_used] = self.table[:self._rows_used]
            self.table = table
            self._recent_views()
        self._step = None

    def _plan_step(self) -> SimpleNamespace:
        """A step's index, buffers and views for the current stack: with them, `attend` is a dozen ops
        (at these sizes a CPU step costs more in op launches than in arithmetic).

        The step gathers, per lane, one pair of rows per block (its `items`, base + count, written by the
        step) and the C/2 pairs of the recent buffer from the tail's start: slots not yet written weigh 0."""
        b, hkv, g, dv, width = self._batch, self.kv_heads, self.group, self._dv, self._width
        nb, lanes = len(self.blocks), self._lanes
        n = nb + self.block // 2
        items = self.base.new_empty(b, hkv, g, n)
        items[..., nb:] = self._tail_pairs + (self.n_recent - self.n_tail) // 2
        got = self.table.new_empty(lanes * n, 2, width)
        got6 = got.view(b, hkv, g, n, 2, width)
        scale = self.table.new_empty(b, hkv, g, n, 2)
        total = self.table.new_empty(lanes, 1, width)
        per_head = total.view(b, self.heads, 1, width)
        cnt = self.base.new_empty(nb, b, hkv, g)
        return SimpleNamespace(
            # the binary searches: the blocks' keys, the query broadcast to them, the counts
            keys=self.keys[:nb], queries=self.keys.new_empty(nb, b, hkv, g), cnt=cnt,
            # the gather index: base + count for the blocks (written in place), then the tail's pairs
            base=self.base[..., :nb], cnt_lane=cnt.permute(1, 2, 3, 0), items_blocks=items[..., :nb],
            items=items.view(-1),
            # the gathered pairs, and their λ_ref and j_ref columns
            got=got, got_lam=got6[..., dv + 1], got_pos=got6[..., dv + 2] if self.slope is not None else None,
            # the factors (turned into weights in place) and the weighted sum of each lane's rows
            scale=scale, weight=scale.view(lanes, 1, 2 * n), got3=got.view(lanes, 2 * n, width),
            total=total, num=per_head[..., :dv], den=per_head[..., dv:dv + 1])

    def _pop_below(self, level: int) -> None:
        """Drop the blocks of levels < `level` (the top of the stack): their keys are being merged."""
        while self.blocks and self.blocks[-1][0] < level:
            self._rows_used = self.blocks.pop()[1]

    def _push(self, level: int, lk: torch.Tensor, w: torch.Tensor, first: int):
        """Sort and scan nb blocks onto the stack: lk (B, Hkv, nb, S), w = [v, 1] (B, Hkv, nb, S, D + 1)
        fp32, the keys of positions first, first + 1, … in order."""
        b, hkv, nb, c = lk.shape
        g, d1 = self.group, self._dv + 1
        slot, row = len(self.blocks), self._rows_used
        rows = self._rows(level)
        self._reserve(slot + nb, row + nb * rows)
        ks, perm = lk.sort(dim=-1)
        w = w.gather(-2, perm[..., None].expand(b, hkv, nb, c, d1))
        pos = slope = None
        if self.slope is not None:
            pos = (first + torch.arange(nb * c, device=lk.device, dtype=torch.float32)).view(nb, c).expand(
                b, hkv, nb, c).gather(-1, perm)[:, :, None]
            slope = self.slope[..., None, None]
        # one scan per query head and block, (B, Hkv, G, nb): the keys are shared by the group's heads
        sides = two_sided_sums(ks[:, :, None], w[:, :, None], self.inv_t[..., None, None], pos=pos, slope=slope)
        self.keys[slot:slot + nb, ..., :c] = ks.movedim(2, 0)
        self.keys[slot:slot + nb, ..., c:] = float("inf")
        # pair k of a block and lane: [ascending entry k, descending entry c − k], the two rows a query
        # with k keys at or below it reads, side by side in memory (one gathered pair, not two at random)
        new = self.table[row:row + nb * rows].view(nb, b, hkv, g, c + 1, 2, self._width)
        for empty in (new[..., 0, 0, :], new[..., c, 1, :]):
            empty.fill_(0.0)
            empty[..., d1] = _EMPTY_REF
        # the scans' entries 1..c: in order on the ascending side, reversed on the descending side, whose
        # coordinate is −λ (its λ_ref column holds λ, so that both sides' factor is e^{−|λ_ref − λq|/T})
        for side, part in ((0, new[..., 1:, 0, :]), (1, new[..., :-1, 1, :])):
            def to_table(t):
                t = t.reshape(b, hkv, g, nb, c, -1).permute(3, 0, 1, 2, 4, 5)  # (nb, B, Hkv, G, S, ·)
                return t.flip(-2) if side else t
            scan = sides[side]
            part[..., :d1] = to_table(scan.sums)
            part[..., d1] = to_table(scan.ref_lam)[..., 0] * (1 - 2 * side)
            if pos is not None:
                part[..., d1 + 1] = to_table(scan.ref_pos)[..., 0]
        lane = torch.arange(self._lanes, device=lk.device).view(b, hkv, g, 1) * (c + 1)
        self.base[..., slot:slot + nb] = row + lane + torch.arange(nb, device=lk.device) * rows
        self.blocks += [(level, row + i * rows) for i in range(nb)]
        self._rows_used = row + nb * rows

    def _settle(self) -> None:
        """Form the blocks that the recent buffer's count calls for (after it crossed a block boundary)."""
        nr, sizes = self.n_recent, self.sizes
        if nr == sizes[-1]:  # full: all of it becomes one block of the last level
            self._pop_below(self.levels - 1)
            self._push(self.levels - 1, self.recent_lk[:, :, None], self.recent_v1[:, :, None], self.length - nr)
            self.n_recent = 0
            self._reset_recent(self.length)
        else:
            have = [0] * self.levels
            for level, _ in self.blocks:
                have[level] += 1
            want = [(nr % sizes[d + 1]) // sizes[d] for d in range(self.levels - 1)]
            # the deepest level that changed has grown (shallower counts only drop when a deeper one
            # grows); every block above it covers keys that now belong to its new blocks: re-form them all
            top = max(d for d in range(self.levels - 1) if want[d] != have[d])
            self._pop_below(top)
            for d in range(top, -1, -1):
                start = nr - nr % sizes[d + 1] + (have[d] if d == top else 0) * sizes[d]
                end = nr - nr % sizes[d]
                if end > start:
                    nb, b, hkv = (end - start) // sizes[d], self._batch, self.kv_heads
                    self._push(d, self.recent_lk[..., start:end].view(b, hkv, nb, sizes[d]),
                               self.recent_v1[:, :, start:end].view(b, hkv, nb, sizes[d], -1),
                               self.length - nr + start)
        self._step = None

    # ------------------------------------------------------------------------------------------------
    def append(self, lk: torch.Tensor, v: torch.Tensor) -> None:
        """Append n ≥ 1 keys: lk (B, Hkv, n) λk, v (B, Hkv, n, Dv) (stored in fp32, without gradients)."""
        lk, v = lk.detach(), v.detach()
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
        if self.slope is not None and self.length + n > _MAX_POSITIONS:
            raise ValueError(f"with alibi_slopes the cache holds at most {_MAX_POSITIONS} keys (positions are "
                             f"float32), got {self.length + n}")
        b, hkv = lk.shape[:2]
        top, i = self.sizes[-1], 0
        while i < n:
            if self.n_recent == 0 and n - i >= top:  # whole last-level blocks straight from the input (a prefill)
                full = (n - i) // top
                j = i + full * top
                w = torch.cat([v[..., i:j, :].float(), v.new_ones(b, hkv, j - i, 1, dtype=torch.float32)], -1)
                self._push(self.levels - 1, lk[..., i:j].float().reshape(b, hkv, full, top),
                           w.view(b, hkv, full, top, -1), self.length)
                self.length, i = self.length + j - i, j
                self._reset_recent(self.length)
                self._step = None
                continue
            take = min(top - self.n_recent, n - i)
            lo, hi = self.n_recent, self.n_recent + take
            if take == n:  # one decode step: no slicing of the inputs
                self.recent_lk[..., lo:hi] = lk
                self.recent_v1[..., lo:hi, :-1] = v
            else:
                self.recent_lk[..., lo:hi] = lk[..., i:i + take]
                self.recent_v1[..., lo:hi, :-1] = v[..., i:i + take, :]
            self.n_recent, self.length, i = hi, self.length + take, i + take
            if hi // self.block != lo // self.block:  # a block boundary was crossed
                self._settle()

    def _built_for(self, name: str, given: torch.Tensor, built: torch.Tensor) -> bool:
        """`given` is the tensor passed at creation, unmodified, or holds the same values as `built`."""
        creation = self._given.get(name)
        if creation is not None and given is creation[0] and given._version == creation[1]:
            return True
        return given.numel() == built.numel() and torch.equal(
            given.detach().float().to(built.device).reshape(built.shape), built)

    @property
    def nbytes(self) -> int:
        """Bytes held (capacity included)."""
        if self._batch is None:
            return 0
        return sum(t.nbytes for t in (self.table, self.keys, self.base))

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
        if temperature is not None and not self._built_for("temperature", temperature, self.temperature):
            raise ValueError("the cache was built for other temperatures: rebuild it")
        if (alibi_slopes is None) != (self.slope is None) or (
                alibi_slopes is not None and not self._built_for("alibi_slopes", alibi_slopes, self.slope)):
            raise ValueError("the cache was built for other alibi_slopes: rebuild it")
        xq = (lq.detach() if lq.requires_grad else lq).view(b, hkv, g)
        if xq.dtype != torch.float32:
            xq = xq.float()
        if self._step is None:
            self._step = self._plan_step()
        st = self._step
        if len(self.blocks):  # one binary search per block and lane
            st.queries.copy_(xq)
            torch.searchsorted(st.keys, st.queries, right=True, out=st.cnt)
            torch.add(st.base, st.cnt_lane, out=st.items_blocks)
        torch.index_select(self.table, 0, st.items, out=st.got)
        scale = torch.sub(st.got_lam, xq.view(b, hkv, g, 1, 1), out=st.scale).abs_().mul_(self.neg_inv_t)
        if self.slope is not None:
            scale.addcmul_(self.slope_pair, st.got_pos - float(self.length - 1))
        # the whole rows, λ_ref and j_ref columns included: an empty entry's λ_ref (−1e30) meets weight 0
        scale.sub_(scale.amax(dim=(-2, -1), keepdim=True)).exp_()
        torch.bmm(st.weight, st.got3, out=st.total)
        out = st.num / st.den
        return out if out.dtype == self._dtype else out.to(self._dtype)
