"""TauGPT: a small GPT whose attention runs on taumode scalars (SPEC §3), and its (V, λk) cache (SPEC §4).

Read top to bottom:
  rope / rms_norm helpers -> KVCache -> CausalSelfAttention -> MLP -> Block -> TauGPT.

attention="taumode": per head, q and k become one scalar each, λ = E / (E + tau) with
E = xᵀLx / xᵀx (L the F×F Laplacian), and the logits are -|λq_i - λk_j| / temperature_h
(optionally - slope_h·|i - j|, the recency term). attention="dot": the same model with PyTorch's
scaled dot product attention: the baseline.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import tauformer_kernels as tk

from .config import TauGPTConfig

NORM_EPS = 1e-6  # weightless RMS norms (SPEC §3)
QKV_CLAMP = 5.0  # q, k, v are clamped to ±5 after their projections (SPEC §3)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=NORM_EPS)


def rope_cos_sin(head_dim: int, start: int, length: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (length, head_dim // 2) for absolute positions start .. start + length - 1."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    pos = torch.arange(start, start + length, dtype=torch.float32, device=device)
    angles = pos[:, None] * inv_freq[None, :]
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
    """E = max(xᵀLx / (xᵀx + eps), 0) over the last dim, in fp32 (SPEC §1)."""
    x = x.float()
    return (((x @ laplacian) * x).sum(-1) / ((x * x).sum(-1) + eps)).clamp_min(0)


class KVCache:
    """Per-layer cache (SPEC §4); ``model(idx, cache=c)`` writes at ``c.pos`` and advances it.

    taumode: ``v[l]`` (B, Hkv, max_len, F) in the model's dtype and ``lam_k[l]`` (B, Hkv, max_len) fp32.
    dot:     ``k[l]`` and ``v[l]``, both (B, Hkv, max_len, F).
    Attention reads the slices [:pos + T] (views, no copies); nothing is reallocated while decoding.

    taumode with ``sorted=True``: ``sorted[l]`` is a tauformer_kernels.SortedCache per layer instead, made
    on the first call with the layer's temperatures and slopes (fixed at inference): a decode step costs
    O(log T)-ish blocks instead of O(T) keys, for about 3× the bytes (see sorted_cache.py).
    """

    def __init__(self, config: TauGPTConfig, batch_size: int, max_len: int, device, dtype: torch.dtype,
                 sorted: bool = False):
        if sorted and config.attention != "taumode":
            raise ValueError("sorted=True: the sorted cache is for taumode attention only")
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.attention = config.attention
        self.batch_size = batch_size
        self.max_len = max_len
        self.n_layer = config.n_layer
        self.pos = 0
        self.sorted = [None] * config.n_layer if sorted else None
        if sorted:  # the sorted caches hold the keys and values themselves
            self.v, self.k, self.lam_k = [], None, []
            return
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        if config.attention == "taumode":
            self.k = None
            self.lam_k = [torch.zeros(shape[:3], device=device, dtype=torch.float32) for _ in range(config.n_layer)]
        else:
            self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
            self.lam_k = None

    def tensors(self) -> list[torch.Tensor]:
        return self.v + (self.k or []) + (self.lam_k or [])

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
        self.pos = 0
        if self.sorted is not None:
            self.sorted = [None] * self.n_layer


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TauGPTConfig):
        super().__init__()
        self.config = config
        C, H, Hkv, Fd = config.n_embd, config.n_head, config.n_kv_head, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = H, Hkv, Fd
        self.c_q = nn.Linear(C, H * Fd, bias=False)
        self.c_k = nn.Linear(C, Hkv * Fd, bias=False)
        self.c_v = nn.Linear(C, Hkv * Fd, bias=False)
        self.c_proj = nn.Linear(H * Fd, C, bias=False)
        if config.attention == "taumode":
            # Per-head temperature, learned in log space; the initial value keeps attention non-uniform.
            self.log_temperature = nn.Parameter(torch.full((H,), math.log(config.temperature_init)))
            # One tau per kv head (shared by the query heads of its group); calibrated by TauGPT.calibrate_tau.
            log_tau = torch.full((Hkv,), math.log(config.tau_init))
            if config.learn_tau:
                self.log_tau = nn.Parameter(log_tau)
            else:
                self.register_buffer("log_tau", log_tau)
        if config.recency == "none" and not (config.lambda_term or config.attention == "dot"):
            raise ValueError("lambda_term=False (the recency-only control) needs recency 'fixed' or 'learned'")
        if config.recency == "learned":
            self.log_slopes = nn.Parameter(alibi_slopes(H).log())
        elif config.recency == "fixed":
            self.register_buffer("log_slopes", alibi_slopes(H).log())
        else:
            self.log_slopes = None

    def project(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B,H,T,F), k and v (B,Hkv,T,F): projection, clamp, RoPE at positions start.., RMS norm of q, k."""
        B, T, _ = x.shape
        q = self.c_q(x).clamp(-QKV_CLAMP, QKV_CLAMP).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.c_k(x).clamp(-QKV_CLAMP, QKV_CLAMP).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.c_v(x).clamp(-QKV_CLAMP, QKV_CLAMP).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if not (self.config.attention == "taumode" and self.config.lambda_before_rope):
            cos, sin = rope_cos_sin(self.head_dim, start, T, self.config.rope_base, x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return rms_norm(q), rms_norm(k), v

    def slopes(self) -> torch.Tensor | None:
        return None if self.log_slopes is None else self.log_slopes.float().exp()

    def forward(self, x: torch.Tensor, laplacian: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        start = 0 if cache is None else cache.pos
        q, k, v = self.project(x, start)
        if self.config.attention == "taumode":
            y = self._taumode(q, k, v, laplacian, cache, layer, start)
        else:
            y = self._dot(q, k, v, cache, layer, start)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    def _taumode(self, q, k, v, laplacian, cache, layer, start):
        cfg = self.config
        tau = self.log_tau.float().exp()  # (Hkv,)
        temperature = self.log_temperature.float().exp()  # (H,)
        slopes = self.slopes()
        if not cfg.lambda_term:  # the recency-only control: λq = λk = 0
            return self._taumode_from_lambda(q.new_zeros(q.shape[:3], dtype=torch.float32),
                                             k.new_zeros(k.shape[:3], dtype=torch.float32), v, temperature,
                                             slopes, cache, layer, start)
        if cache is None:  # training / full forward: one fused call over the whole sequence
            return tk.taumode_attention(q, k, v, laplacian, tau=tau, temperature=temperature, eps=cfg.eps,
                                        is_causal=True, alibi_slopes=slopes, backend=cfg.backend)
        group = self.n_head // self.n_kv_head
        lam_q = tk.taumode_lambda(q, laplacian, tau=tau.repeat_interleave(group), eps=cfg.eps, backend=cfg.backend)
        lam_k = tk.taumode_lambda(k, laplacian, tau=tau, eps=cfg.eps, backend=cfg.backend)
        return self._taumode_from_lambda(lam_q, lam_k, v, temperature, slopes, cache, layer, start)

    def _taumode_from_lambda(self, lam_q, lam_k, v, temperature, slopes, cache, layer, start):
        if cache is None:
            return tk.taumode_attention_from_lambda(lam_q, lam_k, v, temperature=temperature, is_causal=True,
                                                    alibi_slopes=slopes, backend=self.config.backend)
        end = start + lam_q.size(2)
        if cache.sorted is not None:
            return self._taumode_sorted(lam_q, lam_k, v, temperature, slopes, cache, layer)
        cache.lam_k[layer][:, :, start:end] = lam_k
        cache.v[layer][:, :, start:end] = v
        return tk.taumode_attention_from_lambda(
            lam_q, cache.lam_k[layer][:, :, :end], cache.v[layer][:, :, :end], temperature=temperature,
            is_causal=True, alibi_slopes=slopes, backend=self.config.backend)

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

    def _dot(self, q, k, v, cache, layer, start):
        if cache is not None:
            end = start + q.size(2)
            cache.k[layer][:, :, start:end] = k
            cache.v[layer][:, :, start:end] = v
            k, v = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_head != self.n_kv_head
        slopes = self.slopes()
        if slopes is None and Tq == Tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        # Bottom-right aligned causal mask (a chunk appended to a cache sees every earlier key).
        dist = (torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)) - torch.arange(Tk, device=q.device)[None, :]
        if slopes is None:
            mask = dist >= 0
        else:
            mask = (-slopes[:, None, None] * dist.float()).masked_fill(dist < 0, float("-inf")).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class MLP(nn.Module):
    def __init__(self, config: TauGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: TauGPTConfig):
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def forward(self, x, laplacian, cache=None, layer=0):
        x = x + self.attn(rms_norm(x), laplacian, cache, layer)
        return x + self.mlp(rms_norm(x))


class TauGPT(nn.Module):
    def __init__(self, config: TauGPTConfig, laplacian: torch.Tensor | None = None):
        """``laplacian`` (F, F) overrides ``config.laplacian`` (used when loading a checkpoint)."""
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if laplacian is None:
            laplacian = build_laplacian(config.laplacian, config.head_dim)
        if tuple(laplacian.shape) != (config.head_dim, config.head_dim):
            raise ValueError(f"laplacian has shape {tuple(laplacian.shape)}, the head dim needs "
                             f"({config.head_dim}, {config.head_dim})")
        # Shared by every head and layer (SPEC §5); saved with the weights so a checkpoint is self-contained.
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
            nn.init.zeros_(block.mlp.c_proj.weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) in fp32; with ``targets`` the mean cross-entropy instead.

        With ``cache`` the tokens are placed at positions cache.pos .. cache.pos + T − 1 (prefill is one
        call, decode is T = 1) and the cache advances by T.
        """
        B, T = idx.shape
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        else:
            if B != cache.batch_size or cache.pos + T > cache.max_len:
                raise ValueError(f"cache holds batch {cache.batch_size} × {cache.max_len} positions at pos "
                                 f"{cache.pos}; cannot take idx of shape {(B, T)}")
        x = self.wte(idx)
        laplacian = self.attention_laplacian()
        for layer, block in enumerate(self.blocks):
            x = block(x, laplacian, cache, layer)
        logits = self.lm_head(rms_norm(x)).float()
        cap = self.config.logit_softcap
        logits = cap * torch.tanh(logits / cap)
        if cache is not None:
            cache.pos += T
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  sorted: bool = False) -> KVCache:
        dtype = dtype or self.lm_head.weight.dtype
        return KVCache(self.config, batch_size, max_len, self.lm_head.weight.device, dtype, sorted=sorted)

    @torch.no_grad()
    def first_layer_key_energy(self, idx: torch.Tensor) -> torch.Tensor:
        """E of the first layer's keys (RoPE'd, RMS-normed) for a batch of tokens, fp32 (B, Hkv, T)."""
        k = self.blocks[0].attn.project(rms_norm(self.wte(idx)), 0)[1]
        return key_energy(k, self.attention_laplacian(), self.config.eps)

    @torch.no_grad()
    def calibrate_tau(self, idx: torch.Tensor) -> float:
        """Set every layer's tau to the median E of the first layer's keys over ``idx``; returns it."""
        if self.config.attention != "taumode":
            return float("nan")
        tau = float(self.first_layer_key_energy(idx).median().clamp_min(1e-4))
        for block in self.blocks:
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
