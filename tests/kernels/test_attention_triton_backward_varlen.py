"""The Triton attention backward on packed variable-length sequences (varlen.Seqs, FlashAttention's
cu_seqlens) against the float64 oracle, sequence by sequence (docs/math.md §Packed sequences).

A pack is one batch row: λq (1, H, total_q), λk (1, Hkv, total_k), V (1, Hkv, total_k, Dv) and dO, O
(1, H, total_q, Dv) are strided views of packed (total, heads[, Dv]) tensors, as the public API passes them.
Every sequence must get the gradients of `reference.attention_naive` on that sequence alone (causal
bottom-right and ALiBi distances inside it, slopes row b); dtemperature is their sum over sequences,
dalibi one row per sequence. (out, lse) come from reference.attention_fwd_chunked per sequence, so these
tests do not depend on the forward kernel. Every output is poisoned with NaN first.

Runs under TRITON_INTERPRET=1 on CPU (conftest), where the backward takes 32×32 tiles and 2 partial-dλq
slots: the longest sequences below have more key blocks than slots (several launches adding into their
slots), the short ones fewer (slots that only zeros fill). Tolerances (relative norms) as in
test_attention_triton_backward.py and test_gpu_configs.py: fp32 1e-4·max(1, 0.01/temperature), fp16 2e-2,
bf16 3e-2.
"""
import pytest
import torch
from helpers import relative_error, temperature_tolerance

from tauformer_kernels import reference, varlen

triton = pytest.importorskip("triton")
from tauformer_kernels.attention_triton_backward import (  # noqa: E402
    MAX_FUSED_DV,
    attention_bwd_triton,
    backward_launches,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("dlq", "dlk", "dv", "dtemperature", "dalibi")
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}

# (queries, keys) per sequence: empty, one token, Tq < Tk and Tq = Tk, keys that no query sees (Tq = 0 < Tk),
# and a sequence of 100 keys (4 key blocks of 32, 2 slots on the CPU)
Q_LENS = (5, 0, 1, 40, 70, 0)
K_LENS = (9, 0, 1, 40, 100, 7)


def _bounds(seqs):
    """Each sequence's (q_start, q_end, k_start, k_end) of a valid pack (offsets ending at the rows)."""
    return varlen.bounds(seqs, int(seqs.cu_q[-1]), int(seqs.cu_k[-1]))


def _tolerance(dtype, temperature):
    return temperature_tolerance(TOL[dtype], temperature) if dtype == torch.float32 else TOL[dtype]


def _offsets(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def _pack(q_lens, k_lens, h, hkv, dv, temperature, *, dtype, is_causal, alibi):
    """A pack's inputs (views of packed tensors, on DEVICE), its Seqs, and (out, lse) per sequence."""
    cu_q, cu_k = _offsets(q_lens), _offsets(k_lens)
    total_q, total_k = sum(q_lens), sum(k_lens)
    seqs = varlen.Seqs(cu_q, cu_k, max(q_lens), max(k_lens))
    lq = torch.rand(total_q, h).t().unsqueeze(0)                    # (1, H, total_q), time stride H
    lk = torch.rand(total_k, hkv).t().unsqueeze(0)
    v = torch.randn(total_k, hkv, dv).to(dtype).permute(1, 0, 2).unsqueeze(0)
    dout = torch.randn(total_q, h, dv).to(dtype).permute(1, 0, 2).unsqueeze(0)
    temp = temperature * torch.linspace(1.0, 1.5, h)
    slopes = 0.05 + 0.2 * torch.rand(len(q_lens), h) if alibi else None
    lq, lk, v, dout, temp = (t.to(DEVICE) for t in (lq, lk, v, dout, temp))
    slopes = None if slopes is None else slopes.to(DEVICE)
    out, lse = varlen.forward_by_sequence(reference.attention_fwd_chunked, lq, lk, v, temp, slopes, is_causal, seqs)
    return dict(dout=dout, lq=lq, lk=lk, v=v, out=out, lse=lse, temp=temp, slopes=slopes), seqs


def _run(t, seqs, is_causal):
    return attention_bwd_triton(t["dout"], t["lq"], t["lk"], t["v"], t["out"], t["lse"], t["temp"], t["slopes"],
                                is_causal, seqs, poison=True)


def _oracle(lq, lk, v, temp, slopes, dout, is_causal):
    leaves = [x.detach().double().requires_grad_(True) for x in (lq, lk, v, temp)]
    sl = None if slopes is None else slopes.detach().double().requires_grad_(True)
    out = reference.attention_naive(*leaves, sl, is_causal)
    grads = torch.autograd.grad(out, leaves + ([sl] if sl is not None else []), dout.double())
    return list(grads) + ([None] if sl is None else [])


def _floor(name, temperature, v, dout, numel):
    """The natural scale of a gradient that is exactly zero in the reference (a single visible key: softmax
    is constant): dS ~ |dP| per entry, times 1/T for dλ, 1/T² for dT (as test_attention_triton_backward)."""
    dp_scale = (dout.double().pow(2).mean().sqrt() * v.double().pow(2).mean().sqrt() * v.shape[-1] ** 0.5).item()
    scale = {"dlq": 1 / temperature, "dlk": 1 / temperature, "dtemperature": temperature ** -2}.get(name, 1.0)
    return 1e-2 * max(1.0, scale) * dp_scale * numel ** 0.5


def _check(t, seqs, is_causal, temperature, tol):
    """Every gradient of every sequence against the oracle on that sequence alone."""
    got = _run(t, seqs, is_causal)
    dlq, dlk, dv, dtemp, dalibi = got
    h, hkv, total_q, total_k, d = dlq.shape[1], dlk.shape[1], dlq.shape[2], dlk.shape[2], dv.shape[-1]
    assert dlq.shape == (1, h, total_q) and dlk.shape == (1, hkv, total_k) and dv.shape == (1, hkv, total_k, d)
    assert dv.dtype == t["v"].dtype and dv[0].transpose(0, 1).is_contiguous(), "dv: packed (total_k, Hkv, Dv) memory"
    for name, g in zip(NAMES, got):
        assert g is None or torch.isfinite(g).all(), f"{name}: non-finite values (an unwritten element?)"
    assert (dalibi is None) == (t["slopes"] is None)
    want_dtemp = torch.zeros(h, dtype=torch.float64)
    for b, (q0, q1, k0, k1) in enumerate(_bounds(seqs)):
        rows, keys = slice(q0, q1), slice(k0, k1)
        if q1 == q0:
            # no query: its keys get no gradient, its slope row none
            assert not dlk[:, :, keys].any() and not dv[:, :, keys].any(), f"sequence {b}: keys of no query"
            assert dalibi is None or not dalibi[b].any(), f"sequence {b}: slope gradient without queries"
            continue
        slopes = None if t["slopes"] is None else t["slopes"][b:b + 1]
        v_s, dout_s = t["v"][:, :, keys], t["dout"][:, :, rows]
        want = _oracle(t["lq"][:, :, rows], t["lk"][:, :, keys], v_s, t["temp"], slopes, dout_s, is_causal)
        want_dtemp += want[3].cpu()
        pieces = (dlq[:, :, rows], dlk[:, :, keys], dv[:, :, keys], None, None if dalibi is None else dalibi[b:b + 1])
        for name, g, w in zip(NAMES, pieces, want):
            if g is None or w is None:
                continue
            err = relative_error(g, w, floor=_floor(name, temperature, v_s, dout_s, w.numel()))
            assert err < tol, f"sequence {b} ({q1 - q0}×{k1 - k0}) {name}: relative error {err:.2e} >= {tol:.1e}"
    err = relative_error(dtemp, want_dtemp, floor=_floor("dtemperature", temperature, t["v"], t["dout"], h))
    assert err < tol, f"dtemperature: relative error {err:.2e} >= {tol:.1e}"


@pytest.mark.parametrize("alibi", [True, False], ids=["alibi", "no-alibi"])
@pytest.mark.parametrize("temperature", [1e-3, 10.0])
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
def test_fp32_ragged_pack_matches_oracle(is_causal, temperature, alibi):
    """GQA 4/2, Dv 24 (masked feature columns), the ragged pack of Q_LENS / K_LENS."""
    t, seqs = _pack(Q_LENS, K_LENS, 4, 2, 24, temperature, dtype=torch.float32, is_causal=is_causal, alibi=alibi)
    _check(t, seqs, is_causal, temperature, _tolerance(torch.float32, temperature))


@pytest.mark.parametrize("dtype, temperature, is_causal", [
    (torch.float16, 1e-3, True), (torch.float16, 10.0, False),
    (torch.bfloat16, 1e-3, False), (torch.bfloat16, 10.0, True),
], ids=["fp16-1e-3-causal", "fp16-10-full", "bf16-1e-3-full", "bf16-10-causal"])
def test_low_precision_pack_matches_oracle(dtype, temperature, is_causal):
    """P, dO and dS∘sign enter the products in V's dtype (bf16 and the tensor-core rounding emulated)."""
    t, seqs = _pack(Q_LENS, K_LENS, 4, 2, 32, temperature, dtype=dtype, is_causal=is_causal, alibi=True)
    _check(t, seqs, is_causal, temperature, _tolerance(dtype, temperature))


@pytest.mark.parametrize("is_causal, h, hkv, tiles, dt_tile", [(True, 4, 2, (32, 64), False),
                                                                (False, 2, 2, (64, 64), True)],
                         ids=["causal-gqa", "full"])
def test_gpu_configs_pack(monkeypatch, is_causal, h, hkv, tiles, dt_tile):
    """TAUFORMER_GPU_CONFIGS=1: the GPU's bf16 tiles of sm_90 for a pack (64 keys per program) and the
    GPU=True branch (layout anchor, PTX exp2 emulated), with and without the dtemperature tile; a sequence
    of 200 keys has 4 key blocks of 64, more than the CPU's 2 slots."""
    monkeypatch.setenv("TAUFORMER_GPU_CONFIGS", "1")
    shape = dict(tq=260, tk=330, has_alibi=False, group=h // hkv, is_causal=is_causal, varlen=True)
    launches = backward_launches(torch.bfloat16, 64, **shape)
    assert launches == backward_launches(torch.bfloat16, 64, **shape, gpu=True)
    ce = launches[0].constexprs
    assert ce["GPU"] and ce["VARLEN"] and (ce["BLOCK_M"], ce["BLOCK_N"]) == tiles and ce["DT_TILE"] == dt_tile
    assert not ce["EVEN_M"] and not ce["EVEN_N"]  # a pack's lengths are on the device only
    q_lens, k_lens = (3, 0, 150, 1, 64, 42), (3, 0, 200, 1, 64, 62)
    t, seqs = _pack(q_lens, k_lens, h, hkv, 64, 0.05, dtype=torch.bfloat16, is_causal=is_causal, alibi=False)
    _check(t, seqs, is_causal, 0.05, TOL[torch.bfloat16])


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
def test_nothing_leaks_across_sequences(is_causal):
    """NaN in every input of one sequence (λ, V, dO, and so O and lse): the other sequences' gradients are
    bitwise those of the clean pack (the masked tails of neighbouring blocks never read it)."""
    t, seqs = _pack(Q_LENS, K_LENS, 4, 2, 24, 0.05, dtype=torch.float32, is_causal=is_causal, alibi=True)
    clean = _run(t, seqs, is_causal)
    bad = 3  # 40 queries, 40 keys: its neighbours' last blocks end inside its rows and keys
    (q0, q1, k0, k1) = _bounds(seqs)[bad]
    dirty = {name: (x.clone() if torch.is_tensor(x) else x) for name, x in t.items()}
    for name, sl in (("lq", slice(q0, q1)), ("dout", slice(q0, q1)), ("out", slice(q0, q1)), ("lse", slice(q0, q1)),
                     ("lk", slice(k0, k1)), ("v", slice(k0, k1))):
        dirty[name][:, :, sl] = float("nan")
    got = _run(dirty, seqs, is_causal)
    for b, (a0, a1, c0, c1) in enumerate(_bounds(seqs)):
        if b == bad:
            continue
        rows, keys = slice(a0, a1), slice(c0, c1)
        for name, x, y in (("dlq", clean[0][:, :, rows], got[0][:, :, rows]),
                           ("dlk", clean[1][:, :, keys], got[1][:, :, keys]),
                           ("dv", clean[2][:, :, keys], got[2][:, :, keys]), ("dalibi", clean[4][b], got[4][b])):
            assert torch.equal(x, y), f"sequence {b} {name} changed by sequence {bad}'s NaN"


def test_deterministic():
    """No atomics: two runs give bitwise identical gradients."""
    t, seqs = _pack(Q_LENS, K_LENS, 4, 2, 24, 0.05, dtype=torch.float32, is_causal=True, alibi=True)
    for name, x, y in zip(NAMES, _run(t, seqs, True), _run(t, seqs, True)):
        assert torch.equal(x, y), name


def test_pack_of_one_sequence_is_the_dense_backward():
    """One sequence filling the pack: the dense build's gradients (the same tiles and products)."""
    t, seqs = _pack((37,), (70,), 4, 2, 24, 0.05, dtype=torch.float32, is_causal=True, alibi=True)
    dense = attention_bwd_triton(t["dout"], t["lq"], t["lk"], t["v"], t["out"], t["lse"], t["temp"], t["slopes"],
                                 True, poison=True)
    for name, x, y in zip(NAMES, _run(t, seqs, True), dense):
        assert relative_error(x, y) < 1e-6, name


def test_pack_without_queries_or_keys():
    """Packs with no query row (and no key row): zeros of the right shapes, dv in packed memory."""
    for q_lens, k_lens in (((0, 0), (0, 5)), ((0, 0), (0, 0))):
        t, seqs = _pack(q_lens, k_lens, 2, 1, 16, 0.05, dtype=torch.float32, is_causal=False, alibi=True)
        dlq, dlk, dv, dtemp, dalibi = _run(t, seqs, False)
        assert dlq.shape == (1, 2, 0) and dlk.shape == (1, 1, sum(k_lens)) and dv.shape == (1, 1, sum(k_lens), 16)
        assert dv[0].transpose(0, 1).is_contiguous()
        assert not dlk.any() and not dv.any() and not dtemp.any() and dalibi.shape == (2, 2) and not dalibi.any()


def test_gqa_large_fp32_head_split_launches():
    """fp32 Dv 200 (padded to 256) with GQA: the dV launch and the gradient launch of a split config, each
    exiting past its sequence's key blocks."""
    assert len(backward_launches(torch.float32, 200, tq=30, tk=40, has_alibi=True, group=2, is_causal=True,
                                 varlen=True)) == 2
    t, seqs = _pack((3, 0, 19, 8), (5, 0, 23, 12), 4, 2, 200, 0.05, dtype=torch.float32, is_causal=True, alibi=True)
    _check(t, seqs, True, 0.05, _tolerance(torch.float32, 0.05))


def test_unfused_head_size_runs_per_sequence():
    """Past the fused head sizes (fp32 Dv > 256) the chunked backward runs on each sequence alone."""
    dv = MAX_FUSED_DV[torch.float32] + 8
    t, seqs = _pack((3, 0, 9), (5, 0, 9), 2, 1, dv, 0.05, dtype=torch.float32, is_causal=True, alibi=True)
    _check(t, seqs, True, 0.05, _tolerance(torch.float32, 0.05))
