"""The Triton attention forward on packed variable-length sequences (the VARLEN build) against the float64
oracle run on each sequence alone (docs/math.md §Packed sequences).

A pack is FlashAttention's cu_seqlens layout: λq (total_q, H), λk (total_k, Hkv), v (total_k, Hkv, Dv),
handed to the launcher as strided (1, H, total) views. Every sequence's rows of out and lse must equal
reference.attention_naive (and the float64 logsumexp) on that sequence's slices: causality bottom-right
inside it, ALiBi distances from its own start, its own row of slopes. Outputs are poisoned with NaN first,
so a row no program writes fails. Each head has its own temperature (1e-3 to 10), so one launch runs both
paths ("auto": the factorised path where exact, the general one elsewhere), and each head is judged with
its temperature's tolerance: fp32 1e-5 scaled by max(1, 0.01 / T) (helpers.temperature_tolerance), fp16
5e-3 and bf16 1e-2 for out (fp16 1e-3, bf16 1e-2 for lse), or fp32's scaled bound where that is larger.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from helpers import relative_error, temperature_tolerance  # noqa: E402

from tauformer_kernels import attention_triton, reference, varlen  # noqa: E402
from tauformer_kernels.attention_triton import attention_fwd_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, HKV, DV = 4, 2, 24  # GQA: query heads 0-1 read kv head 0, 2-3 kv head 1; Dv not a power of two
TEMPERATURES = (1e-3, 0.05, 1.0, 10.0)  # per head: general path (1e-3), factorised (10), dtype-dependent between
OUT_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
LSE_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# (queries, keys) per sequence: empty sequences, single rows, and one spanning two query blocks of the
# interpreter's 64-row tiles
PACKS = {
    "equal": ([5, 0, 1, 17, 70], [5, 0, 1, 17, 70]),    # prefill: Tk_b = Tq_b
    "more": ([5, 0, 1, 17, 70], [9, 6, 40, 20, 99]),    # Tq_b < Tk_b; sequence 1: keys that no query sees
    "decode": ([1, 1, 0, 1, 1], [1, 37, 0, 64, 130]),   # one query per sequence against its cache
    "fewer": ([5, 0, 1, 17, 70], [3, 0, 1, 10, 50]),    # Tq_b > Tk_b (non-causal only)
}


def _bounds(seqs):
    """Each sequence's (q_start, q_end, k_start, k_end) of a valid pack (offsets ending at the rows)."""
    return varlen.bounds(seqs, int(seqs.cu_q[-1]), int(seqs.cu_k[-1]))


def _offsets(lengths):
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32,
                        device=DEVICE)


def _pack(queries, keys, dtype, alibi):
    """Packed λq (total_q, H), λk (total_k, Hkv), v (total_k, Hkv, Dv), temperatures, slopes (B, H), Seqs."""
    lq = torch.rand(sum(queries), H, device=DEVICE)
    lk = torch.rand(sum(keys), HKV, device=DEVICE)
    v = torch.randn(sum(keys), HKV, DV, device=DEVICE).to(dtype)
    temp = torch.tensor(TEMPERATURES, device=DEVICE)
    slopes = 0.02 + 0.3 * torch.rand(len(queries), H, device=DEVICE) if alibi else None
    seqs = varlen.Seqs(_offsets(queries), _offsets(keys), max(queries, default=0), max(keys, default=0))
    return lq, lk, v, temp, slopes, seqs


def _views(lq, lk, v):
    """The layout the ops hand the backend: one batch row of strided views of the packed tensors."""
    return lq.t().unsqueeze(0), lk.t().unsqueeze(0), v.permute(1, 0, 2).unsqueeze(0)


def _run(lq, lk, v, temp, slopes, causal, seqs, path="auto"):
    out, lse = attention_fwd_triton(*_views(lq, lk, v), temp, slopes, causal, seqs, poison=True, path=path)
    total_q = lq.shape[0]
    assert out.shape == (1, H, total_q, DV) and out.dtype == v.dtype
    assert out[0].permute(1, 0, 2).is_contiguous(), "out must be a view of packed (total_q, H, Dv) memory"
    assert lse.shape == (1, H, total_q) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert not out.isnan().any() and not lse.isnan().any(), "a row of the pack was not written"
    return out, lse


def _check(lq, lk, v, temp, slopes, causal, seqs, out, lse):
    """Each (sequence, head) of out and lse against the float64 oracle on that sequence alone."""
    dtype = v.dtype
    lq_v, lk_v, v_v = _views(lq.double(), lk.double(), v.double())
    failures = []
    for b, (q0, q1, k0, k1) in enumerate(_bounds(seqs)):
        if q1 == q0:
            continue
        args = (lq_v[:, :, q0:q1], lk_v[:, :, k0:k1], v_v[:, :, k0:k1], temp.double(),
                None if slopes is None else slopes[b:b + 1].double(), causal)
        ref = reference.attention_naive(*args)
        ref_lse = reference.attention_fwd_chunked(*args)[1]
        for h, t in enumerate(TEMPERATURES):
            out_tol = max(OUT_TOL[dtype], temperature_tolerance(1e-5, t))
            lse_tol = max(LSE_TOL[dtype], temperature_tolerance(1e-5, t))
            err = relative_error(out[0, h, q0:q1], ref[0, h])
            # lse per element against max(|lse|, 1): rows whose lse is near 0 are judged absolutely
            lse_err = relative_error(lse[0, h, q0:q1], ref_lse[0, h], floor=(q1 - q0) ** 0.5)
            if not (err < out_tol and lse_err < lse_tol):
                failures.append(f"sequence {b} (Tq {q1 - q0}, Tk {k1 - k0}) head {h} (T {t}): out {err:.1e} "
                                f"(tol {out_tol:.0e}), lse {lse_err:.1e} (tol {lse_tol:.0e})")
    assert not failures, "\n".join(failures)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("keys, alibi", [("equal", False), ("equal", True), ("more", True), ("decode", False),
                                         ("fewer", True)])
def test_each_sequence_as_if_alone(keys, alibi, causal, dtype):
    if causal and keys == "fewer":
        pytest.skip("causal attention needs Tq <= Tk in every sequence")
    pack = _pack(*PACKS[keys], dtype, alibi)
    out, lse = _run(*pack[:5], causal, pack[5])
    _check(*pack[:5], causal, pack[5], out, lse)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_general_path_everywhere(causal):
    """path="general": every program takes the exponential-per-score path with an online maximum."""
    pack = _pack(*PACKS["more"], torch.float32, True)
    out, lse = _run(*pack[:5], causal, pack[5], path="general")
    _check(*pack[:5], causal, pack[5], out, lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_nothing_crosses_a_sequence(dtype):
    """Changing one sequence's λ and v leaves every other sequence's out and lse bitwise unchanged, and
    NaN in the keys of a sequence without queries (sequence 1) reaches nobody."""
    lq, lk, v, temp, slopes, seqs = _pack(*PACKS["more"], dtype, True)
    (q0, q1, k0, k1), (_, _, e0, e1) = _bounds(seqs)[3], _bounds(seqs)[1]
    lk[e0:e1], v[e0:e1] = float("nan"), float("nan")
    out, lse = _run(lq, lk, v, temp, slopes, True, seqs)
    lq2, lk2, v2 = lq.clone(), lk.clone(), v.clone()
    lq2[q0:q1] = torch.rand(q1 - q0, H, device=DEVICE)
    lk2[k0:k1] = 5.0 * torch.rand(k1 - k0, HKV, device=DEVICE)  # a wider λ range: other path choices
    v2[k0:k1] = torch.randn(k1 - k0, HKV, DV, device=DEVICE).to(dtype)
    out2, lse2 = _run(lq2, lk2, v2, temp, slopes, True, seqs)
    others = torch.ones(lq.shape[0], dtype=torch.bool, device=DEVICE)
    others[q0:q1] = False
    assert torch.equal(out[:, :, others], out2[:, :, others]) and torch.equal(lse[:, :, others], lse2[:, :, others])
    assert not torch.equal(out[:, :, q0:q1], out2[:, :, q0:q1])
    _check(lq2, lk2, v2, temp, slopes, True, seqs, out2, lse2)


@pytest.mark.skipif(DEVICE == "cuda", reason="a GPU runs its own configs in the tests above")
@pytest.mark.parametrize("dtype, alibi", [(torch.bfloat16, True), (torch.float32, False)], ids=["bf16-alibi", "fp32"])
def test_gpu_tiles(dtype, alibi, monkeypatch):
    """TAUFORMER_GPU_CONFIGS=1: the GPU's tiles (128×64 with the peeled diagonal blocks; fp32 64×32) on a
    pack whose longest sequence spans two 128-row query blocks."""
    monkeypatch.setenv("TAUFORMER_GPU_CONFIGS", "1")
    lq, lk, v, temp, slopes, seqs = _pack([130, 0, 1, 37], [150, 3, 1, 37], dtype, alibi)
    launches = attention_triton.forward_launches(DV, dtype, is_causal=True, has_alibi=alibi, varlen=True)
    assert launches[0].constexprs["VARLEN"]
    assert launches[0].constexprs["BLOCK_M"] == (64 if dtype == torch.float32 else 128)
    out, lse = _run(lq, lk, v, temp, slopes, True, seqs)
    _check(lq, lk, v, temp, slopes, True, seqs, out, lse)


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's tile config; a GPU runs its own")
@pytest.mark.parametrize("alibi", [False, True])
def test_query_blocks_taller_than_key_blocks(alibi, monkeypatch):
    """BLOCK_M = 2·BLOCK_N as on the GPU: each sequence's diagonal spans several key blocks, its Tk - Tq
    not a multiple of them."""
    monkeypatch.setitem(attention_triton._FORWARD_INTERPRET, "BLOCK_N", 32)
    pack = _pack(*PACKS["more"], torch.float32, alibi)
    for causal in (True, False):
        out, lse = _run(*pack[:5], causal, pack[5])
        _check(*pack[:5], causal, pack[5], out, lse)


def test_packs_without_queries():
    """No query rows at all (empty sequences, or keys only): nothing is launched, the outputs are empty."""
    for queries, keys in (([0, 0], [0, 0]), ([0, 0, 0], [4, 0, 2]), ([], [])):
        lq, lk, v, temp, _, seqs = _pack(queries, keys, torch.float32, False)
        out, lse = attention_fwd_triton(*_views(lq, lk, v), temp, None, True, seqs, poison=True)
        assert out.shape == (1, H, 0, DV) and lse.shape == (1, H, 0)


class _Recorder:
    """Stands in for the kernel: records each launch's grid and positional arguments, runs nothing."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def test_grid_covers_the_longest_sequence_and_every_sequence_head(monkeypatch):
    """Axis 0 spans cdiv(max_q, BLOCK_M) query blocks (no padding of the pack), axes 1-2 every
    (sequence, head) even past 65,535 of them; the launches are the VARLEN build's."""
    recorder = _Recorder()
    monkeypatch.setattr(attention_triton, "taumode_attention_fwd_kernel", recorder)
    count = 20_000  # × 4 heads: 80,000 (sequence, head) pairs, past one grid axis's 65,535
    queries = torch.ones(count, dtype=torch.int64)
    queries[7] = 150
    cu = _offsets(queries.tolist())
    total = int(cu[-1])
    lq, lk = torch.rand(1, H, total, device=DEVICE), torch.rand(1, HKV, total, device=DEVICE)
    v = torch.randn(1, HKV, total, 16, device=DEVICE)
    seqs = varlen.Seqs(cu, cu, 150, 150)
    attention_fwd_triton(lq, lk, v, torch.ones(H, device=DEVICE), None, True, seqs)
    # "auto": the factorised then the general launch, then the OVERFLOW launch (the blocks past max_seqlen_q)
    assert [kwargs["OVERFLOW"] for _, _, kwargs in recorder.launches] == [False, False, True]
    main_rows = recorder.launches[0][2]["BLOCK_M"]
    for grid, args, kwargs in recorder.launches:
        assert kwargs["VARLEN"] is True
        assert grid[0] == (1 if kwargs["OVERFLOW"] else -(-150 // main_rows))
        # one sequence more: the rows past the last offset
        assert grid[1] <= 65535 and grid[2] <= 65535 and grid[1] * grid[2] >= (count + 1) * H
        assert args[0].stride(-1) == 1 and args[1].stride(-1) == 1  # λ handed over with unit stride along t
