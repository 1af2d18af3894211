"""Context parallel taumode attention: one sequence split over the ranks of a process group.

A rank holds its share of the sequence's tokens. Each query needs every earlier key, and a taumode logit reads
a key only through its scalar λk (docs/math.md §Attention logits), so the ranks exchange λk and V, not K and V:
(Dv + 1)/(F + Dv) of the bytes a K/V ring (or all-gather) exchange moves at fp32 (`exchange_bytes`). The
exchange is one all-gather of λk and one of V per layer; its backward is their reduce-scatter, which hands
every rank the gradients that all the ranks' queries sent to its keys and values. Each rank then runs the
exact attention of its own queries over the gathered keys with the package's kernels (the O(T log T) path on
CPU from 1024 keys, the fused Triton kernels on a GPU), so nothing is approximated and nothing is quadratic
that was not before.

Causal load balance (layout "zigzag", as torch's load-balanced context parallel and ring-flash-attn's zigzag):
the sequence is cut into 2N equal chunks and rank r holds chunks r and 2N − 1 − r, so every rank has the same
number of (query, earlier key) pairs. "contiguous": rank r holds chunk r of N (cheap to form, unbalanced).
Positions are global: a chunk's queries run as a bottom-right aligned call over the keys up to their own end,
so causality and the ALiBi distances |i − j| are those of the whole sequence.

Parameters shared by the ranks (temperatures, slopes, tau, the Laplacian) get on each rank the gradient of its
own queries' share; summing them over the ranks (what DDP or FSDP does to every gradient) gives the gradient
of the whole sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import validation
from .api import taumode_attention_from_lambda, taumode_lambda

LAYOUTS = ("zigzag", "contiguous")
# torch 2.13 renamed the tensor collectives (the old names warn); older torch has only the old ones
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _Gather(torch.autograd.Function):
    """All-gather along a new leading dim (N, *x.shape); backward: reduce-scatter (sum) of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.size(0),) + tuple(x.shape[1:]))  # the shares stacked along dim 0
        _all_gather(out, x, group=group)
        return out.unflatten(0, (world, x.size(0)))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty(grad.shape[1:])
        _reduce_scatter(out, grad.flatten(0, 1).contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


@dataclass(frozen=True)
class ContextParallel:
    """How a sequence is split over ``group`` (every rank of it holds its share; see the module docstring).

    ``shard`` cuts a whole tensor to this rank's share, ``gather`` puts the shares back in global order (with
    gradients), ``positions`` gives the global positions of this rank's tokens (for RoPE), ``attend`` is the
    context parallel attention from λ. TauGPT takes one as ``model(idx, targets, context_parallel=...)``."""

    group: object
    layout: str = "zigzag"

    def __post_init__(self):
        validation.require(self.layout in LAYOUTS, lambda: f"layout must be one of {LAYOUTS}, got {self.layout!r}")

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def chunks(self) -> int:
        """The number of equal chunks a sequence is cut into."""
        return 2 * self.world if self.layout == "zigzag" else self.world

    def chunk_ids(self, rank: int | None = None) -> tuple[int, ...]:
        """The chunks ``rank`` (default: this one) holds, in the order its share stores them."""
        r = self.rank if rank is None else rank
        return (r, self.chunks - 1 - r) if self.layout == "zigzag" else (r,)

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's share of x (the whole sequence along ``dim``, a multiple of `chunks` long)."""
        validation.require(x.size(dim) % self.chunks == 0, lambda: (
            f"a sequence of {x.size(dim)} tokens does not split into {self.chunks} equal chunks "
            f"({self.world} ranks, layout {self.layout!r})"))
        pieces = x.chunk(self.chunks, dim)
        return torch.cat([pieces[i] for i in self.chunk_ids()], dim)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's share of a sequence along ``dim``, in global order; differentiable."""
        shares = _Gather.apply(x, self.group)  # (N, *x.shape)
        n_local = len(self.chunk_ids())
        pieces = {}
        for r in range(self.world):
            for c, piece in zip(self.chunk_ids(r), shares[r].chunk(n_local, dim)):
                pieces[c] = piece
        return torch.cat([pieces[c] for c in range(self.chunks)], dim)

    def positions(self, length: int, device=None) -> torch.Tensor:
        """The global positions (int64, (length,)) of the ``length`` tokens of this rank's share."""
        return self.shard(torch.arange(length * self.world, device=device), 0)

    def attend(self, lam_q, lam_k, v, *, temperature=1.0, is_causal=True, alibi_slopes=None, backend="auto",
               cu_seqlens=None):
        """context_parallel_attention over this split (its arguments)."""
        return context_parallel_attention(lam_q, lam_k, v, group=self.group, layout=self.layout,
                                          temperature=temperature, is_causal=is_causal, alibi_slopes=alibi_slopes,
                                          backend=backend, cu_seqlens=cu_seqlens)


def context_parallel_attention(lam_q, lam_k, v, *, group, temperature=1.0, is_causal=True, alibi_slopes=None,
                               layout="zigzag", backend="auto", cu_seqlens=None):
    """Taumode attention from λ of a sequence split over the ranks of ``group``; call it on every rank.

    Each rank passes its share of the sequence (see the module docstring for the layouts): lam_q (B, H, Tq/N),
    lam_k (B, Hkv, Tk/N), v (B, Hkv, Tk/N, Dv), global lengths Tq ≤ Tk split alike (each a multiple of 2N for
    "zigzag", N for "contiguous"); query i of the Tq stands at key position i + Tk − Tq (bottom-right, as in
    taumode_attention_from_lambda: Tq = Tk for training and prefill, Tq < Tk for a chunk after a cache).
    Returns this rank's queries' output (B, H, Tq/N, Dv), exactly what one process computes for those rows.

    Packed (cu_seqlens: int32 (S + 1,) offsets of the S sequences over the global rows, the same for queries
    and keys): lam_q (rows/N, H), lam_k (rows/N, Hkv), v (rows/N, Hkv, Dv), this rank's share of the rows;
    every sequence attended to alone (docs/math.md §Packed sequences). The offsets are read on the host.

    temperature (float or (H,)), alibi_slopes ((H,) or (B, H); packed: (H,) or (S, H)), backend: as in
    taumode_attention_from_lambda. Gradients reach this rank's λq and, through the reduce-scatter, every
    rank's λk and V; temperature and slopes get this rank's queries' share.
    """
    cp = ContextParallel(group, layout)
    packed = cu_seqlens is not None
    for name, t, ndim in (("lam_q", lam_q, 2 if packed else 3), ("lam_k", lam_k, 2 if packed else 3),
                          ("v", v, 3 if packed else 4)):
        validation.check_tensor(name, t, ndim=ndim)
    seq = 0 if packed else 2
    validation.require(lam_k.size(seq) == v.size(seq), lambda: (
        f"lam_k and v must hold the same tokens, got shapes {tuple(lam_k.shape)} and {tuple(v.shape)}"))
    n_local = len(cp.chunk_ids())
    validation.require(lam_q.size(seq) % n_local == 0 and lam_k.size(seq) % n_local == 0, lambda: (
        f"layout {layout!r} stores {n_local} chunks per rank: lam_q's {lam_q.size(seq)} and lam_k's "
        f"{lam_k.size(seq)} tokens must be multiples of {n_local}"))
    if packed:
        validation.require(lam_q.size(0) == lam_k.size(0), "packed: lam_q and lam_k must hold the same rows")
    kw = dict(temperature=temperature, alibi_slopes=alibi_slopes, backend=backend)
    lam_k_all, v_all = cp.gather(lam_k, seq), cp.gather(v, seq)
    if not is_causal:
        validation.require(not packed, "is_causal=False with cu_seqlens is not supported (packing is for causal "
                                       "training windows)")
        return taumode_attention_from_lambda(lam_q, lam_k_all, v_all, is_causal=False, **kw)
    Tq, Tk = lam_q.size(seq) * cp.world, lam_k_all.size(seq)
    validation.require(Tq <= Tk, lambda: f"is_causal needs Tq <= Tk, got {Tq} queries and {Tk} keys in all")
    q_chunk = Tq // cp.chunks
    outputs = []
    for chunk, lq in zip(cp.chunk_ids(), lam_q.chunk(n_local, seq)):
        end = Tk - Tq + (chunk + 1) * q_chunk  # the chunk's last query sees keys 0 .. end − 1
        if packed:
            outputs.append(_packed_chunk(lq, lam_k_all[:end], v_all[:end], cu_seqlens, chunk * q_chunk, kw))
        else:
            outputs.append(taumode_attention_from_lambda(lq, lam_k_all[:, :, :end], v_all[:, :, :end],
                                                         is_causal=True, **kw))
    return torch.cat(outputs, seq)


def _packed_chunk(lq, lam_k, v, cu_seqlens, start: int, kw: dict) -> torch.Tensor:
    """The packed queries of global rows start .. start + len(lq) over the key rows before their end: every
    sequence keeps its place (empty or query-less where it lies outside the chunk), so its queries are the last
    rows of its keys (bottom-right) and its slopes row is its own."""
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    end = start + lq.size(0)
    cu_k = cu.clamp(max=end)
    cu_q = cu.clamp(min=start, max=end) - start
    return taumode_attention_from_lambda(
        lq, lam_k, v, is_causal=True, cu_seqlens_q=cu_q.to(torch.int32).to(lq.device),
        cu_seqlens_k=cu_k.to(torch.int32).to(lq.device), max_seqlen_q=max(int(cu_q.diff().max()), 1),
        max_seqlen_k=max(int(cu_k.diff().max()), 1), **kw)


def context_parallel_taumode_attention(q, k, v, laplacian, *, group, tau=1.0, eps=1e-6, layout="zigzag",
                                       backend="auto", **kwargs):
    """context_parallel_attention from this rank's share of q (B, H, Tq/N, F), k (B, Hkv, Tk/N, F) and v: λ is
    per token, so each rank projects its own share (tau: float, (Hkv,) or a per-vector rule, as in
    taumode_attention; gradients to tau and the Laplacian are this rank's share) and only λk and V travel."""
    if isinstance(tau, torch.Tensor) and tau.dim() == 1 and q.dim() == 4:
        tau_q = tau.repeat_interleave(q.size(1) // k.size(1))  # a kv head's tau for each of its query heads
    else:
        tau_q = tau
    lam_q = taumode_lambda(q, laplacian, tau=tau_q, eps=eps, backend=backend)
    lam_k = taumode_lambda(k, laplacian, tau=tau, eps=eps, backend=backend)
    return context_parallel_attention(lam_q, lam_k, v, group=group, layout=layout, backend=backend, **kwargs)


def exchange_bytes(*, batch: int, kv_heads: int, seq_len: int, head_dim: int, v_dim: int, world: int,
                   v_itemsize: int = 4, k_itemsize: int | None = None) -> dict:
    """Bytes one rank sends per layer and training step (forward all-gather + backward reduce-scatter, ring
    algorithms: each moves (N − 1)/N of the gathered tensor through every rank) for a window of ``seq_len``
    tokens split over ``world`` ranks: λk in fp32 and V, against the same exchange of K and V (K in
    ``k_itemsize``, default V's), which ring attention's forward and backward also move.
    {"lambda_v": ..., "k_v": ..., "ratio": lambda_v / k_v}; at fp32 the ratio is (Dv + 1)/(F + Dv)."""
    k_itemsize = v_itemsize if k_itemsize is None else k_itemsize
    tokens = batch * kv_heads * seq_len * (world - 1) // world  # per direction: others' share of the window
    lambda_v = 2 * tokens * (4 + v_dim * v_itemsize)
    k_v = 2 * tokens * (head_dim * k_itemsize + v_dim * v_itemsize)
    return {"lambda_v": lambda_v, "k_v": k_v, "ratio": lambda_v / k_v}
