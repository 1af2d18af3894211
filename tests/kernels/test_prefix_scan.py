"""The stable prefix scan (prefix_scan.py) against a direct O(n²) float64 computation of its contract.

The contract (prefix_scan's module docstring): with φ_r = lam_r·inv_t + slope·pos_r + offset_r and
ref(p) the item r ≤ p of largest φ, entry p is Σ_{r ≤ p} e^{φ_r − φ_ref(p)}·w_r (and its first moments),
returned with the coordinates of ref(p). The direct version below forms every φ_r − max_{r' ≤ p} φ_r' in
float64 and sums the masked n × n matrix. Inputs are fresh random draws (seeded by conftest); small chunks
make short sequences pad, carry between chunks and recurse several levels deep.
"""
import pytest
import torch
from helpers import relative_error

from tauformer_kernels import prefix_scan


def _phi(lam, inv_t, pos, slope, offset):
    """φ in float64, (Z, n)."""
    phi = lam.double() * inv_t.double()
    if pos is not None:
        phi = phi + slope.double() * pos.double()
    if offset is not None:
        phi = phi + offset.double()
    return phi


def _direct(lam, weights, inv_t, pos=None, slope=None, offset=None):
    """(prefix max of φ (Z, n), sums, lam moments, pos moments), every sum relative to the prefix max."""
    phi = _phi(lam, inv_t, pos, slope, offset)
    n = phi.shape[-1]
    best, arg = torch.cummax(phi, dim=-1)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    factor = torch.exp((phi[:, None, :] - best[:, :, None]).masked_fill(~causal, float("-inf")))  # (Z, p, r)
    w = weights.double()
    lam64 = lam.double()
    lam_moment = (factor * (lam64.gather(1, arg)[:, :, None] - lam64[:, None, :])) @ w
    pos_moment = None
    if pos is not None:
        pos64 = pos.double()
        pos_moment = (factor * (pos64.gather(1, arg)[:, :, None] - pos64[:, None, :])) @ w
    return best, factor @ w, lam_moment, pos_moment


def _check(scan, lam, weights, inv_t, pos=None, slope=None, offset=None, tol=1e-12, ref_tol=1e-9):
    """The scan's entries equal the direct sums, once moved from its references to the prefix max."""
    best, sums, lam_moment, pos_moment = _direct(lam, weights, inv_t, pos, slope, offset)
    ref_phi = _phi(scan.ref_lam, inv_t, scan.ref_pos, slope, scan.ref_offset)
    # the reference is the prefix's largest φ: every exponent of the scan is ≤ 0 (up to rounding)
    assert float((best - ref_phi).abs().max()) <= ref_tol
    to_best = torch.exp(ref_phi - best)[..., None]
    assert relative_error(scan.sums * to_best, sums) < tol
    if scan.lam_moment is not None:
        assert relative_error(scan.lam_moment * to_best, lam_moment) < tol
    assert (scan.pos_moment is None) == (pos_moment is None or scan.lam_moment is None)
    if scan.pos_moment is not None:
        assert relative_error(scan.pos_moment * to_best, pos_moment) < tol


def _inputs(z, n, d, temperature, positions=False, offsets=False, dtype=torch.float64):
    lam = torch.rand(z, n, dtype=dtype)
    weights = torch.randn(z, n, d, dtype=dtype)
    inv_t = 1.0 / (temperature * torch.linspace(0.5, 2.0, z, dtype=dtype)[:, None])
    pos = slope = offset = None
    if positions:
        pos = torch.randperm(n).to(dtype).expand(z, n).contiguous() - n / 2
        slope = torch.rand(z, 1, dtype=dtype)
    if offsets:
        offset = 3.0 * torch.randn(z, n, dtype=dtype)
    return lam, weights, inv_t, pos, slope, offset


@pytest.mark.parametrize("chunk", [3, 32])
@pytest.mark.parametrize("n", [1, 2, 7, 33, 100])
@pytest.mark.parametrize("positions,offsets", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("moments", [False, True])
def test_prefix_sums_match_direct(n, chunk, positions, offsets, moments):
    lam, weights, inv_t, pos, slope, offset = _inputs(3, n, 5, 0.05, positions, offsets)
    scan = prefix_scan.prefix_sums(lam, weights, inv_t, pos=pos, slope=slope, offset=offset, moments=moments,
                                   chunk=chunk)
    assert scan.sums.shape == (3, n, 5) and scan.ref_lam.shape == (3, n)
    assert (scan.lam_moment is not None) == moments
    assert (scan.ref_pos is not None) == positions and (scan.ref_offset is not None) == offsets
    _check(scan, lam, weights, inv_t, pos, slope, offset)


@pytest.mark.parametrize("chunk", [2, 32])
@pytest.mark.parametrize("n", [1, 9, 70])
def test_monotone_shortcut(n, chunk):
    """Sorted λ with nothing else in φ: ref(p) = p, the same sums as the running maximum finds."""
    lam = torch.rand(2, n, dtype=torch.float64).sort(-1).values
    weights = torch.randn(2, n, 4, dtype=torch.float64)
    inv_t = torch.tensor([[20.0], [1e3]], dtype=torch.float64)
    fast = prefix_scan.prefix_sums(lam, weights, inv_t, moments=True, monotone=True, chunk=chunk)
    assert torch.equal(fast.ref_lam, lam)
    _check(fast, lam, weights, inv_t)
    slow = prefix_scan.prefix_sums(lam, weights, inv_t, moments=True, chunk=chunk)
    torch.testing.assert_close(fast.sums, slow.sums, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [2, 32])
def test_ties_in_lambda(chunk):
    """λ on a coarse grid: runs of equal φ, whichever of them is the reference gives the same sums."""
    lam = torch.randint(0, 4, (3, 50)).double().sort(-1).values
    weights = torch.randn(3, 50, 6, dtype=torch.float64)
    inv_t = torch.full((3, 1), 1e3, dtype=torch.float64)
    for monotone in (False, True):
        scan = prefix_scan.prefix_sums(lam, weights, inv_t, moments=True, monotone=monotone, chunk=chunk)
        _check(scan, lam, weights, inv_t)
    # unsorted ties with positions: φ ties broken by the position term
    lam, weights, inv_t, pos, slope, _ = _inputs(2, 40, 3, 1e-3, positions=True)
    lam = torch.randint(0, 3, lam.shape).double()
    scan = prefix_scan.prefix_sums(lam, weights, inv_t, pos=pos, slope=slope, moments=True, chunk=chunk)
    _check(scan, lam, weights, inv_t, pos, slope)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 1e-6)])
def test_wide_range_tiny_temperature(dtype, tol):
    """λ = key positions at T = 1e-3: φ spans 1e5 nats, e^{φ} overflows any float; the scan stays exact.

    Also far from 0 (λ + 1000): exponents are formed from differences of λ, never from λ/T."""
    n = 100
    for shift in (0.0, 1000.0):
        lam = (torch.arange(n, dtype=dtype) + shift).expand(2, n).contiguous()
        lam[1] = lam[1].flip(-1)  # descending: the first item stays the reference of every prefix
        weights = torch.randn(2, n, 4, dtype=dtype)
        inv_t = torch.full((2, 1), 1e3, dtype=dtype)
        scan = prefix_scan.prefix_sums(lam, weights, inv_t, moments=True, chunk=8)
        assert all(bool(torch.isfinite(t).all()) for t in scan if t is not None)
        _check(scan, lam, weights, inv_t, tol=tol, ref_tol=0.0)
    # random λ in [0, 1) at T = 1e-3 with slopes and offsets. fp32: the package's fp32 tolerance (measured
    # ~3e-7), and the reference may miss the largest φ by a near-tie that fp32 φ cannot order (~1e-4 nats).
    # float64: the direct sums' own φ (up to ~2000 nats) round by ~2e-13.
    lam, weights, inv_t, pos, slope, offset = _inputs(4, 200, 3, 1e-3, True, True, dtype)
    scan = prefix_scan.prefix_sums(lam, weights, inv_t, pos=pos, slope=slope, offset=offset, moments=True, chunk=8)
    fp32 = dtype == torch.float32
    _check(scan, lam, weights, inv_t, pos, slope, offset, tol=1e-5 if fp32 else tol, ref_tol=1e-3 if fp32 else 1e-9)


def test_weightless_items():
    """Items that weigh nothing, with log-offset −1e30 (the backward's padded queries, lse = +1e30), leave
    the sums of the others unchanged and make no NaN, in fp32 too."""
    n = 64
    lam, weights, inv_t, _, _, offset = _inputs(2, n, 3, 1e-2, offsets=True, dtype=torch.float32)
    dead = torch.rand(2, n) < 0.5
    dead[:, :3] = True  # prefixes made only of weightless items
    offset = offset.masked_fill(dead, -1e30)
    weights = weights.masked_fill(dead[..., None], 0.0)
    scan = prefix_scan.prefix_sums(lam, weights, inv_t, offset=offset, moments=True, chunk=4)
    assert bool(torch.isfinite(scan.sums).all()) and bool(torch.isfinite(scan.lam_moment).all())
    assert bool((scan.sums[:, :3] == 0).all())
    _, sums, lam_moment, _ = _direct(lam, weights, inv_t, offset=offset)
    ref_phi = _phi(scan.ref_lam, inv_t, None, None, scan.ref_offset)
    live = ((~dead).cumsum(1) > 0)[..., None].expand_as(sums)  # prefixes with an item that weighs
    best = torch.cummax(_phi(lam, inv_t, None, None, offset), dim=-1).values
    to_best = torch.exp(ref_phi - best)[..., None]
    assert relative_error((scan.sums * to_best)[live], sums[live]) < 1e-5
    assert relative_error((scan.lam_moment * to_best)[live], lam_moment[live]) < 1e-5


@pytest.mark.parametrize("chunk", [2, 32])
@pytest.mark.parametrize("n", [1, 6, 45])
@pytest.mark.parametrize("positions,offsets", [(False, False), (True, False), (True, True)])
def test_two_sided_directions(n, chunk, positions, offsets):
    """ascending entry p: the p + 1 smallest λ in coordinate λ; descending entry p: the p + 1 largest, in
    coordinate −λ, both with the items' own positions and offsets."""
    lam, weights, inv_t, pos, slope, offset = _inputs(3, n, 4, 0.02, positions, offsets)
    lam = lam.sort(-1).values
    asc, desc = prefix_scan.two_sided_sums(lam, weights, inv_t, pos=pos, slope=slope, offset=offset, moments=True,
                                           chunk=chunk)
    _check(asc, lam, weights, inv_t, pos, slope, offset)

    def reverse(t):
        return None if t is None else t.flip(1)

    _check(desc, -lam.flip(-1), weights.flip(1), inv_t, reverse(pos), slope, reverse(offset))


@pytest.mark.parametrize("temperature", [1e-3, 0.05, 1.0])
def test_two_sided_split_lookup_is_the_softmax_sum(temperature):
    """What the two scans are for: Σ_j e^{−|λq − λ_j|/T}·w_j = e^{(λ_ref − λq)/T}·ascending[k − 1]
    + e^{(λ_ref' + λq)/T}·descending[n − k − 1], k the number of λ_j ≤ λq (each side empty at the ends)."""
    z, n, m, d = 2, 80, 30, 5
    lam = torch.rand(z, n, dtype=torch.float64).sort(-1).values
    weights = torch.randn(z, n, d, dtype=torch.float64)
    inv_t = torch.full((z, 1), 1.0 / temperature, dtype=torch.float64)
    queries = torch.cat([torch.rand(z, m - 3, dtype=torch.float64), lam[:, :1] - 1, lam[:, -1:] + 1, lam[:, 5:6]], 1)
    asc, desc = prefix_scan.two_sided_sums(lam, weights, inv_t, chunk=4)
    k = torch.searchsorted(lam, queries, right=True)
    total = torch.zeros(z, m, d, dtype=torch.float64)
    # every logit is ≤ 0 against the query's own largest, the key nearest in λ: sums relative to it
    nearest = (-(queries[:, :, None] - lam[:, None, :]).abs() * inv_t[:, :, None]).amax(-1)
    for scan, idx, q_coord, present in ((asc, k - 1, queries, k > 0), (desc, n - 1 - k, -queries, k < n)):
        idx = idx.clamp_min(0)
        scale = ((scan.ref_lam.gather(1, idx) - q_coord) * inv_t - nearest).masked_fill(~present, float("-inf"))
        total += scan.sums.gather(1, idx[..., None].expand(z, m, d)) * torch.exp(scale)[..., None]
    dense = torch.exp(-(queries[:, :, None] - lam[:, None, :]).abs() * inv_t[:, :, None] - nearest[..., None]) @ weights
    assert relative_error(total, dense) < 1e-12


def test_two_sided_broadcast_batch():
    """Items shared by several problems (size-1 batch dimensions, as keys by a group's query heads) give
    each problem the scans of its own inv_t and slope, shaped (*batch, n, …)."""
    kv, heads, n, d = 2, 3, 20, 4
    lam = torch.rand(kv, 1, n, dtype=torch.float64).sort(-1).values
    weights = torch.randn(kv, 1, n, d, dtype=torch.float64)
    pos = torch.randn(kv, 1, n, dtype=torch.float64)
    inv_t = 1.0 / (0.01 + torch.rand(kv, heads, 1, dtype=torch.float64))
    slope = torch.rand(1, heads, 1, dtype=torch.float64)
    shared = prefix_scan.two_sided_sums(lam, weights, inv_t, pos=pos, slope=slope, moments=True, chunk=4)
    assert shared[0].sums.shape == (kv, heads, n, d) and shared[1].ref_lam.shape == (kv, heads, n)

    def each(t):
        return t.expand(kv, heads, *t.shape[2:]).reshape(kv * heads, *t.shape[2:])

    alone = prefix_scan.two_sided_sums(each(lam), each(weights), each(inv_t), pos=each(pos), slope=each(slope),
                                       moments=True, chunk=4)
    for side_shared, side_alone in zip(shared, alone):
        for got, want in zip(side_shared, side_alone):
            assert (got is None) == (want is None)
            if want is not None:
                assert torch.equal(got.reshape(want.shape), want)
