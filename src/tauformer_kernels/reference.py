"""Taumode attention in plain PyTorch: the float64 oracle and the memory-lean CPU default.

Two implementations of docs/math.md §The λ projection and §Attention logits, written for clarity and
checked against each other:

- `lambda_naive` / `attention_naive`: the oracle. Plain autograd, the whole T×T logit matrix in memory.
  Every other backend is tested against these in float64.
- `lambda_fwd_reference` / `lambda_bwd_reference` and `attention_fwd_chunked` / `attention_bwd_chunked`:
  the `backend="reference"` pair (docs/internal-contract.md). The attention runs over chunks of queries,
  recomputes P in the backward from the saved logsumexp (as FlashAttention does), and never holds more
  than one chunk of logits: the CPU default.

Everything is computed in float32, or in float64 when the inputs are float64 (so gradcheck can run).
"""
from __future__ import annotations

import torch

from . import varlen

# Elements of one chunk's logit tile (rows × keys); a few such temporaries live at once. 2^21 fp32 logits
# is 8 MiB: small against any cache-free working set, large enough that per-chunk overhead is negligible.
_CHUNK_ELEMENTS = 1 << 21


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 tensors (the oracle's precision), float32 for everything else."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# λ projection (docs/math.md §The λ projection)
# ----------------------------------------------------------------------------------------------------

def _times_transpose(x: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
    """x Lᵀ (L x of every vector), for a dense or a sparse CSR L (torch has dense·CSR and CSR·dense
    products, not dense·CSRᵀ)."""
    if laplacian.layout == torch.strided:
        return x @ laplacian.T
    return (laplacian @ x.reshape(-1, x.shape[-1]).T).T.reshape(x.shape)


def _rayleigh(x: torch.Tensor, laplacian: torch.Tensor, eps: float):
    """(x in the compute dtype, L x, s = xᵀx + eps, E_raw = xᵀLx / s) for x (..., F); L dense or sparse CSR."""
    xc = x.to(compute_dtype(x))
    lx = _times_transpose(xc, laplacian.to(xc.dtype))
    s = torch.linalg.vecdot(xc, xc) + eps
    return xc, lx, s, torch.linalg.vecdot(xc, lx) / s


def _tau_rows(tau: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tau (Hx,) viewed to broadcast over λ of shape (B, Hx, T); a per-vector tau (B, Hx, T) as it is."""
    return tau.to(dtype).view(-1, 1) if tau.dim() <= 1 else tau.to(dtype)


def _tau_grad(d_tau: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """dtau shaped like tau: summed per head for tau (Hx,), per vector for tau (B, Hx, T)."""
    return (d_tau.sum(dim=(0, 2)) if tau.dim() <= 1 else d_tau).to(tau.dtype)


# The reference crate's per-vector tau (its sparse path; docs/math.md §Per-vector tau): "vector-median" /
# "vector-mean" of the vector's own finite entries, floored at TAU_FLOOR and then at eps.
TAU_RULES = ("vector-median", "vector-mean")
TAU_FLOOR = 1e-10


def vector_tau(x: torch.Tensor, rule: str, eps: float) -> torch.Tensor:
    """tau of every vector of x (..., F): shape x.shape[:-1], in the compute dtype.

    The median of n finite entries is the middle one of the sorted entries (n odd) or the mean of the two
    middle ones (n even); a vector with no finite entry gets the floor. Gradient: that of the selected
    order statistics (1 on the middle entry, ½ on each of the two middle ones; ties split by the sort's
    order), 1/n on every finite entry for the mean, 0 where a floor is active.
    """
    if rule not in TAU_RULES:
        raise ValueError(f"tau rule must be one of {TAU_RULES}, got {rule!r}")
    xc = x.to(compute_dtype(x))
    finite = torch.isfinite(xc)
    count = finite.sum(-1)
    if rule == "vector-mean":
        value = torch.where(finite, xc, 0).sum(-1) / count.clamp_min(1)
    else:  # non-finite entries sort last, so the n finite ones are the first n
        ordered = torch.where(finite, xc, float("inf")).sort(-1).values
        lower = ordered.gather(-1, ((count - 1).clamp_min(0) // 2)[..., None])[..., 0]
        upper = ordered.gather(-1, (count // 2).clamp_max(xc.shape[-1] - 1)[..., None])[..., 0]
        value = 0.5 * (lower + upper)
    value = torch.where(count > 0, value, torch.full_like(value, TAU_FLOOR))
    return value.clamp_min(max(TAU_FLOOR, eps))


def lambda_naive(x: torch.Tensor, laplacian: torch.Tensor, tau: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The oracle: λ = E / (E + tau), E = max(xᵀLx / (xᵀx + eps), 0), for x (B, Hx, T, F), tau (Hx,) (one per
    head) or (B, Hx, T) (one per vector)."""
    xc = x.to(compute_dtype(x))
    energy = torch.einsum("...i,ij,...j->...", xc, laplacian.to(xc.dtype), xc) / ((xc * xc).sum(-1) + eps)
    energy = energy.clamp_min(0)
    t = _tau_rows(tau, xc.dtype)
    return energy / (energy + t)


def lambda_fwd_reference(x, laplacian, tau, eps):
    # xᵀLx = xᵀ(x L): no transpose of L, and as few ops as _rayleigh allows (a decode step's λ is
    # launch-bound); the backward needs _rayleigh's L x and s, the forward only E
    dt = compute_dtype(x)
    xc = x if x.dtype == dt else x.to(dt)
    lap = laplacian if laplacian.dtype == dt else laplacian.to(dt)
    energy = (torch.linalg.vecdot(xc, xc @ lap) / (torch.linalg.vecdot(xc, xc) + eps)).clamp_min_(0)
    return energy / (energy + _tau_rows(tau, dt))


def _lambda_energy_grad(dlam, e_raw, tau):
    """dλ/dE_raw · dlam (zero where the clamp is active) and dλ/dtau · dlam, both shaped like λ."""
    t = _tau_rows(tau, e_raw.dtype)
    energy = e_raw.clamp_min(0)
    denom = (energy + t) ** 2
    # clamp_min passes the gradient where E_raw >= 0, as autograd's clamp does
    d_energy = torch.where(e_raw >= 0, dlam * t / denom, torch.zeros_like(e_raw))
    return d_energy, -dlam * energy / denom


def lambda_bwd_reference(dlam, x, laplacian, tau, eps):
    """dx = dE · 2 (L_sym x − E_raw x) / s;  dtau = dlam · (−E / (E + tau)²), summed per head for tau (Hx,)."""
    xc, lx, s, e_raw = _rayleigh(x, laplacian, eps)
    d_energy, d_tau = _lambda_energy_grad(dlam.to(e_raw.dtype), e_raw, tau)
    l_sym_x = 0.5 * (lx + xc @ laplacian.to(xc.dtype))
    dx = (2 * d_energy / s)[..., None] * (l_sym_x - e_raw[..., None] * xc)
    return dx.to(x.dtype), _tau_grad(d_tau, tau)


def lambda_laplacian_grad(dlam, x, laplacian, tau, eps):
    """dL = Σ_vectors dE · x xᵀ / s (dE_raw/dL = x xᵀ / s): one F×F product over all vectors."""
    xc, _, s, e_raw = _rayleigh(x, laplacian, eps)
    d_energy, _ = _lambda_energy_grad(dlam.to(e_raw.dtype), e_raw, tau)
    rows = xc.reshape(-1, xc.shape[-1])
    return (rows * (d_energy / s).reshape(-1, 1)).T @ rows


# ----------------------------------------------------------------------------------------------------
# Attention from scalars (docs/math.md §Attention logits)
# ----------------------------------------------------------------------------------------------------

def key_offsets(tq: int, tk: int, device, rows: tuple[int, int] | None = None, keys: int | None = None) -> torch.Tensor:
    """i + Tk − Tq − j, the bottom-right-aligned distance from query i back to key j, for the queries
    in `rows` (start, stop; all by default) and the first `keys` keys (all by default)."""
    start, stop = rows if rows is not None else (0, tq)
    i = torch.arange(start, stop, device=device)[:, None]
    j = torch.arange(tk if keys is None else keys, device=device)[None, :]
    return i + (tk - tq) - j


def attention_naive(lq, lk, v, temperature, alibi_slopes=None, is_causal=True):
    """The oracle: softmax_j(−|λq_i − λk_j| / T_h − slope·|i + Tk − Tq − j|) · V, causal bottom-right.

    lq (B, H, Tq), lk (B, Hkv, Tk), v (B, Hkv, Tk, Dv), temperature (H,), alibi_slopes (B, H) or None.
    Plain autograd; materialises every logit.
    """
    b, h, tq = lq.shape
    hkv, tk = lk.shape[1], lk.shape[2]
    group = h // hkv
    dt = compute_dtype(lq)
    lk_h = lk.to(dt).repeat_interleave(group, dim=1)
    logits = -(lq.to(dt)[..., :, None] - lk_h[..., None, :]).abs() / temperature.to(dt).view(1, h, 1, 1)
    offsets = key_offsets(tq, tk, lq.device)
    if alibi_slopes is not None:
        logits = logits - alibi_slopes.to(dt).view(b, h, 1, 1) * offsets.abs().to(dt)
    if is_causal:
        logits = logits.masked_fill(offsets < 0, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    out = p @ v.to(dt).repeat_interleave(group, dim=1)
    return out.to(v.dtype)


def _row_chunks(b, hkv, group, tq, tk):
    """Query chunk length so that one chunk's logits (B, Hkv, G·chunk, Tk) hold about _CHUNK_ELEMENTS."""
    return max(1, min(tq, _CHUNK_ELEMENTS // max(1, b * hkv * group * tk)))


class _ChunkLogits:
    """Logits of one chunk of queries against the keys they can see, in the grouped-row layout.

    The G query heads that share a kv head are folded into the rows — (B, Hkv, G·c, Tk') — so V is
    multiplied without being expanded per query head. Tk' stops at the last key the chunk's last
    query sees when causal.
    """

    def __init__(self, lq, lk, temperature, alibi_slopes, is_causal, start, stop):
        b, h, tq = lq.shape
        hkv, tk = lk.shape[1], lk.shape[2]
        group, c = h // hkv, stop - start
        dt = compute_dtype(lq)
        self.keys = min(tk, stop + tk - tq) if is_causal else tk
        self.shape = (b, hkv, group * c)
        self.lq_rows = lq[:, :, start:stop].to(dt).reshape(b, hkv, group * c)
        self.lk = lk[:, :, : self.keys].to(dt)
        self.inv_temp_rows = (1.0 / temperature.to(dt)).view(hkv, group, 1).expand(hkv, group, c).reshape(
            1, hkv, group * c)
        self.diff = self.lq_rows[..., :, None] - self.lk[..., None, :]
        logits = self.diff.abs().mul_(-self.inv_temp_rows[..., None])
        offsets = key_offsets(tq, tk, lq.device, (start, stop), self.keys)
        self.distance = None
        if alibi_slopes is not None:
            self.distance = offsets.abs().to(dt)  # (c, Tk')
            slopes = alibi_slopes.to(dt).view(b, hkv, group, 1, 1)
            logits = (logits.view(b, hkv, group, c, self.keys) - slopes * self.distance).view(
                b, hkv, group * c, self.keys)
        if is_causal:
            logits = logits.masked_fill((offsets < 0).repeat(group, 1), float("-inf"))
        self.logits = logits


@varlen.accepts_packs(varlen.forward_by_sequence)
def attention_fwd_chunked(lq, lk, v, temperature, alibi_slopes, is_causal):
    """Forward over chunks of queries: returns (out in v.dtype, lse in the compute dtype). A pack (a
    trailing varlen.Seqs) runs per group of sequences."""
    b, h, tq = lq.shape
    hkv, tk, dv = lk.shape[1], lk.shape[2], v.shape[-1]
    group = h // hkv
    dt = compute_dtype(lq)
    out = torch.empty(b, h, tq, dv, dtype=v.dtype, device=v.device)
    lse = torch.empty(b, h, tq, dtype=dt, device=lq.device)
    out_g = out.view(b, hkv, group, tq, dv)
    lse_g = lse.view(b, hkv, group, tq)
    chunk = _row_chunks(b, hkv, group, tq, tk)
    for start in range(0, tq, chunk):
        stop = min(tq, start + chunk)
        tile = _ChunkLogits(lq, lk, temperature, alibi_slopes, is_causal, start, stop)
        row_max = tile.logits.amax(-1, keepdim=True)  # finite: every causal row sees its own diagonal key
        p = tile.logits.sub_(row_max).exp_()
        row_sum = p.sum(-1, keepdim=True)
        o = (p @ v[:, :, : tile.keys].to(dt)) / row_sum
        out_g[:, :, :, start:stop] = o.view(b, hkv, group, stop - start, dv).to(v.dtype)
        lse_g[:, :, :, start:stop] = (row_max + row_sum.log()).view(b, hkv, group, stop - start)
    return out, lse


@varlen.accepts_packs(varlen.backward_by_sequence)
def attention_bwd_chunked(dout, lq, lk, v, out, lse, temperature, alibi_slopes, is_causal):
    """Backward over the same chunks (docs/math.md §Attention logits), P recomputed from the chunk's logits.

    A chunk holds whole rows, so P is the row's softmax again and D_i = Σ_j P_ij dP_ij comes from that
    same P, as autograd's softmax backward forms it, instead of exp(s − lse) and D_i = dO_i·O_i. The
    temperature and tau gradients are sums of dS·|Δλ| that cancel (Σ_j dS_ij = 0): with P off its
    normalisation by the rounding of lse, or D_i from the stored O, they lost ~2–50× against plain
    fp32 autograd (median over seeds 2.2×); with both from one P they match it. `out` and `lse` are
    not needed here (the contract passes them for the kernels, which see one key block at a time).
    A pack (a trailing varlen.Seqs) runs per group of sequences."""
    b, h, tq = lq.shape
    hkv, tk, dv = lk.shape[1], lk.shape[2], v.shape[-1]
    group = h // hkv
    dt = compute_dtype(lq)
    do_g = dout.to(dt).view(b, hkv, group, tq, dv)
    v_c = v.to(dt)
    dlq = torch.empty(b, h, tq, dtype=dt, device=lq.device)
    dlq_g = dlq.view(b, hkv, group, tq)
    dlk = torch.zeros(b, hkv, tk, dtype=dt, device=lq.device)
    dv_acc = torch.zeros(b, hkv, tk, dv, dtype=dt, device=v.device)
    dtemp = torch.zeros(hkv, group, dtype=dt, device=lq.device)
    dslope = None if alibi_slopes is None else torch.zeros(b, hkv, group, dtype=dt, device=lq.device)
    chunk = _row_chunks(b, hkv, group, tq, tk)
    for start in range(0, tq, chunk):
        stop = min(tq, start + chunk)
        c = stop - start
        tile = _ChunkLogits(lq, lk, temperature, alibi_slopes, is_causal, start, stop)
        keys = tile.keys
        rows = lambda t: t[:, :, :, start:stop].reshape(b, hkv, group * c, *t.shape[4:])  # noqa: E731
        do_rows = rows(do_g)
        p = torch.softmax(tile.logits, dim=-1)
        dv_acc[:, :, :keys] += p.transpose(-1, -2) @ do_rows
        dp = do_rows @ v_c[:, :, :keys].transpose(-1, -2)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
        ds_sign = ds * torch.sign(tile.diff)
        dlq_g[:, :, :, start:stop] = (-(ds_sign.sum(-1)) * tile.inv_temp_rows).view(b, hkv, group, c)
        dlk[:, :, :keys] += (ds_sign * tile.inv_temp_rows[..., None]).sum(-2)
        weighted_abs = (ds * tile.diff.abs()).sum(-1) * tile.inv_temp_rows**2  # Σ_j dS |Δ| / T²
        dtemp += weighted_abs.view(b, hkv, group, c).sum(dim=(0, 3))
        if dslope is not None:
            dslope -= (ds.view(b, hkv, group, c, keys) * tile.distance).sum(dim=(-1, -2))
    dalibi = None if dslope is None else dslope.view(b, h).to(alibi_slopes.dtype)
    return (dlq.to(lq.dtype), dlk.to(lk.dtype), dv_acc.to(v.dtype), dtemp.view(h).to(temperature.dtype), dalibi)


def remove_translation(dlq: torch.Tensor, dlk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dλq, dλk) projected onto the gradients that a common shift of λ cannot have.

    The logits depend on λq − λk only, so shifting λq of the G query heads of a kv group and λk of that
    kv head by one constant changes nothing: per (batch, kv head), Σ dλq + Σ dλk = 0 exactly. A backend
    whose query-side and key-side sums round differently (loglinear's two scans, the kernels' two
    passes) breaks that by its rounding, and the tau gradient, Σ dλ·dλ/dtau with a weight of one sign,
    picks the violation up whole (loglinear at temperature 1e-4: ~3× the error of plain fp32 autograd).
    Subtracting the mean violation from every entry is the orthogonal projection onto Σ = 0, which holds
    the true gradient, so it never moves the result further from it (in the 2-norm; docs/math.md
    §Attention logits).
    """
    b, h, tq = dlq.shape
    hkv, tk = dlk.shape[1], dlk.shape[2]
    group = h // hkv
    dt = compute_dtype(dlq)
    q_rows = dlq.to(dt).reshape(b, hkv, group * tq)
    k_rows = dlk.to(dt)
    shift = ((q_rows.sum(-1) + k_rows.sum(-1)) / (group * tq + tk))[..., None]
    return (q_rows - shift).view(b, h, tq).to(dlq.dtype), (k_rows - shift).to(dlk.dtype)
