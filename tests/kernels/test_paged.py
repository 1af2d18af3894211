"""The forward kernel's PAGED build (keys through a block table, tauformer_kernels.paged) under the interpreter.

Random paged caches (blocks shuffled, partial last blocks, stale values in the unused slots), packed queries
with their keys bottom-right aligned (T = 1 decode, chunked prefill, whole prompts), GQA, fp32 caches and
bf16/fp16 caches whose λk keeps its fp32 bits in two slots, ALiBi, tiny and large temperatures: each against a
float64 oracle on every sequence alone, the output poisoned with NaN first. Each case runs with the
interpreter's small tiles and with the GPU's tiles (TAUFORMER_GPU_CONFIGS). The PyTorch path (gather + the
packed op) gives the packed op's numbers exactly; out-of-range table entries and key counts read nothing
outside the cache.
"""
import pytest
import torch
from helpers import relative_error

from tauformer_kernels import paged, paged_attention_from_lambda, reference, taumode_attention_from_lambda

pytest.importorskip("triton")

# against float64 on the same stored inputs: fp32 (tf32x3 products), bf16/fp16 as their P enters the tensor
# cores in V's dtype (tests/kernels/test_gpu_configs.py's forward tolerances)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def _paged_inputs(q_lens, k_lens, h, hkv, dv, page, dtype, temperature, alibi, seed=0, spare_pages=3):
    """A shuffled paged cache holding each sequence's keys, the rest stale; λq packed; float64 copies of what the
    cache stores for the oracle."""
    g = torch.Generator().manual_seed(seed)
    slots = 4 // dtype.itemsize
    width = max(-(-n // page) for n in k_lens) + 1  # one unused column: rows longer than their sequences
    num_pages = sum(-(-n // page) for n in k_lens) + spare_pages
    cache = torch.randn(num_pages, hkv, page, slots + dv, generator=g).to(dtype)
    order = torch.randperm(num_pages, generator=g)
    table = torch.full((len(k_lens), width), -7, dtype=torch.int32)  # entries past a sequence: never read
    lam_k, values, used = [], [], 0
    for b, n in enumerate(k_lens):
        pages = order[used:used + -(-n // page)]
        used += len(pages)
        table[b, :len(pages)] = pages.int()
        lk = torch.rand(hkv, n, generator=g)
        v = torch.randn(hkv, n, dv, generator=g).to(dtype)
        for j in range(n):
            cache[pages[j // page], :, j % page, :slots] = lk[:, j:j + 1].contiguous().view(dtype)
            cache[pages[j // page], :, j % page, slots:] = v[:, j]
        lam_k.append(lk)
        values.append(v)
    cu_q = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    lam_q = torch.rand(int(cu_q[-1]), h, generator=g)
    temp = temperature * torch.linspace(1.0, 1.5, h)
    slopes = 0.05 + 0.1 * torch.rand(len(k_lens), h, generator=g) if alibi else None
    seq_lens = torch.tensor(k_lens, dtype=torch.int32)
    return lam_q, cache, table, seq_lens, cu_q, temp, slopes, lam_k, values


def _oracle(lam_q, cu_q, temp, slopes, lam_k, values):
    """(total_q, H, Dv) float64: each sequence alone, its queries the last of its keys."""
    out = []
    for b, (lk, v) in enumerate(zip(lam_k, values)):
        lq = lam_q[cu_q[b]:cu_q[b + 1]].t()[None].double()
        sl = None if slopes is None else slopes[b:b + 1].double()
        y = reference.attention_naive(lq, lk[None].double(), v[None].double(), temp.double(), sl, True)
        out.append(y[0].permute(1, 0, 2))
    return torch.cat(out)


CASES = {  # q_lens, k_lens, H, Hkv, Dv, page, dtype, temperature, alibi
    "decode-gqa-fp32": ([1, 1, 1], [37, 1, 90], 4, 2, 16, 8, torch.float32, 0.3, False),
    "decode-bf16-two-slots": ([1, 1], [70, 33], 2, 1, 16, 16, torch.bfloat16, 0.3, False),
    "chunked-prefill-fp32-alibi": ([20, 1, 45], [61, 5, 45], 2, 1, 8, 16, torch.float32, 0.5, True),
    "prefill-fp16-gqa": ([33, 70], [33, 70], 4, 1, 24, 32, torch.float16, 0.4, False),
    "tiny-temperature": ([5, 1], [40, 77], 2, 2, 8, 8, torch.float32, 1e-3, False),
    "large-temperature-bf16-alibi": ([17, 1], [17, 66], 2, 1, 16, 64, torch.bfloat16, 50.0, True),
    "page-of-one-key": ([3, 1], [9, 4], 2, 1, 8, 1, torch.float32, 0.3, False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_paged_kernel_matches_oracle(tiles, case):
    q_lens, k_lens, h, hkv, dv, page, dtype, temperature, alibi = case
    lam_q, cache, table, seq_lens, cu_q, temp, slopes, lam_k, values = _paged_inputs(
        q_lens, k_lens, h, hkv, dv, page, dtype, temperature, alibi)
    out = paged.paged_fwd_triton(lam_q, cache, table, seq_lens, cu_q, temp, slopes, 4 // dtype.itemsize,
                                 max(q_lens), max(k_lens), poison=True)
    ref = _oracle(lam_q, cu_q, temp, slopes, lam_k, values)
    assert out.shape == ref.shape and out.dtype == dtype
    assert not out.isnan().any()
    assert relative_error(out, ref) < TOL[dtype]


def test_understated_max_seqlen_q_is_covered(tiles):
    # max_seqlen_q = 1 for a 40-row chunk: the OVERFLOW launch covers the rows past the grid
    lam_q, cache, table, seq_lens, cu_q, temp, slopes, lam_k, values = _paged_inputs(
        [40, 1], [50, 9], 2, 1, 8, 16, torch.float32, 0.3, False)
    out = paged.paged_fwd_triton(lam_q, cache, table, seq_lens, cu_q, temp, slopes, 1, 1, 50, poison=True)
    assert relative_error(out, _oracle(lam_q, cu_q, temp, slopes, lam_k, values)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_path_is_the_packed_op(dtype):
    lam_q, cache, table, seq_lens, cu_q, temp, slopes, _, _ = _paged_inputs(
        [3, 1, 20], [30, 7, 20], 4, 2, 8, 8, dtype, 0.3, True)
    s = 4 // dtype.itemsize
    out = paged_attention_from_lambda(lam_q, cache, table, seq_lens, cu_q, temperature=temp, alibi_slopes=slopes,
                                      lambda_slots=s, max_seqlen_q=20, max_seqlen_k=30, backend="reference")
    lam_k, v, cu_k = paged.gather(cache, table, seq_lens, s)
    want = taumode_attention_from_lambda(lam_q, lam_k, v, temperature=temp, alibi_slopes=slopes, backend="reference",
                                         cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=20, max_seqlen_k=30)
    assert torch.equal(out, want)
    triton_out = paged_attention_from_lambda(lam_q, cache, table, seq_lens, cu_q, temperature=temp,
                                             alibi_slopes=slopes, lambda_slots=s, max_seqlen_q=20, max_seqlen_k=30,
                                             backend="triton")
    assert relative_error(triton_out, want.double()) < TOL[dtype]


def test_out_of_range_entries_stay_inside_the_cache(tiles):
    # table entries past the cache or negative, and a key count past the table's width: clamped, on both paths
    lam_q, cache, table, seq_lens, cu_q, temp, slopes, _, _ = _paged_inputs(
        [2, 1], [20, 12], 2, 1, 8, 8, torch.float32, 0.3, False, spare_pages=0)
    table[0, 1] = 10**6
    table[1, 0] = -5
    seq_lens[1] = 10**6
    num_pages = cache.shape[0]
    guarded = torch.full((num_pages + 2, *cache.shape[1:]), float("nan"))
    guarded[1:-1] = cache
    args = (lam_q, guarded[1:-1], table, seq_lens, cu_q)
    out = paged.paged_fwd_triton(*args, temp, None, 1, 2, 10**6, poison=True)
    assert not out.isnan().any()  # a read of the NaN guard pages would show
    ref = paged_attention_from_lambda(*args, temperature=temp, lambda_slots=1, max_seqlen_q=2, max_seqlen_k=10**6,
                                      backend="reference")
    assert relative_error(out, ref.double()) < TOL[torch.float32]


@pytest.mark.parametrize("change, error, match", [
    (dict(lambda_slots=1, dtype=torch.bfloat16), ValueError, "lambda_slots must be 2"),
    (dict(table_dtype=torch.int64), TypeError, "block_table must be int32"),
    (dict(seq_lens_rows=3), ValueError, "seq_lens must have shape"),
    (dict(heads=3), ValueError, "multiple of the cache's 2 kv heads"),
    (dict(max_seqlen_k=0), ValueError, "max_seqlen_k must be >= 1"),
    (dict(max_seqlen_q=2.0), TypeError, "max_seqlen_q must be an int"),
    (dict(temperature=-1.0), ValueError, "temperature must be > 0"),
    (dict(cache_dtype=torch.float64), TypeError, "cache must be float32, bfloat16 or float16"),
])
def test_bad_arguments_are_named(change, error, match):
    dtype = change.get("dtype", torch.float32)
    h = change.get("heads", 4)
    cache = torch.randn(4, 2, 8, 4 // dtype.itemsize + 8).to(change.get("cache_dtype", dtype))
    table = torch.zeros(2, 2, dtype=change.get("table_dtype", torch.int32))
    seq_lens = torch.ones(change.get("seq_lens_rows", 2), dtype=torch.int32)
    cu_q = torch.tensor([0, 1, 2], dtype=torch.int32)
    with pytest.raises(error, match=match):
        paged_attention_from_lambda(torch.rand(2, h), cache, table, seq_lens, cu_q,
                                    temperature=change.get("temperature", 0.3),
                                    lambda_slots=change.get("lambda_slots", 4 // dtype.itemsize),
                                    max_seqlen_q=change.get("max_seqlen_q", 1),
                                    max_seqlen_k=change.get("max_seqlen_k", 1))
