"""The Triton attention forward's own machinery: its two paths, its tiles, rows over many key blocks.

What every backend must compute (shapes, dtypes, temperatures, slopes, λ ranges, outputs poisoned with NaN
first) is tests/kernels/test_attention_contract.py. Here: the per-program choice between the factorised path
(PATH 1, docs/math.md §Fast path range) and the general one (PATH 2), against path="general" (every
program on the general path, PATH 3); the interpreter's tiles at the GPU's BLOCK_M = 2·BLOCK_N; one
row over many key blocks. Each result is poisoned and held to the contract's criterion (helpers.flash_close).

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) with the
GPU's numerics emulated, bf16 included.
"""

import pytest
import torch

pytest.importorskip("triton")

from helpers import Attention, flash_close, oracle  # noqa: E402

from tauformer_kernels.attention_triton import attention_fwd_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check(lq, lk, v, temperature, alibi_slopes=None, is_causal=True, path="auto", conditioning=None):
    """The kernel (outputs poisoned) against the float64 oracle: out and the logsumexp, with the tolerance
    of the temperature `conditioning` (default: the smallest)."""
    on = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out, lse = attention_fwd_triton(*map(on, (lq, lk, v, temperature, alibi_slopes)), is_causal, poison=True, path=path)
    assert out.dtype == v.dtype and lse.dtype == torch.float32
    got = Attention(out.cpu(), lse.cpu(), {})
    exact = oracle(lq, lk, v, temperature, alibi_slopes, is_causal)
    naive = oracle(lq, lk, v, temperature, alibi_slopes, is_causal, exact=False)
    failures = flash_close(got, exact, naive, dtype=v.dtype,
                           temperature=conditioning or temperature.min().item(), v=v,
                           names=("out", "lse"))
    assert not failures, "\n".join(failures)


def inputs(b, h, hkv, tq, tk, dv, dtype, temperature, *, alibi=False):
    lq, lk = torch.rand(b, h, tq), torch.rand(b, hkv, tk)
    v = torch.randn(b, hkv, tk, dv).to(dtype)
    temp = torch.full((h,), temperature)
    slopes = torch.rand(b, h) if alibi else None
    return lq, lk, v, temp, slopes


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_head_temperatures_take_both_paths(dtype):
    """Heads of one launch take different paths (the 1e-4 head's λ span is past the factorised path's
    range, the 10.0 head's well inside); path="general" agrees with the oracle everywhere too. The 1e-4
    head is held to the tolerance of 1e-3: λ in [0, 1) conditions it like that."""
    lq, lk, v, _, slopes = inputs(1, 4, 2, 100, 100, 64, dtype, 1.0, alibi=True)
    temp = torch.tensor([1e-4, 0.03, 1.0, 10.0])
    for path in ("auto", "general"):
        check(lq, lk, v, temp, path=path, conditioning=1e-3)
        check(lq, lk, v, temp, slopes, path=path, conditioning=1e-3)


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's tile config; a GPU runs its own")
@pytest.mark.parametrize("alibi", [False, True])
def test_query_blocks_taller_than_key_blocks(alibi, monkeypatch):
    """BLOCK_M = 2·BLOCK_N as on the GPU: the diagonal spans several key blocks, Tk - Tq not a multiple."""
    from tauformer_kernels import attention_triton

    monkeypatch.setitem(attention_triton._FORWARD_INTERPRET, "BLOCK_N", 32)
    lq, lk, v, temp, slopes = inputs(1, 2, 1, 150, 181, 40, torch.float32, 0.05, alibi=alibi)
    check(lq, lk, v, temp, slopes)
    check(lq, lk, v, temp, slopes, is_causal=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("temperature", [1e-3, 1.0])
def test_rows_over_many_key_blocks(temperature, dtype):
    """1000 keys: 16 key blocks per row, the factorised sums (1.0) and the online maximum (1e-3) over
    all of them."""
    lq, lk, v, temp, _ = inputs(1, 1, 1, 1000, 1000, 64, dtype, temperature)
    check(lq, lk, v, temp)
