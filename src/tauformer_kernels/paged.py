"""Taumode attention over a paged (V, λk) cache, read through a block table (vLLM's layout).

`paged_attention_from_lambda(lam_q, cache, block_table, seq_lens, cu_seqlens_q, *, temperature, lambda_slots,
max_seqlen_q, max_seqlen_k, alibi_slopes=None, backend="auto")`: the cache is (num_blocks, Hkv, block_size,
s + Dv), λk's fp32 bits in its first s slots (s = 1 for an fp32 cache, 2 for bf16/fp16) and V after them
(docs/math.md §The λ cache, In vLLM). Sequence b's key j lives at cache[block_table[b, j // block_size], :,
j % block_size] for j < seq_lens[b]; its queries are rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] of lam_q, its
newest tokens (causal, bottom-right aligned over its keys: decode, chunked prefill and a cached prefix alike).

The Triton backend runs the forward kernel's PAGED build (kernels/taumode_attention.py): no gather, nothing
read on the host. The others gather every sequence's keys through the table into a pack and run
`taumode_attention_from_lambda` with cu_seqlens (one host read of seq_lens). Both read trusted values the
same way: seq_lens clamped into [0, width·block_size], table entries into [0, num_blocks), query offsets as
every pack's (varlen.effective). Inference only: no gradients.
"""
from __future__ import annotations

import torch

from . import backends, validation
from . import varlen as _varlen
from .api import taumode_attention_from_lambda

_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def paged_attention_from_lambda(lam_q, cache, block_table, seq_lens, cu_seqlens_q, *, temperature, lambda_slots: int,
                                max_seqlen_q: int, max_seqlen_k: int, alibi_slopes=None, backend: str = "auto"):
    """Causal taumode attention of packed queries over keys in a paged cache; returns (total_q, H, Dv) in the
    cache's dtype.

    lam_q (total_q, H) fp32; cache (num_blocks, Hkv, block_size, lambda_slots + Dv) fp32/bf16/fp16; block_table
    (B, width) int32; seq_lens (B,) int32 (the key count of each sequence); cu_seqlens_q (B + 1,) int32;
    temperature a float or (H,); alibi_slopes None, (H,) or (B, H); max_seqlen_q / max_seqlen_k upper bounds of
    the sequences' query and key counts (>= 1; they size the Triton grids, nothing reads the offsets on the
    host there); backend as in taumode_attention_from_lambda."""
    _check(lam_q, cache, block_table, seq_lens, cu_seqlens_q, temperature, lambda_slots, max_seqlen_q, max_seqlen_k,
           alibi_slopes, backend)
    if backends.resolve("attention", backend, cache.device, cache.dtype, max_seqlen_k, needs_grad=False) == "triton":
        # λk read as one 32-bit word per key: a 16-bit cache seen as fp32 needs even offsets in 16-bit units
        even = all(st % 2 == 0 for st in cache.stride()[:-1]) and cache.storage_offset() % 2 == 0
        validation.require(lambda_slots == 1 or (cache.shape[-1] % 2 == 0 and cache.stride(-1) == 1 and even), lambda: (
            f"the Triton paged kernel reads a 16-bit cache's λk as one 32-bit word: the cache's last dim "
            f"(lambda_slots + Dv) must be even and contiguous and its other strides even, got shape "
            f"{tuple(cache.shape)}, strides {cache.stride()}"))
        return paged_fwd_triton(lam_q, cache, block_table, seq_lens, cu_seqlens_q, temperature, alibi_slopes,
                                lambda_slots, max_seqlen_q, max_seqlen_k)
    lam_k, v, cu_seqlens_k = gather(cache, block_table, seq_lens, lambda_slots)
    return taumode_attention_from_lambda(lam_q, lam_k, v, temperature=temperature, alibi_slopes=alibi_slopes,
                                         is_causal=True, backend=backend, cu_seqlens_q=cu_seqlens_q,
                                         cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                                         max_seqlen_k=max_seqlen_k)


def gather(cache, block_table, seq_lens, lambda_slots: int):
    """The sequences' keys as a pack: λk (total_k, Hkv) fp32, V (total_k, Hkv, Dv) and cu_seqlens_k (B + 1,)
    int32, the table and the counts read as the paged kernel reads them (one host read: total_k)."""
    num_blocks, _, block_size, _ = cache.shape
    lens = seq_lens.long().clamp(0, block_table.shape[1] * block_size)
    cu_k = torch.zeros(lens.shape[0] + 1, dtype=torch.long, device=cache.device)
    torch.cumsum(lens, 0, out=cu_k[1:])
    total = int(cu_k[-1])
    sequence = torch.repeat_interleave(torch.arange(lens.shape[0], device=cache.device), lens, output_size=total)
    position = torch.arange(total, device=cache.device) - cu_k[sequence]
    pages = block_table[sequence, position // block_size].long().clamp(0, num_blocks - 1)
    keys = cache[pages, :, position % block_size]  # (total_k, Hkv, s + Dv)
    lam_k = keys[..., :lambda_slots].contiguous().view(torch.float32).squeeze(-1)
    return lam_k, keys[..., lambda_slots:], cu_k.to(torch.int32)


def paged_fwd_triton(lam_q, cache, block_table, seq_lens, cu_seqlens_q, temperature, alibi_slopes,
                     lambda_slots: int, max_seqlen_q: int, max_seqlen_k: int, *, poison: bool = False):
    """The Triton path of paged_attention_from_lambda (arguments checked by it). poison=True: the output starts
    as NaN, so a test sees any row the kernel forgets to write."""
    from .attention_triton import attention_fwd_triton

    h, count = lam_q.shape[1], block_table.shape[0]
    # λk as one fp32 word per key: the cache seen as fp32 (a 16-bit cache's two slots are one 32-bit word)
    lam_k = (cache if lambda_slots == 1 else cache.view(torch.float32))[..., 0]
    temp = _per_head(temperature, h, lam_q.device)
    slopes = None if alibi_slopes is None else alibi_slopes.float().expand(count, h)
    seqs = _varlen.Seqs(cu_seqlens_q, seq_lens, max_seqlen_q, max_seqlen_k)
    out, _ = attention_fwd_triton(lam_q.float().t().unsqueeze(0), lam_k, cache[..., lambda_slots:], temp, slopes, True,
                                  seqs, pages=(block_table, seq_lens), poison=poison)
    return out[0].permute(1, 0, 2)  # (total_q, H, Dv), packed memory


def _per_head(temperature, heads: int, device: torch.device) -> torch.Tensor:
    if isinstance(temperature, torch.Tensor):
        return temperature.float().expand(heads)
    return torch.full((heads,), float(temperature), device=device)


def _check(lam_q, cache, block_table, seq_lens, cu_seqlens_q, temperature, lambda_slots, max_seqlen_q, max_seqlen_k,
           alibi_slopes, backend) -> None:
    backends.check_backend_name(backend)
    validation.check_tensor("lam_q", lam_q, ndim=2)
    validation.check_tensor("cache", cache, ndim=4)
    validation.require(cache.dtype in _CACHE_DTYPES, lambda: f"cache must be float32, bfloat16 or float16 (λk keeps "
                       f"its fp32 bits in it), got {cache.dtype}", TypeError)
    validation.require(lambda_slots == 4 // cache.dtype.itemsize, lambda: f"lambda_slots must be "
                       f"{4 // cache.dtype.itemsize} for a {cache.dtype} cache (λk's 4 bytes), got {lambda_slots!r}")
    validation.require(cache.shape[-1] > lambda_slots, lambda: f"cache's last dim holds lambda_slots={lambda_slots} "
                       f"λk slots and then V: it must be > {lambda_slots}, got shape {tuple(cache.shape)}")
    validation.require(cache.shape[0] >= 1 and cache.shape[2] >= 1, lambda: f"cache must hold at least one block of "
                       f"at least one key, got shape {tuple(cache.shape)}")
    tables = (("block_table", block_table, 2), ("seq_lens", seq_lens, 1), ("cu_seqlens_q", cu_seqlens_q, 1))
    for name, t, ndim in tables:
        validation.check_tensor(name, t, ndim=ndim, floating=False)
        validation.require(t.dtype == torch.int32, lambda: f"{name} must be int32, got {t.dtype}", TypeError)
    count = block_table.shape[0]
    validation.require(seq_lens.shape[0] == count and cu_seqlens_q.shape[0] == count + 1, lambda: (
        f"block_table has {count} rows: seq_lens must have shape ({count},) and cu_seqlens_q ({count + 1},), got "
        f"{tuple(seq_lens.shape)} and {tuple(cu_seqlens_q.shape)}"))
    validation.require(block_table.shape[1] >= 1, "block_table must have at least one column")
    heads, kv_heads = lam_q.shape[1], cache.shape[1]
    validation.require(heads % kv_heads == 0, lambda: f"lam_q's {heads} heads must be a multiple of the cache's "
                       f"{kv_heads} kv heads (cache dim 1)")
    validation.check_same_device(lam_q=lam_q, cache=cache, block_table=block_table, seq_lens=seq_lens,
                                 cu_seqlens_q=cu_seqlens_q, temperature=temperature, alibi_slopes=alibi_slopes)
    validation.check_per_head("temperature", temperature, heads, "one per query head")
    if isinstance(temperature, torch.Tensor):
        validation.check_positive_values("temperature", temperature)
    validation.check_alibi(alibi_slopes, count, heads)
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        validation.require(isinstance(value, int) and not isinstance(value, bool),
                           lambda: f"{name} must be an int, got {type(value).__name__}", TypeError)
    # max_seqlen_k >= 1 wherever there are sequences (their key counts are on the device)
    _varlen.check_max_lengths(_varlen.Seqs(cu_seqlens_q, seq_lens, max_seqlen_q, max_seqlen_k), lam_q.shape[0], count)
    grads = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                            for t in (lam_q, cache, temperature, alibi_slopes))
    validation.require(not grads, "paged attention is inference only (no gradients): run it under torch.no_grad() "
                       "or pass tensors that do not require grad")
