"""The Triton attention forward against the float64 oracle (SPEC §2, §6).

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), on CPU
tensors; bf16 is tested only on a GPU (the interpreter multiplies its raw bit patterns). Outputs are
poisoned with NaN before the kernel writes, so an element it forgets fails the test.

Tolerances: fp32 1e-5 relative, scaled by max(1, 0.01 / temperature) because fp32 rounding of λ (~6e-8)
is amplified by 1/temperature in the logits; fp16 1e-2 (P and V in fp16). The logsumexp is fp32 in both,
but with fp16 V the row sums are sums of the fp16-rounded P that multiplies V (the weights of O sum to
one exactly), so they carry P's rounding: ~1e-4.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from helpers import relative_error, temperature_tolerance  # noqa: E402
from tauformer_kernels import reference  # noqa: E402
from tauformer_kernels.attention_triton import attention_fwd_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TEMPERATURES = [1e-3, 0.05, 1.0, 10.0]
OUT_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
LSE_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def oracle_lse(lq, lk, temperature, alibi_slopes, is_causal):
    """float64 natural-log logsumexp of each row's logits (SPEC §2)."""
    b, h, tq = lq.shape
    hkv, tk = lk.shape[1:]
    lk_h = lk.double().repeat_interleave(h // hkv, dim=1)
    logits = -(lq.double()[..., :, None] - lk_h[..., None, :]).abs() / temperature.double().view(1, h, 1, 1)
    offsets = reference.key_offsets(tq, tk, lq.device)
    if alibi_slopes is not None:
        logits = logits - alibi_slopes.double().view(b, h, 1, 1) * offsets.abs().double()
    if is_causal:
        logits = logits.masked_fill(offsets < 0, float("-inf"))
    return torch.logsumexp(logits, dim=-1)


def check(lq, lk, v, temperature, alibi_slopes=None, is_causal=True, path="auto", out_tol=None):
    """Run the kernel (outputs poisoned) and compare O and the logsumexp with the float64 oracle."""
    out, lse = attention_fwd_triton(lq, lk, v, temperature, alibi_slopes, is_causal, poison=True, path=path)
    assert out.dtype == v.dtype and out.shape == (*lq.shape, v.shape[-1])
    assert lse.dtype == torch.float32 and lse.shape == lq.shape
    assert not out.isnan().any() and not lse.isnan().any(), "an output element is NaN (unwritten or overflow)"
    slopes64 = None if alibi_slopes is None else alibi_slopes.double()
    ref = reference.attention_naive(lq.double(), lk.double(), v.double(), temperature.double(), slopes64, is_causal)
    ref_lse = oracle_lse(lq, lk, temperature, alibi_slopes, is_causal)
    t_min = temperature.min().item()
    tol = out_tol if out_tol is not None else temperature_tolerance(OUT_TOL[v.dtype], t_min)
    assert relative_error(out, ref) < tol
    # lse per element scaled by max(|lse|, 1): rows whose lse is near 0 are judged absolutely
    lse_tol = temperature_tolerance(LSE_TOL[v.dtype], t_min)
    assert relative_error(lse, ref_lse, floor=ref_lse.numel() ** 0.5) < lse_tol
    return out, lse


def inputs(b, h, hkv, tq, tk, dv, dtype, temperature, *, alibi=False, lam_range=(0.0, 1.0)):
    lo, hi = lam_range
    lq = lo + (hi - lo) * torch.rand(b, h, tq, device=DEVICE)
    lk = lo + (hi - lo) * torch.rand(b, hkv, tk, device=DEVICE)
    v = torch.randn(b, hkv, tk, dv, device=DEVICE).to(dtype)
    temp = torch.full((h,), temperature, device=DEVICE)
    slopes = torch.rand(b, h, device=DEVICE) if alibi else None
    return lq, lk, v, temp, slopes


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("t", [1, 17, 128, 257])
def test_causal_gqa(t, temperature, dtype):
    lq, lk, v, temp, _ = inputs(1, 8, 2, t, t, 64, dtype, temperature)
    check(lq, lk, v, temp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_causal_long(temperature, dtype):
    lq, lk, v, temp, _ = inputs(1, 1, 1, 1000, 1000, 64, dtype, temperature)
    check(lq, lk, v, temp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("tq,tk", [(1, 57), (37, 300), (64, 100)])
def test_fewer_queries_than_keys_dv48(tq, tk, is_causal, temperature, dtype):
    lq, lk, v, temp, _ = inputs(2, 8, 2, tq, tk, 48, dtype, temperature)
    check(lq, lk, v, temp, is_causal=is_causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1e-3, 0.05, 1.0])
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("tq,tk", [(100, 100), (29, 130)])
def test_alibi(tq, tk, is_causal, temperature, dtype):
    lq, lk, v, temp, _ = inputs(1, 4, 2, tq, tk, 32, dtype, temperature)
    slopes = torch.tensor([[1.0, 0.5, 0.0625, 2.0 ** -8]], device=DEVICE)
    check(lq, lk, v, temp, slopes, is_causal)


def test_non_causal_more_queries_than_keys():
    lq, lk, v, temp, slopes = inputs(1, 2, 1, 80, 33, 16, torch.float32, 0.05, alibi=True)
    check(lq, lk, v, temp, slopes, is_causal=False)
    check(lq, lk, v, temp, None, is_causal=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1e-3, 1.0])
def test_lambda_outside_unit_interval(temperature, dtype):
    """λk = key position, λq = a position plus noise (the reference's retrieval test), and λ of size 1e3."""
    b, h, t = 1, 2, 200
    lk = torch.arange(t, device=DEVICE, dtype=torch.float32).repeat(b, 1, 1)
    lq = torch.randint(0, t, (b, h, t), device=DEVICE).float() + 0.3 * torch.rand(b, h, t, device=DEVICE)
    v = torch.randn(b, 1, t, 32, device=DEVICE).to(dtype)
    check(lq, lk, v, torch.full((h,), temperature, device=DEVICE), is_causal=False)
    lq, lk, v, temp, _ = inputs(1, 2, 1, 150, 150, 32, dtype, temperature, lam_range=(-700.0, 1300.0))
    check(lq, lk, v, temp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_head_temperatures_and_both_paths(dtype):
    """Heads of one launch take different paths; the general path agrees with the oracle everywhere."""
    lq, lk, v, _, slopes = inputs(1, 4, 2, 100, 100, 64, dtype, 1.0, alibi=True)
    temp = torch.tensor([1e-4, 0.03, 1.0, 10.0], device=DEVICE)
    tol = temperature_tolerance(OUT_TOL[dtype], 1e-3)  # the 1e-4 head is fp32-λ conditioned like 1e-3
    for path in ("auto", "general"):
        check(lq, lk, v, temp, path=path, out_tol=tol)
        check(lq, lk, v, temp, slopes, path=path, out_tol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_from_cache_slices(dtype):
    """Tq = 1 against non-contiguous λk and V: slices of a preallocated (B, Hkv, T_max, ·) cache."""
    b, h, hkv, t_max, t, dv = 2, 4, 2, 96, 70, 48
    cache_lk = torch.rand(b, hkv, t_max, device=DEVICE)
    cache_v = torch.randn(b, t_max, hkv, dv, device=DEVICE).to(dtype).transpose(1, 2)  # (B, Hkv, T_max, Dv)
    lk, v = cache_lk[:, :, :t], cache_v[:, :, :t]
    assert not lk.is_contiguous() and not v.is_contiguous()
    lq = torch.rand(b, h, 1, device=DEVICE)
    for temperature in (0.05, 1.0):
        check(lq, lk, v, torch.full((h,), temperature, device=DEVICE))


def test_tiny_head_dim_and_odd_shapes():
    lq, lk, v, temp, _ = inputs(3, 3, 1, 5, 9, 1, torch.float32, 0.5)
    check(lq, lk, v, temp)
    check(lq, lk, v, temp, is_causal=False)


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's tile config; a GPU runs its own")
@pytest.mark.parametrize("alibi", [False, True])
def test_query_blocks_taller_than_key_blocks(alibi, monkeypatch):
    """BLOCK_M = 2·BLOCK_N as on the GPU: the diagonal spans several key blocks, Tk - Tq not a multiple."""
    from tauformer_kernels import attention_triton

    monkeypatch.setitem(attention_triton._INTERPRET_TILES, "BLOCK_N", 32)
    lq, lk, v, temp, slopes = inputs(1, 2, 1, 150, 181, 40, torch.float32, 0.05, alibi=alibi)
    check(lq, lk, v, temp, slopes)
    check(lq, lk, v, temp, slopes, is_causal=False)
