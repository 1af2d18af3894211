"""The sorted decode cache's own machinery: its stack of merged levels, capacity, and its checks.

What its decode steps must compute is tests/kernels/test_attention_contract.py (backend "sorted_cache": every
causal case decoded one query at a time, against the float64 oracle). Here every step of a prefill and
decode run is checked against the oracle (helpers.flash_close) and the structure after it: blocks sealed
and merged across levels (docs/math.md §Sorted (loglinear) attention), capacities that drop levels or
reserve the tables, and what `attend` refuses.
"""
import pytest
import torch
from helpers import Attention, flash_close, oracle

from tauformer_kernels.sorted_cache import SortedCache


def _run(b, h, hkv, dv, temperature, slopes, prefill, steps, block, fanout=16, levels=2, capacity=None,
         device="cpu"):
    total = prefill + steps
    lk = torch.rand(b, hkv, total)
    v = torch.randn(b, hkv, total, dv)
    lq = torch.rand(b, h, total)
    temp = torch.full((h,), float(temperature)) * torch.linspace(0.5, 2.0, h)
    sl = None if slopes is None else torch.rand(b, h) * slopes
    on = lambda t: None if t is None else t.to(device)  # noqa: E731  (the oracle stays on the CPU)
    cache = SortedCache(on(temp), hkv, on(sl), block=block, fanout=fanout, levels=levels, capacity=capacity)
    cache.append(on(lk[..., :prefill]), on(v[..., :prefill, :]))
    deepest = 0  # the deepest level any block reached
    for t in range(prefill, total + 1):
        if t > prefill:
            cache.append(on(lk[..., t - 1: t]), on(v[..., t - 1: t, :]))
        _check_structure(cache, t, block, fanout, levels)
        deepest = max([deepest] + [level + 1 for level, _ in cache.blocks])
        q = lq[..., t - 1: t]
        out = cache.attend(on(q), on(temp), on(sl)).cpu()
        assert out.shape == (b, h, 1, dv) and out.dtype == v.dtype
        args = (q, lk[..., :t], v[..., :t, :], temp, sl)
        failures = flash_close(Attention(out, None, {}), oracle(*args), oracle(*args, exact=False), dtype=v.dtype,
                               temperature=temp.min().item(), v=args[2], names=("out",))
        assert not failures, (t, failures)
    assert cache.length == total
    return deepest


def _check_structure(cache, length, block, fanout, levels):
    """Every key is in exactly one block or the tail; the stack holds deeper blocks below shallower
    ones, fewer than `fanout` of each merged level, and a tail shorter than a block."""
    assert cache.levels <= levels
    levels = cache.levels
    stack = [level for level, _ in cache.blocks]
    assert cache.length == length
    assert sum(cache.block_sizes()) + cache.n_tail == length
    assert stack == sorted(stack, reverse=True) and cache.n_tail < block
    assert all(stack.count(d) < fanout for d in range(levels - 1)) and max(stack, default=0) < levels


@pytest.mark.parametrize("slopes", [None, 1.0])
@pytest.mark.parametrize("fanout, levels", [(2, 5), (3, 3), (3, 1)])
def test_merges_across_levels(fanout, levels, slopes):
    """Blocks of 4 merged by 2 or 3: the prefill lands on several levels and decode steps cross merges
    (with fanout 2, step 64 cascades through four levels at once); one level: never merged."""
    assert _run(1, 4, 2, 8, 1e-3, slopes, 37, 60, block=4, fanout=fanout, levels=levels) == levels
    # storage reserved up front (and a capacity too small for the run: the tables still grow, and the levels
    # whose blocks exceed 40 keys are dropped: blocks of 4..32 with fanout 2, 4..36 with fanout 3)
    assert _run(1, 4, 2, 8, 0.05, slopes, 37, 60, block=4, fanout=fanout, levels=levels, capacity=97) == levels
    capped = min(levels, {2: 4, 3: 3}[fanout])
    assert _run(1, 4, 2, 8, 0.05, slopes, 37, 60, block=4, fanout=fanout, levels=levels, capacity=40) == capped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the same torch ops as on the CPU)")
@pytest.mark.parametrize("slopes", [None, 1.0])
def test_cuda(slopes):
    """On a GPU: GQA, a prefill across levels, decode steps through seals and merges."""
    assert _run(2, 8, 2, 16, 1e-3, slopes, 100, 80, block=4, fanout=3, levels=3, device="cuda") == 3


@pytest.mark.parametrize("slopes", [None, 0.05])
def test_default_block_long_prefill(slopes):
    """A prefill spanning several default-size blocks plus a ragged tail, then a few steps."""
    _run(1, 4, 2, 20, 0.05, slopes, 1000, 30, block=256)


def test_rejects_other_temperatures_and_slopes():
    temp = torch.full((2,), 0.1)
    cache = SortedCache(temp, 1, None, block=8)
    cache.append(torch.rand(1, 1, 20), torch.randn(1, 1, 20, 4))
    q = torch.rand(1, 2, 1)
    cache.attend(q, temp, None)
    with pytest.raises(ValueError, match="temperatures"):
        cache.attend(q, temp * 2, None)
    with pytest.raises(ValueError, match="alibi_slopes"):
        cache.attend(q, temp, torch.ones(1, 2))
    with pytest.raises(ValueError, match="lq"):
        cache.attend(torch.rand(1, 3, 1), temp, None)
    with pytest.raises(ValueError, match="empty"):
        SortedCache(temp, 1).attend(q)


def test_inputs_that_require_grad():
    """Decoding outside no_grad (λk from parameters): the cache stores values, not graphs."""
    temp = torch.full((2,), 0.1, requires_grad=True)
    slopes = torch.rand(1, 2, requires_grad=True)
    cache = SortedCache(temp, 1, slopes, block=4, fanout=2)
    lk, v = torch.rand(1, 1, 11, requires_grad=True), torch.randn(1, 1, 11, 3, requires_grad=True)
    cache.append(lk[..., :10], v[..., :10, :])
    cache.append(lk[..., 10:], v[..., 10:, :])
    q = torch.rand(1, 2, 1, requires_grad=True)
    out = cache.attend(q, temp, slopes)
    args = (q, lk, v, temp, slopes)
    assert not out.requires_grad
    assert not flash_close(Attention(out, None, {}), oracle(*args), oracle(*args, exact=False), dtype=v.dtype,
                           temperature=0.1, v=v, names=("out",))
    # equal values in other tensors pass the check; other values or shapes do not
    cache.attend(q, temp.detach().clone(), slopes.detach().clone())
    with pytest.raises(ValueError, match="alibi_slopes"):
        cache.attend(q, temp, torch.rand(2, 2))


def test_capacity_drops_levels_larger_than_it():
    """A short cache gets a short structure (and a small recent buffer); the results do not change."""
    temp = torch.full((2,), 0.05)
    assert SortedCache(temp, 1, capacity=64).sizes == [32]
    assert SortedCache(temp, 1, capacity=1000).sizes == [32, 512]
    assert SortedCache(temp, 1, capacity=65536).sizes == [32, 512, 8192]
    assert SortedCache(temp, 1).sizes == [32, 512, 8192]
    assert _run(1, 2, 1, 4, 0.05, None, 50, 30, block=4, fanout=2, levels=4, capacity=20) == 3


def test_capacity_reserves_the_tables():
    """With capacity = the keys to come, decoding never reallocates the stack (no regrowth spike)."""
    temp = torch.full((2,), 0.05)
    cache = SortedCache(temp, 1, block=4, fanout=3, capacity=200)
    cache.append(torch.rand(1, 1, 120), torch.randn(1, 1, 120, 4))
    storage = [t.data_ptr() for t in (cache.keys, cache.table, cache.base)]
    for _ in range(80):
        cache.append(torch.rand(1, 1, 1), torch.randn(1, 1, 1, 4))
        cache.attend(torch.rand(1, 2, 1), temp)
    assert [t.data_ptr() for t in (cache.keys, cache.table, cache.base)] == storage


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_query_gives_nan_like_the_dense_softmax(bad):
    """A λq of ±inf or NaN counts keys past a block's end (the keys are +inf-padded): the answer must be
    NaN, as softmax over all −inf logits is, never rows of another block."""
    temp = torch.full((2,), 0.05)
    cache = SortedCache(temp, 1, block=4, fanout=3)
    cache.append(torch.rand(1, 1, 50), torch.randn(1, 1, 50, 4))
    q = torch.tensor([[[bad], [0.5]]])
    out = cache.attend(q, temp)
    assert out[0, 0].isnan().all() and out[0, 1].isfinite().all()


@pytest.mark.parametrize("kv_heads, capacity, says", [
    (0, None, "num_kv_heads must be an int >= 1, got 0"),  # issue #29: a ZeroDivisionError before
    (1.5, None, "num_kv_heads must be an int >= 1"),
    (1, -5, "capacity must be None or an int >= 1 (the keys expected), got -5"),  # accepted before
    (1, 0, "capacity must be None or an int >= 1"),
    (1, 2.5, "capacity must be None or an int >= 1"),
])
def test_bad_kv_heads_and_capacity_name_the_argument(kv_heads, capacity, says):
    with pytest.raises(ValueError) as info:
        SortedCache(torch.full((2,), 0.1), kv_heads, capacity=capacity)
    assert says in str(info.value)
