"""The kernels with their GPU launch configs, run in the interpreter (TAUFORMER_GPU_CONFIGS=1).

Elsewhere the interpreter runs small tiles; here it runs what a GPU runs: the forward's 128×64 tiles with
the peeled diagonal blocks (fp32 64×32), the backward's 64×64 / 32×32 / 16×16 tiles, DT_TILE, the split
dV / dλ launches of fp32 Dv >= 256 with GQA, the backward's GPU=True branch (layout anchor, inline-PTX
exp2), with bf16 and tf32/tf32x3 rounding and the PTX exp2's flush to zero emulated
(tauformer_kernels/interpreter.py). A representative subset: each config and code path once.
"""
import pytest
import torch
from helpers import relative_error

from tauformer_kernels import reference

triton = pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("on a GPU the regular tests run these configs", allow_module_level=True)

from tauformer_kernels.attention_triton import attention_fwd_triton, forward_launches  # noqa: E402
from tauformer_kernels.attention_triton_backward import attention_bwd_triton, backward_launches  # noqa: E402
from tauformer_kernels.lambda_triton import lambda_fwd_triton  # noqa: E402
from tauformer_kernels.lambda_triton_backward import lambda_bwd_triton  # noqa: E402

# relative error against float64 on the same inputs: fp32 (tf32x3 products) as everywhere, bf16 and fp16
# as their P and dS enter the tensor cores in that dtype
FWD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}
BWD_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 2e-2}


@pytest.fixture(autouse=True)
def gpu_configs(monkeypatch):
    monkeypatch.setenv("TAUFORMER_GPU_CONFIGS", "1")


def _inputs(b, h, hkv, tq, tk, dv, dtype, temperature, alibi):
    lq, lk = torch.rand(b, h, tq), torch.rand(b, hkv, tk)
    v = torch.randn(b, hkv, tk, dv).to(dtype)
    temp = temperature * torch.linspace(1.0, 1.5, h)
    slopes = 0.02 + 0.1 * torch.rand(b, h) if alibi else None
    return lq, lk, v, temp, slopes


def _oracle(lq, lk, v, temp, slopes, dout, causal):
    leaves = [t.double().requires_grad_() for t in (lq, lk, v, temp)]
    sl = None if slopes is None else slopes.double().requires_grad_()
    out = reference.attention_naive(*leaves, sl, causal)
    grads = torch.autograd.grad(out, leaves + ([sl] if sl is not None else []), dout.double())
    return out, list(grads) + ([None] if sl is None else [])


FORWARD_CASES = [  # (dtype, B, H, Hkv, Tq, Tk, Dv, temperature, causal, alibi)
    (torch.bfloat16, 1, 2, 1, 300, 300, 64, 0.05, True, False),   # factorised, 128×64, peeled diagonal
    (torch.float16, 1, 2, 2, 200, 261, 64, 0.05, True, True),     # half2 factors; ALiBi
    (torch.bfloat16, 1, 2, 1, 200, 200, 64, 2e-3, True, False),   # low temperature: the general path
    (torch.float32, 1, 2, 1, 150, 150, 64, 0.05, True, False),    # fp32 64×32, tf32x3
    (torch.bfloat16, 1, 2, 1, 130, 130, 384, 0.05, False, False),  # Dv 384: three column programs
    (torch.bfloat16, 1, 4, 2, 100, 100, 100, 0.2, True, True),    # 64×64 tiles for 64 < Dv <= 128, GQA
]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: f"{str(c[0])[6:]}-T{c[4]}x{c[5]}-D{c[6]}")
def test_forward_with_gpu_configs(case):
    dtype, b, h, hkv, tq, tk, dv, temperature, causal, alibi = case
    launches = forward_launches(dv, dtype, is_causal=causal, has_alibi=alibi)
    assert launches == forward_launches(dv, dtype, is_causal=causal, has_alibi=alibi, gpu=True)  # the GPU's
    lq, lk, v, temp, slopes = _inputs(b, h, hkv, tq, tk, dv, dtype, temperature, alibi)
    out, lse = attention_fwd_triton(lq, lk, v, temp, slopes, causal, poison=True)
    ref, _ = _oracle(lq, lk, v, temp, slopes, torch.zeros(b, h, tq, dv), causal)
    assert out.dtype == dtype and relative_error(out, ref) < FWD_TOL[dtype]
    _, ref_lse = reference.attention_fwd_chunked(lq.double(), lk.double(), v.double(), temp.double(),
                                                 None if slopes is None else slopes.double(), causal)
    # the row sums are sums of P rounded to V's dtype (the same P that multiplies V): lse carries that rounding
    assert relative_error(lse, ref_lse) < max(FWD_TOL[dtype], 1e-5)


BACKWARD_CASES = [  # (dtype, B, H, Hkv, Tq, Tk, Dv, causal, alibi)
    (torch.bfloat16, 1, 2, 1, 200, 200, 64, True, False),   # 64×64, DT_TILE, GPU=True
    (torch.float16, 1, 4, 1, 130, 150, 64, True, True),     # ALiBi: 32 keys per program
    (torch.float16, 1, 4, 2, 100, 100, 64, False, False),   # non-causal GQA: 32 query rows
    (torch.float32, 1, 2, 1, 100, 100, 64, True, False),    # fp32 32×32 tf32x3
    (torch.bfloat16, 1, 2, 1, 70, 70, 256, True, False),    # 32×32 at Dv 256
    (torch.float32, 1, 4, 2, 40, 40, 256, True, False),     # fp32 Dv 256 GQA: the split dV / dλ launches
]


@pytest.mark.parametrize("case", BACKWARD_CASES,
                         ids=lambda c: f"{str(c[0])[6:]}-T{c[4]}x{c[5]}-D{c[6]}-G{c[2] // c[3]}")
def test_backward_with_gpu_configs(case):
    dtype, b, h, hkv, tq, tk, dv, causal, alibi = case
    shape = dict(tq=tq, tk=tk, has_alibi=alibi, group=h // hkv, is_causal=causal)
    assert backward_launches(dtype, dv, **shape) == backward_launches(dtype, dv, **shape, gpu=True)  # the GPU's
    lq, lk, v, temp, slopes = _inputs(b, h, hkv, tq, tk, dv, dtype, 0.05, alibi)
    dout = torch.randn(b, h, tq, dv).to(dtype)
    out, lse = reference.attention_fwd_chunked(lq, lk, v, temp, slopes, causal)
    got = attention_bwd_triton(dout, lq, lk, v, out.to(dtype), lse, temp, slopes, causal, poison=True)
    _, want = _oracle(lq, lk, v, temp, slopes, dout, causal)
    for name, g, w in zip(("dlq", "dlk", "dv", "dtemperature", "dalibi"), got, want):
        if w is None:
            continue
        assert torch.isfinite(g).all(), name
        assert relative_error(g, w) < BWD_TOL[dtype], (name, relative_error(g, w))


@pytest.mark.parametrize("dtype, f", [(torch.bfloat16, 64), (torch.float32, 64), (torch.bfloat16, 384)])
def test_lambda_with_gpu_configs(dtype, f):
    x = torch.randn(1, 3, 150, f).to(dtype)
    lap = torch.zeros(f, f)
    idx = torch.arange(f - 1)
    lap[idx, idx + 1] = lap[idx + 1, idx] = -1.0
    lap -= torch.diag(lap.sum(1))
    tau = torch.tensor([0.5, 1.0, 2.0])
    lam = lambda_fwd_triton(x, lap, tau, 1e-6, poison=True)
    x64 = x.double().requires_grad_()
    tau64 = tau.double().requires_grad_()
    ref = reference.lambda_naive(x64, lap.double(), tau64)
    assert relative_error(lam, ref) < (1e-6 if dtype == torch.float32 else 1e-5)
    dlam = torch.randn_like(ref)
    dx, dtau = lambda_bwd_triton(dlam.float(), x, lap, tau, 1e-6, poison=True)
    gx, gtau = torch.autograd.grad(ref, (x64, tau64), dlam)
    assert relative_error(dx, gx) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert relative_error(dtau, gtau) < 1e-5
