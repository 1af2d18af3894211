"""TauGPT: a small GPT whose attention runs on taumode scalars (docs/math.md §Model), its (V, λk) cache
(docs/math.md §The λ cache), and the taumode layer every host shares.

Read top to bottom:
  rope / norm helpers -> Packing (how a forward's rows split into sequences) -> KVCache (the cache protocol)
  -> TaumodeParams + taumode_attend (the taumode layer: TauGPT, tauformer_model.hf and a serving engine call
  these) -> SelfAttention, DotAttention, TaumodeAttention, SlicedTaumodeAttention -> MLP -> Block -> TauGPT.

attention="taumode": per head, q and k become one scalar each, λ = E / (E + tau) with
E = xᵀLx / xᵀx (L the F×F Laplacian), and the logits are -|λq_i - λk_j| / temperature_h
(optionally - slope_h·|i - j|, the recency term). attention="dot": the same model with PyTorch's
scaled dot product attention: the baseline. A hybrid stack (dot_every) picks the class per layer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import tauformer_kernels as tk

from .config import TauGPTConfig

NORM_EPS = 1e-6  # weightless RMS norms (docs/math.md §Model)
QKV_CLAMP = 5.0  # q, k, v are clamped to ±5 after their projections, as in the reference crate (docs/math.md §Model)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=NORM_EPS)


def rope_cos_sin(head_dim: int, start: int, length: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (length, head_dim // 2) for absolute positions start .. start + length - 1."""
    return rope_at(head_dim, torch.arange(start, start + length, device=device), base)


def rope_at(head_dim: int, positions: torch.Tensor, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape positions.shape + (head_dim // 2,) for the given (integer) positions."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE on x (B, H, T, F): y1 = x1·cos + x2·sin, y2 = x2·cos − x1·sin."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's geometric slopes 2^(−8(h+1)/H), h = 0 .. H−1 (fp32)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / n_head) for h in range(n_head)], dtype=torch.float32)


def key_energy(x: torch.Tensor, laplacian: torch.Tensor, eps: float) -> torch.Tensor:
    """E = max(xᵀLx / (xᵀx + eps), 0) over the last dim, in fp32 (docs/math.md §The λ projection)."""
    return slice_energy(x, laplacian, eps, 1)[..., 0]


def slice_energy(x: torch.Tensor, laplacian: torch.Tensor, eps: float, slices: int) -> torch.Tensor:
    """E of each of ``slices`` equal slices of the last dim, with the slice's diagonal block of the
    Laplacian: (..., slices), fp32."""
    size = x.size(-1) // slices
    xs = x.float().unflatten(-1, (slices, size))  # (..., m, s)
    blocks = torch.stack([laplacian[r * size:(r + 1) * size, r * size:(r + 1) * size] for r in range(slices)])
    quad = ((xs.unsqueeze(-2) @ blocks).squeeze(-2) * xs).sum(-1)
    return (quad / ((xs * xs).sum(-1) + eps)).clamp_min(0)


def sliced_attention(lam_q: torch.Tensor, lam_k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
                     slopes: torch.Tensor | None) -> torch.Tensor:
    """Causal (bottom-right aligned) attention from m λ per head, in eager PyTorch: lam_q (B, H, Tq, m),
    lam_k (B, Hkv, Tk, m), v (B, Hkv, Tk, F), temperature (H, m); logits −Σ_r |λq_r − λk_r| / T_r minus the
    recency term. Materialises (B, H, Tq, Tk, m): for the comparison, not for long sequences."""
    group = lam_q.size(1) // lam_k.size(1)
    lam_k, v = lam_k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    Tq, Tk = lam_q.size(2), lam_k.size(2)
    diff = (lam_q[:, :, :, None, :] - lam_k[:, :, None, :, :]).abs()
    logits = -(diff / temperature[None, :, None, None, :]).sum(-1)
    dist = (torch.arange(Tq, device=v.device) + (Tk - Tq))[:, None] - torch.arange(Tk, device=v.device)
    if slopes is not None:
        logits = logits - slopes[:, None, None] * dist.clamp_min(0)
    weights = torch.softmax(logits.masked_fill(dist < 0, float("-inf")), dim=-1)
    return (weights.to(v.dtype) @ v)


def to_packed(t: torch.Tensor) -> torch.Tensor:
    """(B, H, T, ...) -> the packed (B·T, H, ...) layout of docs/math.md §Packed sequences (a view when t is a
    head-major view of a token-major tensor, as the caches hand out)."""
    return t.transpose(1, 2).flatten(0, 1)


def from_packed(y: torch.Tensor, batch: int) -> torch.Tensor:
    """A packed result (B·T, H, D) -> (B, H, T, D), a view."""
    return y.unflatten(0, (batch, -1)).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------
# Packing: how the rows of one forward split into sequences that attention never crosses
# ---------------------------------------------------------------------------------------------------------

class Packing(NamedTuple):
    """The sequences of one forward (docs/math.md §Packed sequences), built once and handed to every layer (as
    FlexAttention's BlockMask): the documents inside training windows, the rows of a cache that hold different
    numbers of tokens, or the padding of a Hugging Face batch.

    The B·Tq query rows and the B·key_stride key rows (row b's keys at b·key_stride ..) are cut by the int32
    offsets cu_q / cu_k (sequence s: queries cu_q[s] .. cu_q[s+1], keys cu_k[s] .. cu_k[s+1], bottom-right
    aligned); no sequence crosses a row. max_q / max_k bound their lengths (host ints: nothing is read back).
    key_len: the keys of each row that any query may see (a dot layer attends over these columns).
    allowed (B, 1, Tq, key_len) and query_at (B, Tq): the same sequences as the mask SDPA takes and the key
    index each query stands at (its recency distances), made by with_dot_mask for models with dot layers.
    """

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    key_stride: int
    key_len: int
    allowed: torch.Tensor | None = None
    query_at: torch.Tensor | None = None

    def varlen(self) -> dict:
        """The keyword arguments of a packed tauformer_kernels call."""
        return dict(cu_seqlens_q=self.cu_q, cu_seqlens_k=self.cu_k, max_seqlen_q=self.max_q, max_seqlen_k=self.max_k)

    def with_dot_mask(self, batch: int, Tq: int) -> Packing:
        """This packing with the boolean mask and query positions a dot-product layer needs (device ops)."""
        device = self.cu_q.device
        rows = torch.arange(batch * Tq, device=device, dtype=torch.int32)
        seq = torch.searchsorted(self.cu_q, rows, right=True) - 1  # each query row's sequence
        cu_q, cu_k = self.cu_q.long(), self.cu_k.long()
        # the key row each query stands at: its sequence's last key minus the queries after it
        at = cu_k[seq + 1] - (cu_q[seq + 1] - rows)
        query_at = (at.view(batch, Tq) - torch.arange(batch, device=device)[:, None] * self.key_stride)
        keys = torch.arange(self.key_len, device=device)
        key_rows = torch.arange(batch, device=device)[:, None] * self.key_stride + keys  # (B, key_len)
        first = cu_k[seq].view(batch, Tq)  # the first key row of each query's sequence
        allowed = (key_rows[:, None, :] >= first[..., None]) & (key_rows[:, None, :] <= at.view(batch, Tq)[..., None])
        return self._replace(allowed=allowed[:, None], query_at=query_at)


def sequence_starts(first: torch.Tensor) -> tuple[torch.Tensor, Packing] | None:
    """Positions and packing of B rows of T tokens from ``first`` (B, T) bool on the host: True where a token
    starts a sequence (every row starts one). None when no row holds a second sequence (the dense causal path
    is then the same attention). A token's position is its distance to the last start at or before it."""
    B, T = first.shape
    first = first.clone()
    first[:, 0] = True
    first = first.flatten()
    if int(first.sum()) == B:
        return None
    rows = torch.arange(B * T)
    positions = (rows - torch.where(first, rows, 0).cummax(0).values).view(B, T)
    cu = torch.cat([rows[first], torch.tensor([B * T])]).to(torch.int32)
    longest = int(cu.diff().max())
    return positions, Packing(cu, cu, longest, longest, T, T)


def pack_windows(doc_ids: torch.Tensor) -> tuple[torch.Tensor, Packing] | None:
    """Training windows (B, T) cut at their document boundaries: a token whose document id differs from its
    left neighbour's starts a sequence. Built on the host (ids on a device are copied there: one sync), so the
    longest sequence is known without reading the device back. (positions, packing) or None."""
    doc = doc_ids.detach().cpu()
    first = torch.ones(doc.shape, dtype=torch.bool)
    first[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return sequence_starts(first)


def pack_restarting_positions(position_ids: torch.Tensor, batch: int, T: int) -> Packing | None:
    """Packed documents marked by restarting position_ids (Hugging Face's padding-free collators without
    cu_seq_lens): a token starts a sequence when its position is not its left neighbour's + 1. Eager only
    (it reads the positions on the host, once per call as transformers' own flash-attention path does)."""
    pos = position_ids.expand(batch, T).detach().cpu()
    first = torch.ones(batch, T, dtype=torch.bool)
    first[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    found = sequence_starts(first)
    return None if found is None else _on(found[1], position_ids.device)


def pack_padding(attention_mask: torch.Tensor, Tq: int) -> Packing:
    """The packing of a (B, Tk) padding mask whose rows are 0^p 1^n 0^r (left and/or right padding) for the
    last Tq of its Tk tokens: row b is three sequences (its left padding, its real tokens, its right padding),
    each attended to as if alone, so a left-padded row gives what its prompt gives alone; the padding's outputs
    mean nothing. Device ops only; padding between real tokens is refused outside torch.compile (a host read)."""
    B, Tk = attention_mask.shape
    m = attention_mask.to(torch.int32)
    if not torch.compiler.is_compiling():
        runs = (m.diff(dim=1) == 1).sum(1) + m[:, 0]  # starts of runs of real tokens
        if bool((runs > 1).any()):
            raise ValueError("attention_mask has padding between real tokens; taumode attention takes left or "
                             "right padding only (for generate, pad on the left: tokenizer.padding_side='left')")
    n = m.sum(1)
    first = torch.where(n > 0, m.argmax(1), Tk)
    key_bounds = torch.stack([torch.zeros_like(first), first, first + n], 1)  # (B, 3) sequence starts in a row
    query_bounds = (key_bounds - (Tk - Tq)).clamp(0, Tq)  # query i stands at key Tk - Tq + i
    rows = torch.arange(B, device=m.device)[:, None]
    cu_q = torch.cat([(query_bounds + rows * Tq).flatten(), query_bounds.new_full((1,), B * Tq)])
    cu_k = torch.cat([(key_bounds + rows * Tk).flatten(), key_bounds.new_full((1,), B * Tk)])
    return Packing(cu_q.to(torch.int32), cu_k.to(torch.int32), Tq, Tk, Tk, Tk)  # the maxima are bounds


def _on(packing: Packing, device) -> Packing:
    return packing._replace(cu_q=packing.cu_q.to(device), cu_k=packing.cu_k.to(device))


def gap_offsets(stride: int, filled: torch.Tensor) -> torch.Tensor:
    """int32 offsets (2B + 1,) over B rows of `stride` packed rows each: sequence 2b is the first filled[b]
    rows of row b, sequence 2b + 1 (the gap) the rest of it. Device ops only: no host read, no copy."""
    B = filled.shape[0]
    base = torch.arange(B + 1, device=filled.device, dtype=torch.int32) * stride
    cu = torch.empty(2 * B + 1, device=filled.device, dtype=torch.int32)
    cu[0::2] = base
    cu[1::2] = base[:-1] + filled
    return cu


# ---------------------------------------------------------------------------------------------------------
# The cache protocol: a layer hands its new entries to the cache and gets back the views to attend over
# ---------------------------------------------------------------------------------------------------------

class KVCache:
    """Per-layer cache (docs/math.md §The λ cache); ``model(idx, cache=c)`` appends each row's tokens.

    The protocol every cache of this package follows (Hugging Face's ``Cache.update``, the TaumodeCache of
    tauformer_model.hf, follows it too): ``update(keys, values, layer_idx)`` stores the call's new entries
    and returns (B, Hkv, Tk, ·) views of everything the layer attends over. A taumode layer's keys are its
    λk (B, Hkv, T, m), fp32 (m = 1, or the λ slices); a dot layer's are K.

    Token-major, so that the cache viewed packed as (B·max_len, Hkv, ·) costs nothing:
    taumode: ``v[l]`` (B, max_len, Hkv, F) in the model's dtype and ``lam_k[l]`` (B, max_len, Hkv, m) fp32.
    dot:     ``k[l]`` and ``v[l]``, both (B, max_len, Hkv, F).
    ``lengths`` (host ints) and ``length_tensor`` (the same on the cache's device) count each row's tokens.
    Rows of one length: attention reads the slices [:pos + T] (no copies). Rows of different lengths (prompts
    of different lengths): every row whole, with the Packing of `layout`. Nothing is reallocated while decoding.

    taumode with ``sorted=True``: ``sorted[l]`` is a tauformer_kernels.SortedCache per layer instead, made
    on the first call with the layer's temperatures and slopes (fixed at inference): a decode step costs
    O(log T)-ish blocks instead of O(T) keys, for about 2.3–2.5× the bytes at 64k–128k tokens (see
    sorted_cache.py and docs/math.md §Sorted (loglinear) attention). Its rows hold one length.
    """

    def __init__(self, config: TauGPTConfig, batch_size: int, max_len: int, device, dtype: torch.dtype,
                 sorted: bool = False):
        attentions = [config.layer_attention(i) for i in range(config.n_layer)]
        if sorted and ("dot" in attentions or config.lambda_slices > 1):
            raise ValueError("sorted=True: the sorted cache is for taumode attention with one λ per head only "
                             "(every layer)")
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"a cache needs batch_size >= 1 and max_len >= 1, got {batch_size}, {max_len}")
        shape = (batch_size, max_len, config.n_kv_head, config.head_dim)
        self.batch_size = batch_size
        self.max_len = max_len
        self.n_layer = config.n_layer
        self.lengths = [0] * batch_size
        self.length_tensor = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._slots = None  # the current call's write positions: (start, end) or (rows, columns) indices
        self.sorted = [None] * config.n_layer if sorted else None
        if sorted:  # the sorted caches hold the keys and values themselves
            self.v, self.k, self.lam_k = [], [], []
            return
        # per layer: V, and K (dot layers) or λk (taumode layers; None in the other list)
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in attentions]
        self.k = [torch.zeros(shape, device=device, dtype=dtype) if a == "dot" else None for a in attentions]
        self.lam_k = [torch.zeros(shape[:3] + (config.lambda_slices,), device=device, dtype=torch.float32)
                      if a == "taumode" else None for a in attentions]

    @property
    def pos(self) -> int:
        """The number of tokens every row holds (a ValueError when the rows hold different numbers)."""
        if len(set(self.lengths)) > 1:
            raise ValueError(f"the cache's rows hold different numbers of tokens ({self.lengths}): no one pos")
        return self.lengths[0] if self.lengths else 0

    def layout(self, T: int, valid: list[int] | None) -> tuple[int | torch.Tensor, Packing | None]:
        """Begin a call that appends T tokens to each row, of which the first valid[b] are real (the rest right
        padding; None: all T): the RoPE positions (the first token's, or (B, T)) and the call's Packing (None
        when every row holds the same number of tokens and all T are real: the dense path). Otherwise the cache
        is viewed packed as (B·C, Hkv, ·), C = max_len, row b being sequence 2b = (its valid_b queries, its
        len_b + valid_b keys) and sequence 2b + 1 = (its padding queries, the rest of the row), so
        cu_k = [0, end_0, C, C + end_1, 2C, ...] (docs/math.md §Packed sequences); the padding's outputs are
        discarded."""
        if T < 1 or max(self.lengths) + T > self.max_len:
            raise ValueError(f"cache holds batch {self.batch_size} × {self.max_len} positions, rows at "
                             f"{self.lengths}; cannot take {T} more tokens per row")
        n = [T] * self.batch_size if valid is None else list(valid)
        if len(set(self.lengths)) <= 1 and all(v == T for v in n):
            self._slots = (self.pos, self.pos + T)
            return self.pos, None
        if self.sorted is not None:
            raise ValueError(f"the sorted cache holds rows of one length; this call would leave them at "
                             f"{[a + b for a, b in zip(self.lengths, n)]} tokens: use the plain cache "
                             f"(sorted=False) for prompts of different lengths")
        lens = self.length_tensor  # (B,) before this call
        positions = lens[:, None] + torch.arange(T, device=lens.device)
        self._slots = (torch.arange(self.batch_size, device=lens.device)[:, None], positions)
        filled = torch.full_like(lens, T) if valid is None else torch.tensor(n, device=lens.device)  # prefill: a copy
        ends = [a + b for a, b in zip(self.lengths, n)]
        C = self.max_len
        packing = Packing(gap_offsets(T, filled), gap_offsets(C, lens + filled),
                          max(max(n), max(T - v for v in n)), max(max(ends), max(C - e for e in ends)),
                          key_stride=C, key_len=max(self.lengths) + T)
        return positions, packing

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer ``layer_idx``'s new keys (K, or λk (B, Hkv, T, m)) and values (B, Hkv, T, ·) at the
        call's positions; the (B, Hkv, ·, ·) views attention reads: rows of one length up to their end, rows of
        different lengths whole (the call's Packing says which keys each query sees)."""
        key_cache = self.lam_k[layer_idx] if self.k[layer_idx] is None else self.k[layer_idx]
        value_cache = self.v[layer_idx]
        if isinstance(self._slots[0], int):
            start, end = self._slots
            key_cache[:, start:end] = keys.transpose(1, 2)
            value_cache[:, start:end] = values.transpose(1, 2)
            return key_cache[:, :end].transpose(1, 2), value_cache[:, :end].transpose(1, 2)
        key_cache[self._slots] = keys.transpose(1, 2)
        value_cache[self._slots] = values.transpose(1, 2)
        return key_cache.transpose(1, 2), value_cache.transpose(1, 2)

    def attend_sorted(self, layer: TaumodeAttention, lam_q: torch.Tensor, lam_k: torch.Tensor,
                      v: torch.Tensor) -> torch.Tensor:
        """With sorted=True: append the call's (λk, v) to the layer's SortedCache and attend over it. A prefill
        runs the full forward over the prompt, then stores its keys in bulk; decode steps attend one by one."""
        B, _, T = lam_q.shape
        temperature, slopes = layer.temperature(), layer.slopes()
        slopes_bh = None if slopes is None else slopes.expand(B, layer.n_head)
        sc = self.sorted[layer.layer_idx]
        if sc is None:
            sc = self.sorted[layer.layer_idx] = tk.SortedCache(temperature, layer.n_kv_head, slopes_bh,
                                                                capacity=self.max_len)
        if sc.length == 0 and T > 1:
            y = tk.taumode_attention_from_lambda(lam_q, lam_k, v, temperature=temperature, is_causal=True,
                                                 alibi_slopes=slopes, backend=layer.backend)
            sc.append(lam_k, v)
            return y
        steps = []  # decode, or a chunk after a prefill: one query at a time
        for t in range(T):
            sc.append(lam_k[:, :, t:t + 1], v[:, :, t:t + 1])
            steps.append(sc.attend(lam_q[:, :, t:t + 1], temperature, slopes_bh))
        return torch.cat(steps, dim=2)

    def advance(self, T: int, valid: list[int] | None) -> None:
        """Count the tokens a call appended: T per row, or valid[b] to row b."""
        self._slots = None
        if valid is None:
            self.lengths = [n + T for n in self.lengths]
            self.length_tensor += T
        else:
            self.lengths = [n + v for n, v in zip(self.lengths, valid)]
            self.length_tensor.copy_(torch.tensor(self.lengths))  # one small copy per prefill, none per decode

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in self.v + self.k + self.lam_k if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (all layers, the whole max_len; sorted: what is held now)."""
        if self.sorted is not None:
            return sum(c.nbytes for c in self.sorted if c is not None)
        return sum(t.nbytes for t in self.tensors())

    @property
    def bytes_per_token_per_layer(self) -> float:
        """Bytes one token of one sequence takes in one layer."""
        return self.nbytes / (self.n_layer * self.batch_size * self.max_len)

    def reset(self) -> None:
        self.lengths = [0] * self.batch_size
        self.length_tensor.zero_()
        self._slots = None
        if self.sorted is not None:
            self.sorted = [None] * self.n_layer


# ---------------------------------------------------------------------------------------------------------
# The taumode layer: its parameters and its attention, shared by every host
# ---------------------------------------------------------------------------------------------------------

class RecencyTerm:
    """The recency term −slope_h·|i − j| of an attention module (both kinds have it): ``log_slopes`` (H,), a
    parameter ("learned", from ALiBi's slopes), a buffer ("fixed") or None ("none")."""

    def register_slopes(self, n_head: int, recency: str) -> None:
        if recency == "learned":
            self.log_slopes = nn.Parameter(alibi_slopes(n_head).log())
        elif recency == "fixed":
            self.register_buffer("log_slopes", alibi_slopes(n_head).log())
        else:
            self.log_slopes = None

    def slopes(self) -> torch.Tensor | None:
        return None if self.log_slopes is None else self.log_slopes.float().exp()


class TaumodeParams(RecencyTerm, nn.Module):
    """The parameters of one taumode attention layer, whatever hosts it (TauGPT's TaumodeAttention is one; in
    a Hugging Face model enable_taumode hangs one on each attention module as ``.taumode``).

    log_temperature (H,) learned; log_tau (Hkv,: one per kv head, shared by its query heads; a buffer unless
    learned; calibrated from key energies); log_slopes (see register_slopes); laplacian: the (F, F) Laplacian
    as a buffer of its own (a Hugging Face layer: safetensors stores no shared tensors) or None (TauGPT
    passes its model-wide one). tau_rule "vector-median" / "vector-mean": each vector's own tau instead
    (docs/math.md §Per-vector tau). lambda_term False: λq = λk = 0 (the recency-only control).
    """

    def __init__(self, n_head: int, n_kv_head: int, *, temperature_init: float, tau_init: float,
                 learn_tau: bool, recency: str, eps: float, backend: str, tau_rule: str = "calibrated",
                 lambda_term: bool = True, laplacian: torch.Tensor | None = None):
        super().__init__()
        self.register_taumode(n_head, n_kv_head, temperature_init=temperature_init, tau_init=tau_init,
                              learn_tau=learn_tau, recency=recency, eps=eps, backend=backend, tau_rule=tau_rule,
                              lambda_term=lambda_term)
        if laplacian is not None:
            self.register_buffer("laplacian", laplacian.detach().to(torch.float32).clone())

    def register_taumode(self, n_head: int, n_kv_head: int, *, temperature_init: float, tau_init: float,
                         learn_tau: bool, recency: str, eps: float, backend: str, tau_rule: str,
                         lambda_term: bool, temperature_shape: tuple[int, ...] | None = None) -> None:
        """Register the parameters on self (TaumodeAttention calls this after its projections, keeping
        TauGPT's parameter order and names)."""
        if recency == "none" and not lambda_term:
            raise ValueError("lambda_term=False (the recency-only control) needs recency 'fixed' or 'learned'")
        self.n_head, self.n_kv_head, self.eps, self.backend = n_head, n_kv_head, eps, backend
        self.tau_rule, self.lambda_term = tau_rule, lambda_term
        # learned in log space; the initial value keeps attention non-uniform (docs/math.md §Defaults)
        shape = temperature_shape or (n_head,)
        self.log_temperature = nn.Parameter(torch.full(shape, math.log(temperature_init)))
        log_tau = torch.full((n_kv_head,), math.log(tau_init))
        if learn_tau:
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)
        self.register_slopes(n_head, recency)

    def temperature(self) -> torch.Tensor:
        return self.log_temperature.float().exp()

    def tau(self) -> torch.Tensor | str:
        """(Hkv,), or the name of a per-vector rule (tauformer_kernels computes each vector's own)."""
        return self.log_tau.float().exp() if self.tau_rule == "calibrated" else self.tau_rule

    def query_lambda(self, q: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
        """λ of (RMS-normed) queries (B, H, T, F): (B, H, T) fp32 (zeros without the λ term)."""
        if not self.lambda_term:
            return q.new_zeros(q.shape[:3], dtype=torch.float32)
        tau = self.tau()
        tau = tau if isinstance(tau, str) else tau.repeat_interleave(self.n_head // self.n_kv_head)
        return tk.taumode_lambda(q, laplacian, tau=tau, eps=self.eps, backend=self.backend)

    def key_lambda(self, k: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
        """λ of (RMS-normed) keys (B, Hkv, T, F): (B, Hkv, T) fp32 (zeros without the λ term)."""
        if not self.lambda_term:
            return k.new_zeros(k.shape[:3], dtype=torch.float32)
        return tk.taumode_lambda(k, laplacian, tau=self.tau(), eps=self.eps, backend=self.backend)


def taumode_attend(params: TaumodeParams, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor,
                   laplacian: torch.Tensor, packing: Packing | None = None, *,
                   lam_k: torch.Tensor | None = None) -> torch.Tensor:
    """Causal taumode attention of one layer, the one call every host makes.

    Args:
        params: the layer's TaumodeParams (temperature, tau, slopes, eps, backend).
        q: (B, H, Tq, F) queries after RoPE and the weightless RMS norm.
        k: (B, Hkv, Tk, F) keys, likewise; None when ``lam_k`` is given.
        v: (B, Hkv, Tk, Dv) values.
        laplacian: (F, F).
        packing: None (dense rows; queries bottom-right aligned: a chunk after a cache sees every earlier key),
            the forward's Packing over the B·Tq query and B·Tk key rows, or a tauformer_kernels.ContextParallel
            (the rows are this rank's share of longer sequences: every rank's λk and V are read).
        lam_k: (B, Hkv, Tk) fp32, the keys' λ as a (V, λk) cache holds them, instead of k.

    Returns:
        (B, H, Tq, Dv) in v's dtype.

    Without a cache the λ projection and the attention run fused (tauformer_kernels.taumode_attention);
    with cached λk the queries' λ is computed and attention runs from the two λ.
    """
    B = q.size(0)
    kw = dict(temperature=params.temperature(), is_causal=True, alibi_slopes=params.slopes(), backend=params.backend)
    context_parallel = packing if isinstance(packing, tk.ContextParallel) else None
    if context_parallel is not None:  # only λk and V travel between the ranks, so λ is projected first
        lam_k = params.key_lambda(k, laplacian) if lam_k is None else lam_k
        return context_parallel.attend(params.query_lambda(q, laplacian), lam_k, v, **kw)
    if packing is not None:
        kw.update(packing.varlen())
    if lam_k is None and params.lambda_term:
        kw.update(tau=params.tau(), eps=params.eps)
        if packing is None:
            return tk.taumode_attention(q, k, v, laplacian, **kw)
        return from_packed(tk.taumode_attention(to_packed(q), to_packed(k), to_packed(v), laplacian, **kw), B)
    lam_q = params.query_lambda(q, laplacian)
    lam_k = params.key_lambda(k, laplacian) if lam_k is None else lam_k
    if packing is None:
        return tk.taumode_attention_from_lambda(lam_q, lam_k, v, **kw)
    return from_packed(tk.taumode_attention_from_lambda(to_packed(lam_q), to_packed(lam_k), to_packed(v), **kw), B)


# ---------------------------------------------------------------------------------------------------------
# TauGPT's attention layers: Block picks one per layer
# ---------------------------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    """What both kinds of attention layer share: the q/k/v projections (clamped), RoPE, the RMS norm of q and
    k, the optional output gate and the output projection. Subclasses set ``rope`` and implement ``attend``."""

    rope = True

    def register_projections(self, config: TauGPTConfig, layer_idx: int) -> None:
        C, H, Hkv, Fd = config.n_embd, config.n_head, config.n_kv_head, config.head_dim
        self.layer_idx, self.head_dim = layer_idx, Fd
        self.n_head, self.n_kv_head = H, Hkv
        self.rope_base = config.rope_base
        self.c_q = nn.Linear(C, H * Fd, bias=False)
        self.c_k = nn.Linear(C, Hkv * Fd, bias=False)
        self.c_v = nn.Linear(C, Hkv * Fd, bias=False)
        self.c_proj = nn.Linear(H * Fd, C, bias=False)
        self.c_gate = nn.Linear(C, H, bias=False) if config.output_gate else None

    def project(self, x: torch.Tensor, positions: int | torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q (B,H,T,F), k and v (B,Hkv,T,F): projection, clamp, RoPE, RMS norm of q, k. positions: the first
        token's position (the others follow it), or a (B, T) tensor with each token's own."""
        B, T, _ = x.shape
        q = self.c_q(x).clamp(-QKV_CLAMP, QKV_CLAMP).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.c_k(x).clamp(-QKV_CLAMP, QKV_CLAMP).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.c_v(x).clamp(-QKV_CLAMP, QKV_CLAMP).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.rope:
            if isinstance(positions, int):
                cos, sin = rope_cos_sin(self.head_dim, positions, T, self.rope_base, x.device)
            else:  # (B, 1, T, F/2): one angle per token, shared by the heads
                cos, sin = rope_at(self.head_dim, positions[:, None], self.rope_base)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return rms_norm(q), rms_norm(k), v

    def output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The heads' outputs y (B, H, T, F), gated (with output_gate: by σ of the block's normed input x) and
        projected back to the width."""
        if self.c_gate is not None:
            y = y * torch.sigmoid(self.c_gate(x)).transpose(1, 2)[..., None]
        B, H, T, Fd = y.shape
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H * Fd))

    def forward(self, x: torch.Tensor, laplacian: torch.Tensor, positions: int | torch.Tensor = 0,
                packing: Packing | None = None, cache=None) -> torch.Tensor:
        q, k, v = self.project(x, positions)
        return self.output(self.attend(q, k, v, laplacian, packing, cache), x)


class DotAttention(RecencyTerm, SelfAttention):
    """Scaled dot-product attention (PyTorch SDPA): the baseline, and the dot layers of a hybrid stack."""

    def __init__(self, config: TauGPTConfig, layer_idx: int):
        super().__init__()
        self.register_projections(config, layer_idx)
        self.register_slopes(config.n_head, config.recency)

    def attend(self, q, k, v, laplacian, packing, cache):
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_head != self.n_kv_head
        slopes = self.slopes()
        if packing is None:
            if slopes is None and Tq == Tk:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            # Bottom-right aligned causal mask (a chunk appended to a cache sees every earlier key).
            keys = torch.arange(Tk, device=q.device)
            dist = (torch.arange(Tq, device=q.device) + (Tk - Tq))[:, None] - keys
            allowed = dist >= 0
        else:  # the same sequences as the taumode layers' (docs/math.md §Packed sequences)
            k, v = k[:, :, :packing.key_len], v[:, :, :packing.key_len]
            allowed = packing.allowed
            dist = None if slopes is None else packing.query_at[:, None, :, None] - torch.arange(k.size(2),
                                                                                                  device=q.device)
        if slopes is None:
            mask = allowed
        else:
            mask = (-slopes[:, None, None] * dist.float()).masked_fill(~allowed, float("-inf")).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class TaumodeAttention(SelfAttention, TaumodeParams):
    """Taumode attention (docs/math.md §Model): the projections, and TaumodeParams on the module itself."""

    def __init__(self, config: TauGPTConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.register_projections(config, layer_idx)
        self.rope = not config.lambda_before_rope  # λ from the un-rotated q and k (an option)
        self.register_taumode(config.n_head, config.n_kv_head, temperature_init=self.temperature_init(config),
                              tau_init=config.tau_init, learn_tau=config.learn_tau, recency=config.recency,
                              eps=config.eps, backend=config.backend, tau_rule=config.tau_rule,
                              lambda_term=config.lambda_term, temperature_shape=self.temperature_shape(config))

    @staticmethod
    def temperature_init(config: TauGPTConfig) -> float:
        return config.temperature_init

    @staticmethod
    def temperature_shape(config: TauGPTConfig) -> tuple[int, ...]:
        return (config.n_head,)

    def attend(self, q, k, v, laplacian, packing, cache):
        if cache is None:  # training / full forward: one fused call over the whole sequence, or the pack
            return taumode_attend(self, q, k, v, laplacian, packing)
        lam_q, lam_k = self.query_lambda(q, laplacian), self.key_lambda(k, laplacian)
        if isinstance(cache, KVCache) and cache.sorted is not None:
            return cache.attend_sorted(self, lam_q, lam_k, v)
        lam_k, v = cache.update(lam_k[..., None], v, self.layer_idx)
        return taumode_attend(self, q, None, v, laplacian, packing, lam_k=lam_k[..., 0])


class SlicedTaumodeAttention(TaumodeAttention):
    """The m-λ experiment (lambda_slices = m > 1): each head cut into m slices of F/m, each with its own λ (from
    its diagonal block of the Laplacian) and temperature (initially temperature_init·m, as the logit sums m
    terms); eager PyTorch (sliced_attention), dense sequences only."""

    @staticmethod
    def temperature_init(config: TauGPTConfig) -> float:
        return config.temperature_init * config.lambda_slices

    @staticmethod
    def temperature_shape(config: TauGPTConfig) -> tuple[int, ...]:
        return (config.n_head, config.lambda_slices)

    def attend(self, q, k, v, laplacian, packing, cache):
        if packing is not None:
            raise ValueError("lambda_slices > 1 runs dense sequences only: no packed documents (doc_ids), no "
                             "padding masks and no cache rows of different lengths")
        m = self.log_temperature.size(-1)
        group = self.n_head // self.n_kv_head
        tau = self.log_tau.float().exp()
        lam_q = slice_energy(q, laplacian, self.eps, m)
        lam_q = lam_q / (lam_q + tau.repeat_interleave(group)[None, :, None, None])
        lam_k = slice_energy(k, laplacian, self.eps, m)
        lam_k = lam_k / (lam_k + tau[None, :, None, None])
        if not self.lambda_term:
            lam_q, lam_k = torch.zeros_like(lam_q), torch.zeros_like(lam_k)
        if cache is not None:
            lam_k, v = cache.update(lam_k, v, self.layer_idx)
        return sliced_attention(lam_q, lam_k, v, self.temperature(), self.slopes())


class MLP(nn.Module):
    def __init__(self, config: TauGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


def attention_class(config: TauGPTConfig, layer_idx: int) -> type[SelfAttention]:
    """The attention layer of layer ``layer_idx``: dot product (the baseline, a hybrid stack's dot layers),
    taumode, or taumode with m λ per head."""
    if config.layer_attention(layer_idx) == "dot":
        return DotAttention
    return SlicedTaumodeAttention if config.lambda_slices > 1 else TaumodeAttention


class Block(nn.Module):
    def __init__(self, config: TauGPTConfig, layer_idx: int):
        super().__init__()
        self.attn = attention_class(config, layer_idx)(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, laplacian, positions=0, packing=None, cache=None):
        x = x + self.attn(rms_norm(x), laplacian, positions, packing, cache)
        return x + self.mlp(rms_norm(x))


class TauGPT(nn.Module):
    def __init__(self, config: TauGPTConfig, laplacian: torch.Tensor | None = None):
        """``laplacian`` (F, F) overrides ``config.laplacian`` (used when loading a checkpoint)."""
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if laplacian is None:
            laplacian = build_laplacian(config.laplacian, config.head_dim)
        if tuple(laplacian.shape) != (config.head_dim, config.head_dim):
            raise ValueError(f"laplacian has shape {tuple(laplacian.shape)}, the head dim needs "
                             f"({config.head_dim}, {config.head_dim})")
        # Shared by every head and layer (docs/math.md §The Laplacian); saved with the weights so a checkpoint
        # is self-contained.
        self.register_buffer("laplacian", laplacian.detach().to(torch.float32).clone())
        if config.learn_laplacian:
            # the given graph's edges (i < j) and weights; attention uses L(s) = D − W with W_ij = w_ij·e^{s_ij}
            i, j = torch.triu_indices(config.head_dim, config.head_dim, offset=1)
            keep = self.laplacian[i, j] < 0
            self.register_buffer("edge_index", torch.stack([i[keep], j[keep]]))
            self.edge_log_scale = nn.Parameter(torch.zeros(int(keep.sum())))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nanochat-style init: unit-variance embedding, tiny lm head, zero output projections
        (the first loss is ln(vocab_size))."""
        C = self.config.n_embd
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        bound = math.sqrt(3.0 / C)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            if block.attn.c_gate is not None:
                nn.init.zeros_(block.attn.c_gate.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None,
                doc_ids: torch.Tensor | None = None, lengths=None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, context_parallel=None) -> torch.Tensor:
        """Logits (B, T, vocab) in fp32; with ``targets`` the mean cross-entropy instead.

        With ``cache`` (a KVCache: new_cache) the tokens of row b are placed at positions len_b .. len_b + T − 1
        of that row (prefill is one call, decode is T = 1) and the row advances by T; ``lengths`` (host ints,
        (B,)) says that only the first lengths[b] tokens of row b are real (a right-padded batch of prompts: the
        row advances by lengths[b], the padding's logits mean nothing).
        ``doc_ids`` (B, T), without a cache: the document of each token (training on packed documents,
        docs/math.md §Packed sequences): attention never crosses a document boundary inside a window and
        RoPE positions restart at each document. Give it on the host (a device tensor is copied there).
        ``attention_mask`` (B, past + T) / ``position_ids`` (B, T): Hugging Face's padding mask (left or right
        padding) and positions, with a transformers Cache as ``cache`` or none (see tauformer_model.hf).
        ``context_parallel`` (a tauformer_kernels.ContextParallel): idx (and targets) are this rank's share of
        each window (ContextParallel.shard); attention reads every rank's λk and V, RoPE positions are global.
        """
        x = self.hidden_states(idx, cache, doc_ids, lengths, attention_mask, position_ids, packing=context_parallel)
        return self.logits(x, targets)

    def hidden_states(self, idx, cache=None, doc_ids=None, lengths=None, attention_mask=None, position_ids=None,
                      packing: Packing | None = None):
        """The last block's output (B, T, n_embd), before the final norm (forward's arguments; ``packing``:
        the sequences of a flattened row as the caller built them, e.g. from Hugging Face's cu_seq_lens, or a
        ContextParallel: forward's context_parallel)."""
        positions, found = self._layout(idx, cache, doc_ids, lengths, attention_mask, position_ids)
        packing = found if packing is None else packing
        if isinstance(packing, tk.ContextParallel):
            if found is not None or cache is not None or self.layer_attentions() != {"taumode"} \
                    or self.config.lambda_slices > 1:
                raise ValueError("context parallel runs taumode layers (one λ per head) over dense windows: no "
                                 "dot layers, λ slices, cache, doc_ids or padding")
            positions = packing.positions(idx.size(1), idx.device).expand(idx.size(0), -1)
        elif packing is not None and "dot" in self.layer_attentions():
            packing = packing.with_dot_mask(idx.size(0), idx.size(1))
        x = self.wte(idx)
        laplacian = self.attention_laplacian()
        for block in self.blocks:
            x = block(x, laplacian, positions, packing, cache)
        if isinstance(cache, KVCache):
            cache.advance(idx.size(1), None if lengths is None else [int(n) for n in lengths])
        return x

    def logits(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """The head over hidden states x: softcapped fp32 logits, or with ``targets`` the mean cross-entropy."""
        logits = self.lm_head(rms_norm(x)).float()
        cap = self.config.logit_softcap
        logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def layer_attentions(self) -> set[str]:
        return {self.config.layer_attention(i) for i in range(self.config.n_layer)}

    def _layout(self, idx, cache, doc_ids, lengths, attention_mask, position_ids):
        """Check a forward's arguments; the RoPE positions (the first token's, or (B, T)) and the Packing every
        layer gets (None: the dense path)."""
        B, T = idx.shape
        if lengths is not None and not isinstance(cache, KVCache):
            raise ValueError("lengths is for a call with a KVCache (without one, right padding needs no mask: "
                             "causal attention never reads it)")
        if doc_ids is not None and (cache is not None or attention_mask is not None or position_ids is not None):
            raise ValueError("doc_ids is for training windows: no cache, attention_mask or position_ids with it")
        if isinstance(cache, KVCache):
            if attention_mask is not None or position_ids is not None:
                raise ValueError("a KVCache takes right-padded prompts through lengths, not attention_mask / "
                                 "position_ids")
            if B != cache.batch_size:
                raise ValueError(f"cache holds batch {cache.batch_size}; cannot take idx of shape {(B, T)}")
            valid = None if lengths is None else [int(n) for n in lengths]
            if valid is not None and (len(valid) != B or not all(0 <= n <= T for n in valid)):
                raise ValueError(f"lengths {valid}: one per row of idx {(B, T)}, each in 0 .. {T}")
            return cache.layout(T, valid)
        past = 0 if cache is None else cache.get_seq_length()  # a transformers Cache
        if cache is None and T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if doc_ids is not None:
            if tuple(doc_ids.shape) != (B, T):
                raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}, idx {(B, T)}")
            found = pack_windows(doc_ids)
            return (0, None) if found is None else (found[0].to(idx.device), _on(found[1], idx.device))
        positions = past if position_ids is None else position_ids.expand(B, T)
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, past + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; a padding mask of the "
                                 f"{past} cached and {T} new tokens is ({B}, {past + T})")
            if torch.compiler.is_compiling() or not bool(attention_mask.all()):
                return positions, pack_padding(attention_mask, T)
        elif position_ids is not None and past == 0 and not torch.compiler.is_compiling():
            return positions, pack_restarting_positions(position_ids, B, T)
        return positions, None

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  sorted: bool = False) -> KVCache:
        dtype = dtype or self.lm_head.weight.dtype
        return KVCache(self.config, batch_size, max_len, self.lm_head.weight.device, dtype, sorted=sorted)

    @torch.no_grad()
    def first_layer_keys(self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The first layer's keys as λ sees them (RoPE'd, RMS-normed), (B, Hkv, T, F); with doc_ids at the
        positions packed training gives them (restarting at each document)."""
        found = None if doc_ids is None else pack_windows(doc_ids)
        positions = 0 if found is None else found[0].to(idx.device)
        return self.blocks[0].attn.project(rms_norm(self.wte(idx)), positions)[1]

    def first_layer_key_energy(self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """E of the first layer's keys (first_layer_keys) for a batch of tokens, fp32 (B, Hkv, T)."""
        k = self.first_layer_keys(idx, doc_ids)
        energy = slice_energy(k, self.attention_laplacian(), self.config.eps, self.config.lambda_slices)
        return energy.squeeze(-1)  # (B, Hkv, T), or (B, Hkv, T, m) with m λ slices per head

    @torch.no_grad()
    def calibrate_tau(self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None) -> float:
        """Set every taumode layer's tau to the median E of the first layer's keys over ``idx``; returns it."""
        if self.config.attention != "taumode":
            return float("nan")
        if idx.numel() == 0:
            raise ValueError(f"calibrate_tau needs at least one token; idx has shape {tuple(idx.shape)}")
        tau = float(self.first_layer_key_energy(idx, doc_ids).median().clamp_min(1e-4))
        for block in self.blocks:
            if isinstance(block.attn, TaumodeAttention):
                block.attn.log_tau.fill_(math.log(tau))
        return tau

    def attention_laplacian(self) -> torch.Tensor:
        """The (F, F) Laplacian the heads use: the given one, or with learned edge weights."""
        if not self.config.learn_laplacian:
            return self.laplacian
        i, j = self.edge_index
        w = -self.laplacian[i, j] * self.edge_log_scale.exp()
        f = self.config.head_dim
        adjacency = torch.zeros(f, f, device=w.device, dtype=w.dtype).index_put((i, j), w).index_put((j, i), w)
        return torch.diag(adjacency.sum(-1)) - adjacency

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_embedding_params(self) -> int:
        """The token embedding and the lm head (untied): the part that grows with the vocabulary."""
        return self.wte.weight.numel() + self.lm_head.weight.numel()

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: weight decay on matrices only (not on embeddings, temperatures, slopes, tau)."""
        decay = [p for n, p in self.named_parameters() if p.dim() == 2 and not n.startswith("wte")]
        other = [p for n, p in self.named_parameters() if not (p.dim() == 2 and not n.startswith("wte"))]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def build_laplacian(spec: str, head_dim: int) -> torch.Tensor:
    """``"chain"`` or a file written by tauformer_kernels.save_laplacian; returns (F, F) fp32."""
    if spec == "chain":
        return tk.chain_laplacian(head_dim)
    return tk.load_laplacian(spec, head_dim)
