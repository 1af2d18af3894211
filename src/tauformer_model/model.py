"""TauGPT: a small GPT whose attention runs on taumode scalars (docs/math.md §Model), and its (V, λk) cache
(docs/math.md §The λ cache).

Read top to bottom:
  rope / rms_norm helpers -> Packing (documents in a window, ragged cache rows) -> KVCache ->
  CausalSelfAttention -> MLP -> Block -> TauGPT.

attention="taumode": per head, q and k become one scalar each, λ = E / (E + tau) with
E = xᵀLx / xᵀx (L the F×F Laplacian), and the logits are -|λq_i - λk_j| / temperature_h
(optionally - slope_h·|i - j|, the recency term). attention="dot": the same model with PyTorch's
scaled dot product attention: the baseline.
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


class Packing(NamedTuple):
    """How the B·T tokens of one forward split into sequences that attention never crosses
    (docs/math.md §Packed sequences): the documents inside training windows, or the rows of a cache that
    hold different numbers of tokens.

    positions: (B, T) RoPE position of each token (restarting at each document; a cache row's own length).
    taumode: cu_q / cu_k, int32 offsets into the B·T query rows and into the key rows (the same rows in
    training; the cache's B·max_len rows with a cache), max_q / max_k their longest sequences, host ints so
    that no call reads the offsets back. dot: allowed (B, 1, T, Tk), the block-diagonal causal mask SDPA
    takes, and query_at (B, T), the key index each query stands at (its recency distances).
    slots: with a cache, the (row, column) indices the T new tokens of each row are written to.
    """

    positions: torch.Tensor
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None
    max_q: int = 0
    max_k: int = 0
    allowed: torch.Tensor | None = None
    query_at: torch.Tensor | None = None
    slots: tuple[torch.Tensor, torch.Tensor] | None = None

    def varlen(self) -> dict:
        """The keyword arguments of a packed tauformer_kernels call."""
        return dict(cu_seqlens_q=self.cu_q, cu_seqlens_k=self.cu_k, max_seqlen_q=self.max_q, max_seqlen_k=self.max_k)


def pack_windows(doc_ids: torch.Tensor, attention: str, device) -> Packing | None:
    """The packing of training windows (B, T) cut at their document boundaries: a token whose document id
    differs from its left neighbour's starts a sequence, and every window starts one. None when no window
    holds a boundary (the dense causal call is then the same attention). Built on the host (ids on a device
    are copied there: one sync), so the longest sequence is known without reading the device back."""
    doc = doc_ids.detach().cpu()
    B, T = doc.shape
    first = torch.ones(B, T, dtype=torch.bool)
    first[:, 1:] = doc[:, 1:] != doc[:, :-1]
    first = first.flatten()
    if int(first.sum()) == B:
        return None
    rows = torch.arange(B * T)
    # a token's position is its distance to the last sequence start at or before it
    positions = (rows - torch.where(first, rows, 0).cummax(0).values).view(B, T).to(device)
    if attention == "dot":
        segment = first.cumsum(0).view(B, T).to(device)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        allowed = (segment[:, :, None] == segment[:, None, :]) & causal
        return Packing(positions, allowed=allowed[:, None], query_at=torch.arange(T, device=device).expand(B, T))
    cu = torch.cat([rows[first], torch.tensor([B * T])]).to(torch.int32)
    longest = int(cu.diff().max())
    cu = cu.to(device)
    return Packing(positions, cu, cu, longest, longest)


def gap_offsets(stride: int, filled: torch.Tensor) -> torch.Tensor:
    """int32 offsets (2B + 1,) over B rows of `stride` packed rows each: sequence 2b is the first filled[b]
    rows of row b, sequence 2b + 1 (the gap) the rest of it. Device ops only: no host read, no copy."""
    B = filled.shape[0]
    base = torch.arange(B + 1, device=filled.device, dtype=torch.int32) * stride
    cu = torch.empty(2 * B + 1, device=filled.device, dtype=torch.int32)
    cu[0::2] = base
    cu[1::2] = base[:-1] + filled
    return cu


def tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, H, T, ...) -> the packed (B·T, H, ...) layout of docs/math.md §Packed sequences."""
    return t.transpose(1, 2).flatten(0, 1)


def heads(y: torch.Tensor, batch: int) -> torch.Tensor:
    """A packed result (B·T, H, D) -> (B, H, T, D), a view."""
    return y.unflatten(0, (batch, -1)).transpose(1, 2)


class KVCache:
    """Per-layer cache (docs/math.md §The λ cache); ``model(idx, cache=c)`` appends each row's tokens.

    Token-major, so that the cache viewed packed as (B·max_len, Hkv, ·) costs nothing:
    taumode: ``v[l]`` (B, max_len, Hkv, F) in the model's dtype and ``lam_k[l]`` (B, max_len, Hkv) fp32.
    dot:     ``k[l]`` and ``v[l]``, both (B, max_len, Hkv, F).
    ``lengths`` (host ints) and ``length_tensor`` (the same on the cache's device) count each row's tokens.
    Rows of one length: attention reads the slices [:pos + T] as (B, Hkv, ·) views (no copies). Rows of
    different lengths (prompts of different lengths): see `packing`. Nothing is reallocated while decoding.

    taumode with ``sorted=True``: ``sorted[l]`` is a tauformer_kernels.SortedCache per layer instead, made
    on the first call with the layer's temperatures and slopes (fixed at inference): a decode step costs
    O(log T)-ish blocks instead of O(T) keys, for about 2.3–2.5× the bytes at 64k–128k tokens (see
    sorted_cache.py and docs/math.md §Sorted (loglinear) attention). Its rows hold one length.
    """

    def __init__(self, config: TauGPTConfig, batch_size: int, max_len: int, device, dtype: torch.dtype,
                 sorted: bool = False):
        attentions = [config.layer_attention(i) for i in range(config.n_layer)]
        if sorted and "dot" in attentions:
            raise ValueError("sorted=True: the sorted cache is for taumode attention only (every layer)")
        shape = (batch_size, max_len, config.n_kv_head, config.head_dim)
        lambda_shape = shape[:3] + ((config.lambda_slices,) if config.lambda_slices > 1 else ())
        self.batch_size = batch_size
        self.max_len = max_len
        self.n_layer = config.n_layer
        self.lengths = [0] * batch_size
        self.length_tensor = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.sorted = [None] * config.n_layer if sorted else None
        if sorted:  # the sorted caches hold the keys and values themselves
            self.v, self.k, self.lam_k = [], [], []
            return
        # per layer: V, and K (dot layers) or λk (taumode layers; None in the other list)
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in attentions]
        self.k = [torch.zeros(shape, device=device, dtype=dtype) if a == "dot" else None for a in attentions]
        self.lam_k = [torch.zeros(lambda_shape, device=device, dtype=torch.float32) if a == "taumode" else None
                      for a in attentions]

    @property
    def pos(self) -> int:
        """The number of tokens every row holds (a ValueError when the rows hold different numbers)."""
        if len(set(self.lengths)) > 1:
            raise ValueError(f"the cache's rows hold different numbers of tokens ({self.lengths}): no one pos")
        return self.lengths[0] if self.lengths else 0

    def packing(self, T: int, valid: list[int] | None, attention: str) -> Packing | None:
        """The layout of a call that appends T tokens to each row, of which the first valid[b] are real (the
        rest right padding; None: all T). None when every row holds the same number of tokens and all T are
        real: the dense path. Otherwise, taumode: the cache viewed packed as (B·C, Hkv, ·), C = max_len, row b
        being sequence 2b = (its valid_b queries, its len_b + valid_b keys) and sequence 2b + 1 = (its padding
        queries, the rest of the row), so cu_k = [0, end_0, C, C + end_1, 2C, ...] (docs/math.md §Packed
        sequences); the padding's outputs are discarded. dot: a mask over the keys [0, max len + T)."""
        n = [T] * self.batch_size if valid is None else list(valid)
        if len(set(self.lengths)) <= 1 and all(v == T for v in n):
            return None
        if self.sorted is not None:
            raise ValueError(f"the sorted cache holds rows of one length; this call would leave them at "
                             f"{[a + b for a, b in zip(self.lengths, n)]} tokens: use the plain cache "
                             f"(sorted=False) for prompts of different lengths")
        lens = self.length_tensor  # (B,) before this call
        steps = torch.arange(T, device=lens.device)
        positions = lens[:, None] + steps
        slots = (torch.arange(self.batch_size, device=lens.device)[:, None], positions)
        filled = torch.full_like(lens, T) if valid is None else torch.tensor(n, device=lens.device)  # prefill: a copy
        if attention == "dot":  # a padding query sees what the row's last real token sees
            query_at = lens[:, None] + torch.minimum(steps, filled[:, None] - 1)
            keys = torch.arange(max(self.lengths) + T, device=lens.device)
            return Packing(positions, allowed=query_at[:, None, :, None] >= keys, query_at=query_at, slots=slots)
        ends = [a + b for a, b in zip(self.lengths, n)]
        C = self.max_len
        return Packing(positions, gap_offsets(T, filled), gap_offsets(C, lens + filled),
                       max(max(n), max(T - v for v in n)), max(max(ends), max(C - e for e in ends)), slots=slots)

    def advance(self, T: int, valid: list[int] | None) -> None:
        """Count the tokens a call appended: T per row, or valid[b] to row b."""
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
        if self.sorted is not None:
            self.sorted = [None] * self.n_layer


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TauGPTConfig, attention: str):
        super().__init__()
        self.config = config
        self.attention = attention  # config.attention, or "dot" in a hybrid stack's dot layers
        C, H, Hkv, Fd = config.n_embd, config.n_head, config.n_kv_head, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = H, Hkv, Fd
        self.c_q = nn.Linear(C, H * Fd, bias=False)
        self.c_k = nn.Linear(C, Hkv * Fd, bias=False)
        self.c_v = nn.Linear(C, Hkv * Fd, bias=False)
        self.c_proj = nn.Linear(H * Fd, C, bias=False)
        self.c_gate = nn.Linear(C, H, bias=False) if config.output_gate else None
        if attention == "taumode":
            # Per-head temperature, learned in log space; the initial value keeps attention non-uniform.
            # (H, m) with m λ slices per head: one per slice, m times warmer, as the logit sums m terms.
            m = config.lambda_slices
            shape = (H,) if m == 1 else (H, m)
            self.log_temperature = nn.Parameter(torch.full(shape, math.log(config.temperature_init * m)))
            # One tau per kv head (shared by the query heads of its group); calibrated by TauGPT.calibrate_tau.
            log_tau = torch.full((Hkv,), math.log(config.tau_init))
            if config.learn_tau:
                self.log_tau = nn.Parameter(log_tau)
            else:
                self.register_buffer("log_tau", log_tau)
        if config.recency == "none" and not (config.lambda_term or attention == "dot"):
            raise ValueError("lambda_term=False (the recency-only control) needs recency 'fixed' or 'learned'")
        if config.recency == "learned":
            self.log_slopes = nn.Parameter(alibi_slopes(H).log())
        elif config.recency == "fixed":
            self.register_buffer("log_slopes", alibi_slopes(H).log())
        else:
            self.log_slopes = None

    def project(self, x: torch.Tensor, positions: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B,H,T,F), k and v (B,Hkv,T,F): projection, clamp, RoPE, RMS norm of q, k. positions: the first
        token's position (the others follow it), or a (B, T) tensor with each token's own."""
        B, T, _ = x.shape
        q = self.c_q(x).clamp(-QKV_CLAMP, QKV_CLAMP).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.c_k(x).clamp(-QKV_CLAMP, QKV_CLAMP).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.c_v(x).clamp(-QKV_CLAMP, QKV_CLAMP).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if not (self.attention == "taumode" and self.config.lambda_before_rope):
            if isinstance(positions, int):
                cos, sin = rope_cos_sin(self.head_dim, positions, T, self.config.rope_base, x.device)
            else:  # (B, 1, T, F/2): one angle per token, shared by the heads
                cos, sin = rope_at(self.head_dim, positions[:, None], self.config.rope_base)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return rms_norm(q), rms_norm(k), v

    def slopes(self) -> torch.Tensor | None:
        return None if self.log_slopes is None else self.log_slopes.float().exp()

    def forward(self, x: torch.Tensor, laplacian: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0, packing: Packing | None = None) -> torch.Tensor:
        B, T, C = x.shape
        start = 0 if cache is None or packing is not None else cache.pos
        q, k, v = self.project(x, start if packing is None else packing.positions)
        if self.attention == "taumode":
            y = self._taumode(q, k, v, laplacian, cache, layer, start, packing)
        else:
            y = self._dot(q, k, v, cache, layer, start, packing)
        return self.output(y, x)

    def output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The heads' outputs y (B, H, T, F), gated (with output_gate: by σ of the block's normed input x) and
        projected back to the width."""
        if self.c_gate is not None:
            y = y * torch.sigmoid(self.c_gate(x)).transpose(1, 2)[..., None]
        B, H, T, Fd = y.shape
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H * Fd))

    def _taumode(self, q, k, v, laplacian, cache, layer, start, packing):
        cfg = self.config
        # (Hkv,), or the name of a per-vector rule (tauformer_kernels computes each vector's own)
        tau = self.log_tau.float().exp() if cfg.tau_rule == "calibrated" else cfg.tau_rule
        temperature = self.log_temperature.float().exp()  # (H,)
        slopes = self.slopes()
        if cfg.lambda_slices > 1:
            return self._taumode_slices(q, k, v, laplacian, tau, temperature, slopes, cache, layer, start, packing)
        if not cfg.lambda_term:  # the recency-only control: λq = λk = 0
            return self._taumode_from_lambda(q.new_zeros(q.shape[:3], dtype=torch.float32),
                                             k.new_zeros(k.shape[:3], dtype=torch.float32), v, temperature,
                                             slopes, cache, layer, start, packing)
        if cache is None:  # training / full forward: one fused call over the whole sequence, or the pack
            kw = dict(tau=tau, temperature=temperature, eps=cfg.eps, is_causal=True, alibi_slopes=slopes,
                      backend=cfg.backend)
            if packing is None:
                return tk.taumode_attention(q, k, v, laplacian, **kw)
            return heads(tk.taumode_attention(tokens(q), tokens(k), tokens(v), laplacian, **kw,
                                              **packing.varlen()), q.size(0))
        group = self.n_head // self.n_kv_head
        tau_q = tau if isinstance(tau, str) else tau.repeat_interleave(group)
        lam_q = tk.taumode_lambda(q, laplacian, tau=tau_q, eps=cfg.eps, backend=cfg.backend)
        lam_k = tk.taumode_lambda(k, laplacian, tau=tau, eps=cfg.eps, backend=cfg.backend)
        return self._taumode_from_lambda(lam_q, lam_k, v, temperature, slopes, cache, layer, start, packing)

    def _taumode_slices(self, q, k, v, laplacian, tau, temperature, slopes, cache, layer, start, packing):
        if packing is not None:
            raise ValueError("lambda_slices > 1 runs dense sequences only: no packed documents (doc_ids) and no "
                             "cache rows of different lengths")
        m, eps = self.config.lambda_slices, self.config.eps
        group = self.n_head // self.n_kv_head
        lam_q = slice_energy(q, laplacian, eps, m)
        lam_q = lam_q / (lam_q + tau.repeat_interleave(group)[None, :, None, None])
        lam_k = slice_energy(k, laplacian, eps, m)
        lam_k = lam_k / (lam_k + tau[None, :, None, None])
        if not self.config.lambda_term:
            lam_q, lam_k = torch.zeros_like(lam_q), torch.zeros_like(lam_k)
        if cache is not None:
            end = start + q.size(2)
            cache.lam_k[layer][:, start:end] = lam_k.transpose(1, 2)
            cache.v[layer][:, start:end] = v.transpose(1, 2)
            lam_k, v = cache.lam_k[layer][:, :end].transpose(1, 2), cache.v[layer][:, :end].transpose(1, 2)
        return sliced_attention(lam_q, lam_k, v, temperature, slopes)

    def _taumode_from_lambda(self, lam_q, lam_k, v, temperature, slopes, cache, layer, start, packing):
        kw = dict(temperature=temperature, is_causal=True, alibi_slopes=slopes, backend=self.config.backend)
        B = lam_q.size(0)
        if cache is None:
            if packing is None:
                return tk.taumode_attention_from_lambda(lam_q, lam_k, v, **kw)
            return heads(tk.taumode_attention_from_lambda(tokens(lam_q), tokens(lam_k), tokens(v), **kw,
                                                          **packing.varlen()), B)
        if cache.sorted is not None:
            return self._taumode_sorted(lam_q, lam_k, v, temperature, slopes, cache, layer)
        lk_cache, v_cache = cache.lam_k[layer], cache.v[layer]  # token-major (B, C, Hkv[, F])
        if packing is None:  # rows of one length: dense attention over (B, Hkv, ·) views of the cache
            end = start + lam_q.size(2)
            lk_cache[:, start:end] = lam_k.transpose(1, 2)
            v_cache[:, start:end] = v.transpose(1, 2)
            return tk.taumode_attention_from_lambda(lam_q, lk_cache[:, :end].transpose(1, 2),
                                                    v_cache[:, :end].transpose(1, 2), **kw)
        # rows of different lengths: one packed call over the whole cache, gaps and all (KVCache.packing)
        lk_cache[packing.slots] = lam_k.transpose(1, 2)
        v_cache[packing.slots] = v.transpose(1, 2)
        return heads(tk.taumode_attention_from_lambda(tokens(lam_q), lk_cache.flatten(0, 1), v_cache.flatten(0, 1),
                                                      **kw, **packing.varlen()), B)

    def _taumode_sorted(self, lam_q, lam_k, v, temperature, slopes, cache, layer):
        B, _, T = lam_q.shape
        slopes_bh = None if slopes is None else slopes.expand(B, self.n_head)
        sc = cache.sorted[layer]
        if sc is None:
            sc = cache.sorted[layer] = tk.SortedCache(temperature, self.n_kv_head, slopes_bh, capacity=cache.max_len)
        if sc.length == 0 and T > 1:  # a prefill: the full forward over the prompt, then its keys in bulk
            y = tk.taumode_attention_from_lambda(lam_q, lam_k, v, temperature=temperature, is_causal=True,
                                                 alibi_slopes=slopes, backend=self.config.backend)
            sc.append(lam_k, v)
            return y
        steps = []  # decode, or a chunk after a prefill: one query at a time
        for t in range(T):
            sc.append(lam_k[:, :, t:t + 1], v[:, :, t:t + 1])
            steps.append(sc.attend(lam_q[:, :, t:t + 1], temperature, slopes_bh))
        return torch.cat(steps, dim=2)

    def _dot(self, q, k, v, cache, layer, start, packing):
        if cache is not None:
            k, v = self._dot_cache(k, v, cache, layer, start, packing)
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_head != self.n_kv_head
        slopes = self.slopes()
        keys = torch.arange(Tk, device=q.device)
        if packing is None:
            if slopes is None and Tq == Tk:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            # Bottom-right aligned causal mask (a chunk appended to a cache sees every earlier key).
            dist = (torch.arange(Tq, device=q.device) + (Tk - Tq))[:, None] - keys
            allowed = dist >= 0
        else:  # block-diagonal: the same attention as the taumode pack (docs/math.md §Packed sequences)
            allowed = packing.allowed
            dist = None if slopes is None else packing.query_at[:, None, :, None] - keys
        if slopes is None:
            mask = allowed
        else:
            mask = (-slopes[:, None, None] * dist.float()).masked_fill(~allowed, float("-inf")).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    @staticmethod
    def _dot_cache(k, v, cache, layer, start, packing):
        """Write k, v into the (token-major) cache; the keys attention reads, as (B, Hkv, Tk, F) views."""
        if packing is None:
            end = start + k.size(2)
            cache.k[layer][:, start:end] = k.transpose(1, 2)
            cache.v[layer][:, start:end] = v.transpose(1, 2)
        else:
            cache.k[layer][packing.slots] = k.transpose(1, 2)
            cache.v[layer][packing.slots] = v.transpose(1, 2)
            end = packing.allowed.size(-1)
        return cache.k[layer][:, :end].transpose(1, 2), cache.v[layer][:, :end].transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, config: TauGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: TauGPTConfig, attention: str):
        super().__init__()
        self.attn = CausalSelfAttention(config, attention)
        self.mlp = MLP(config)

    def forward(self, x, laplacian, cache=None, layer=0, packing=None):
        x = x + self.attn(rms_norm(x), laplacian, cache, layer, packing)
        return x + self.mlp(rms_norm(x))


class TauGPT(nn.Module):
    def __init__(self, config: TauGPTConfig, laplacian: torch.Tensor | None = None):
        """``laplacian`` (F, F) overrides ``config.laplacian`` (used when loading a checkpoint)."""
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, config.layer_attention(i)) for i in range(config.n_layer))
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                doc_ids: torch.Tensor | None = None, lengths=None) -> torch.Tensor:
        """Logits (B, T, vocab) in fp32; with ``targets`` the mean cross-entropy instead.

        With ``cache`` the tokens of row b are placed at positions len_b .. len_b + T − 1 of that row (prefill
        is one call, decode is T = 1) and the row advances by T; ``lengths`` (host ints, (B,)) says that only
        the first lengths[b] tokens of row b are real (a right-padded batch of prompts: the row advances by
        lengths[b], the padding's logits mean nothing).
        ``doc_ids`` (B, T), without a cache: the document of each token (training on packed documents,
        docs/math.md §Packed sequences): attention never crosses a document boundary inside a window and
        RoPE positions restart at each document. Give it on the host (a device tensor is copied there).
        """
        # one layout per kind of layer (both in a hybrid stack): a mask for dot, cu_seqlens for taumode
        packings = {a: self._packing(idx, cache, doc_ids, lengths, a) for a in self.layer_attentions()}
        x = self.wte(idx)
        laplacian = self.attention_laplacian()
        for layer, block in enumerate(self.blocks):
            x = block(x, laplacian, cache, layer, packings[block.attn.attention])
        logits = self.lm_head(rms_norm(x)).float()
        cap = self.config.logit_softcap
        logits = cap * torch.tanh(logits / cap)
        if cache is not None:
            cache.advance(idx.size(1), None if lengths is None else [int(n) for n in lengths])
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def layer_attentions(self) -> set[str]:
        return {block.attn.attention for block in self.blocks}

    def _packing(self, idx, cache, doc_ids, lengths, attention: str) -> Packing | None:
        """Check a forward's arguments; its packing for layers of ``attention`` (None: the dense path)."""
        B, T = idx.shape
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            if lengths is not None:
                raise ValueError("lengths is for a call with a cache (without one, right padding needs no mask: "
                                 "causal attention never reads it)")
            if doc_ids is None:
                return None
            if tuple(doc_ids.shape) != (B, T):
                raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}, idx {(B, T)}")
            return pack_windows(doc_ids, attention, idx.device)
        if doc_ids is not None:
            raise ValueError("doc_ids is for training windows; a cache's rows are separate sequences already")
        if B != cache.batch_size or max(cache.lengths, default=0) + T > cache.max_len:
            raise ValueError(f"cache holds batch {cache.batch_size} × {cache.max_len} positions, rows at "
                             f"{cache.lengths}; cannot take idx of shape {(B, T)}")
        valid = None if lengths is None else [int(n) for n in lengths]
        if valid is not None and (len(valid) != B or not all(0 <= n <= T for n in valid)):
            raise ValueError(f"lengths {valid}: one per row of idx {(B, T)}, each in 0 .. {T}")
        return cache.packing(T, valid, attention)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  sorted: bool = False) -> KVCache:
        dtype = dtype or self.lm_head.weight.dtype
        return KVCache(self.config, batch_size, max_len, self.lm_head.weight.device, dtype, sorted=sorted)

    @torch.no_grad()
    def first_layer_keys(self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The first layer's keys as λ sees them (RoPE'd, RMS-normed), (B, Hkv, T, F); with doc_ids at the
        positions packed training gives them (restarting at each document)."""
        packing = None if doc_ids is None else pack_windows(doc_ids, "taumode", idx.device)
        return self.blocks[0].attn.project(rms_norm(self.wte(idx)), 0 if packing is None else packing.positions)[1]

    def first_layer_key_energy(self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """E of the first layer's keys (first_layer_keys) for a batch of tokens, fp32 (B, Hkv, T)."""
        k = self.first_layer_keys(idx, doc_ids)
        energy = slice_energy(k, self.attention_laplacian(), self.config.eps, self.config.lambda_slices)
        return energy.squeeze(-1)  # (B, Hkv, T), or (B, Hkv, T, m) with m λ slices per head

    @torch.no_grad()
    def calibrate_tau(self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None) -> float:
        """Set every layer's tau to the median E of the first layer's keys over ``idx``; returns it."""
        if self.config.attention != "taumode":
            return float("nan")
        tau = float(self.first_layer_key_energy(idx, doc_ids).median().clamp_min(1e-4))
        for block in self.blocks:
            if block.attn.attention == "taumode":
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
