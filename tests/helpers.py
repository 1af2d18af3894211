"""Input factories, the float64 oracle and the tolerances shared by the tests."""
import importlib.util
from typing import NamedTuple, Optional

import pytest
import torch

from tauformer_kernels import reference

# the numba backend, as a parameter of the backend lists (skipped without the package: the cpu extra)
NUMBA_INSTALLED = importlib.util.find_spec("numba") is not None
NUMBA = pytest.param("numba", marks=pytest.mark.skipif(not NUMBA_INSTALLED, reason="needs numba (the cpu extra)"))


def random_lambdas(b, h, hkv, tq, tk, *, dtype=torch.float64, device="cpu"):
    """λq, λk uniform in [0, 1), as the projection produces them."""
    lq = torch.rand(b, h, tq, dtype=dtype, device=device)
    lk = torch.rand(b, hkv, tk, dtype=dtype, device=device)
    return lq, lk


def random_heads(b, h, hkv, tq, tk, f, dv, *, dtype=torch.float64, device="cpu"):
    q = torch.randn(b, h, tq, f, dtype=dtype, device=device)
    k = torch.randn(b, hkv, tk, f, dtype=dtype, device=device)
    v = torch.randn(b, hkv, tk, dv, dtype=dtype, device=device)
    return q, k, v


def per_head(value, heads, dtype=torch.float64):
    return torch.full((heads,), float(value), dtype=dtype)


def oracle_attention(q, k, v, laplacian, tau_kv, temperature, alibi_slopes=None, is_causal=True, eps=1e-6):
    """The float64 composition of the two oracles."""
    group = q.shape[1] // k.shape[1]
    d = lambda t: None if t is None else t.double()  # noqa: E731
    lq = reference.lambda_naive(q.double(), laplacian.double(), tau_kv.double().repeat_interleave(group), eps)
    lk = reference.lambda_naive(k.double(), laplacian.double(), tau_kv.double(), eps)
    return reference.attention_naive(lq, lk, v.double(), temperature.double(), d(alibi_slopes), is_causal)


def relative_error(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-300) -> float:
    """‖out − ref‖ / max(‖ref‖, floor) in float64. A floor keeps gradients that are exactly zero in the
    reference (one key per row: softmax is constant) from dividing rounding noise by zero."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()  # either may be on the GPU
    return ((out - ref).norm() / ref.norm().clamp_min(floor)).item()


def temperature_tolerance(base: float, temperature: float) -> float:
    """fp32 rounding of λ (~6e-8) is amplified by 1/temperature in the logits: scale the tolerance."""
    return base * max(1.0, 0.01 / temperature)


# ----------------------------------------------------------------------------------------------------
# The float64 attention oracle and flash-attention's criterion
# ----------------------------------------------------------------------------------------------------

GRADIENTS = ("dlq", "dlk", "dv", "dtemperature", "dalibi")
EPS32 = torch.finfo(torch.float32).eps

# Bounds on the relative error against the float64 oracle, by V's dtype: the forward output, the
# logsumexp (judged per row against max(|lse|, 1)) and the gradients. fp32 1e-5 and bf16 1e-2 forward
# are the specification's; the gradients', fp16's and the logsumexp's are the Triton kernels' measured
# bounds that their tests have held (fp32 gradients: the sign-weighted sums of dS cancel). fp32's are
# scaled by max(1, 0.01 / temperature) (temperature_tolerance); a low-precision bound is the larger of
# its own and fp32's scaled one. bf16's gradient bound is fp16's times their epsilon ratio (8).
BOUNDS = {
    torch.float32: {"out": 1e-5, "lse": 1e-5, "grad": 1e-4},
    torch.float16: {"out": 1e-2, "lse": 1e-3, "grad": 2e-2},
    torch.bfloat16: {"out": 1e-2, "lse": 1e-2, "grad": 1.6e-1},
}
# One number per head (per batch × head): sums over every pair that cancel (Σ_j dS_ij = 0)
SUMS = ("dtemperature", "dalibi")


class Attention(NamedTuple):
    """An attention's results: out, the logsumexp (None: not computed) and the gradients by name
    (GRADIENTS; None: not computed, or no slopes); the oracle's also the rounding scales of the
    gradients that pass through dS (rounding_scales; None elsewhere)."""
    out: torch.Tensor
    lse: Optional[torch.Tensor]
    grads: dict
    rounding: Optional[dict] = None


def rounding_scales(lq, lk, v, temperature, alibi_slopes, is_causal, dout) -> dict:
    """In float64, for the gradients formed from dS = P ∘ (dP − D) (dlq, dlk, dtemperature, dalibi), the
    norm of what one rounding (of unit size, times eps in flash_close) of each fp32 sum that forms them
    puts into them: the kernels' noise, measured in the inputs' own magnitudes instead of a constant.

    dP_ij = Σ_d dO_id V_jd and D_i = Σ_d dO_id O_id are sums of Dv products; one rounding of each is
    eps·Σ_d |dO_id| (|V_jd| + |O_id|) (the textbook bound of a dot product's rounding, without its factor
    Dv, since the products' roundings are random, not aligned). dS carries it times P_ij, and each gradient
    gathers those dS with its own weights (dλ: 1/T; dT: |λq − λk| / T²; slope: |i + Tk − Tq − j|) in sums
    whose roundings are independent: root of the sum of squares. This is the whole error where the exact
    gradient is 0 (one visible key: dP_ij = D_i, so dS = 0, and the kernel returns the rounding of dP − D,
    whose size depends on the CPU's or GPU's arithmetic, #29), and what the naive fp32 autograd cannot
    show there (its softmax backward is exactly 0). Measured: the Triton backward's dλq error is 0.14-0.22×
    this on the fp32 shapes of test_attention_triton_backward.py's test_every_output_written.

    Arguments as reference.attention_naive's (alibi_slopes (B, H) or None), all float64; dout like out."""
    b, h, tq = lq.shape
    group, tk = h // lk.shape[1], lk.shape[2]
    lk_h, v_h = lk.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    inv_t = 1 / temperature.view(1, h, 1, 1)
    delta = (lq[..., :, None] - lk_h[..., None, :]).abs()
    offsets = reference.key_offsets(tq, tk, lq.device)
    distance = offsets.abs().to(lq.dtype)
    logits = -delta * inv_t
    if alibi_slopes is not None:
        logits = logits - alibi_slopes.view(b, h, 1, 1) * distance
    if is_causal:
        logits = logits.masked_fill(offsets < 0, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    do_abs = dout.abs()
    sums = do_abs @ v_h.abs().transpose(-1, -2) + (do_abs * (p @ v_h).abs()).sum(-1, keepdim=True)
    ds = p * sums  # one rounding of dP − D, in each dS_ij
    dlam = (ds * inv_t).norm().item()  # the same for dλq and dλk: every (i, j) once, weight 1/T
    scales = {"dlq": dlam, "dlk": dlam, "dtemperature": (ds * delta * inv_t**2).norm().item()}
    if alibi_slopes is not None:
        scales["dalibi"] = (ds * distance).norm().item()
    return scales


def oracle(lq, lk, v, temperature, alibi_slopes=None, is_causal=True, dout=None, *, exact=True) -> Attention:
    """reference.attention_naive and plain autograd through it: the oracle, in float64 (exact=True), or
    the naive attention in the inputs' own precision (exact=False), flash_close's baseline: fp32 λ and
    logits (as every backend), P·V and its backward in V's dtype when that is fp16/bf16 (autocast).

    temperature (H,); alibi_slopes None, (H,) or (B, H) (its gradient takes its shape); dout None: no
    gradients. The exact logsumexp is reference.attention_fwd_chunked's in float64: the row maximum and
    sum of the very logits whose softmax is its output, which tests/kernels/test_reference.py checks against the
    oracle's to 1e-12 (and the logsumexp by hand).
    """
    b, h = lq.shape[:2]
    cast = (lambda t: t.detach().double()) if exact else (lambda t: t.detach())  # noqa: E731
    wants_grad = dout is not None
    leaves = [cast(t).requires_grad_(wants_grad) for t in (lq, lk, v, temperature)]
    slopes = None if alibi_slopes is None else cast(alibi_slopes).requires_grad_(wants_grad)
    slopes_bh = None if slopes is None else slopes.expand(b, h)
    low = not exact and v.dtype in (torch.float16, torch.bfloat16)
    with torch.enable_grad(), torch.autocast(v.device.type, dtype=v.dtype, enabled=low):
        out = reference.attention_naive(*leaves, slopes_bh, is_causal)
        grads = dict.fromkeys(GRADIENTS)
        if wants_grad:
            wrt = leaves + ([slopes] if slopes is not None else [])
            found = (torch.autograd.grad(out, wrt, cast(dout).to(out.dtype)) if out.numel()
                     else [torch.zeros_like(t) for t in wrt])
            grads.update(zip(GRADIENTS, found))
    lse = rounding = None
    if exact:
        detached = [t.detach() for t in leaves] + [None if slopes_bh is None else slopes_bh.detach()]
        lse = reference.attention_fwd_chunked(*detached, is_causal)[1]
        if wants_grad:
            rounding = rounding_scales(*detached, is_causal, cast(dout))
    return Attention(out.detach(), lse, grads, rounding)


def _kind(name: str) -> str:
    return name if name in ("out", "lse") else "grad"


def tolerance(name: str, dtype: torch.dtype, temperature: float, lse_rms: float = 1.0) -> tuple[float, float]:
    """(floor, bound) of flash_close for result `name` ("out", "lse" or a GRADIENTS name) with V of
    `dtype`, at the smallest temperature; lse_rms: the exact logsumexp's root mean square.

    The floor is what a result may exceed twice the naive error by: 8 fp32 ulps (λ and the logits are
    fp32 in every dtype) or one ulp of V's dtype, whichever is larger, and for the cancelling sums (SUMS)
    fp32's bound (1e-5) in units of V's dtype; both scaled by max(1, 0.01 / temperature), since the
    backends' fast paths form λ/T, whose rounding 1/T amplifies. A gradient's floor is at least one
    fp32 ulp of the typical |lse| too: the backward recomputes P from the saved fp32 logsumexp, whose
    rounding every recomputed P carries (the naive autograd keeps P itself)."""
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    scale = temperature_tolerance(1.0, temperature)
    bound = max(BOUNDS[dtype][_kind(name)], BOUNDS[torch.float32][_kind(name)] * scale)
    floor = (1e-5 * max(1.0, eps / eps32) if name in SUMS else max(8 * eps32, eps)) * scale
    if _kind(name) == "grad":
        floor = max(floor, eps32 * lse_rms)
    return floor, bound


def error_floor(name: str, ref: torch.Tensor, v: torch.Tensor, dout, temperature: float) -> float:
    """The norm below which `ref` is not divided by (helpers.relative_error's floor): the logsumexp is
    judged per row against max(|lse|, 1); a gradient that is exactly zero (one visible key: the softmax
    is constant) against a tenth of its natural size, a dP entry (dO_i·v_j) per element, times 1/T for dλ
    and 1/T² for the temperature."""
    if name == "out" or ref.numel() == 0:
        return 1e-300
    if v.numel() == 0:  # an empty batch: zero gradients of the temperatures, exactly
        return 1.0
    if name == "lse":
        return ref.numel() ** 0.5
    rms = lambda t: t.detach().double().pow(2).mean().sqrt().item()  # noqa: E731
    dp = rms(dout) * rms(v) * v.shape[-1] ** 0.5
    scale = {"dlq": 1 / temperature, "dlk": 1 / temperature, "dtemperature": temperature**-2}.get(name, 1.0)
    return 0.1 * max(1.0, scale) * dp * ref.numel() ** 0.5


def flash_close(got: Attention, exact: Attention, naive: Attention, *, dtype, temperature, v, dout=None,
                names=None, bound_only=()) -> list[str]:
    """flash-attention's criterion, result by result: the error against the float64 oracle `exact` at
    most 2× the naive attention's in the same precision (`naive`, oracle(exact=False)) plus a floor, and
    below tolerance()'s bound (lse and the results in `bound_only`: the bound alone). The floor is
    tolerance()'s or, for the gradients through dS where it is larger, one fp32 rounding of each sum that
    forms them (`exact.rounding`, rounding_scales): where the exact gradient is 0 the naive error is 0 too,
    and the kernel's is that rounding alone. `names` restricts the results compared; `got` and `exact` must
    otherwise have the same ones. Every result must be finite (the kernels' outputs are poisoned with NaN
    first). Returns the failures, one line each (empty: all pass)."""
    failures = []
    lse_rms = 1.0 if exact.lse is None or exact.lse.numel() == 0 else exact.lse.double().pow(2).mean().sqrt().item()
    results = {"out": (got.out, exact.out, naive.out), "lse": (got.lse, exact.lse, None)}
    results.update({n: (got.grads.get(n), exact.grads.get(n), naive.grads.get(n)) for n in GRADIENTS})
    for name, (g, want, base) in results.items():
        if names is not None and name not in names or (want is None and g is None):
            continue
        if want is None or g is None:
            failures.append(f"{name}: {'missing' if g is None else 'returned, but the oracle has none'}")
            continue
        if g.shape != want.shape:
            failures.append(f"{name}: shape {tuple(g.shape)} != {tuple(want.shape)}")
            continue
        if not torch.isfinite(g).all():
            failures.append(f"{name}: non-finite values (an element never written?)")
            continue
        denominator = error_floor(name, want, v, dout, temperature)
        err = relative_error(g, want, floor=denominator)
        base_err = 0.0 if base is None else relative_error(base, want, floor=denominator)
        floor, bound = tolerance(name, dtype, temperature, lse_rms)
        if exact.rounding is not None and name in exact.rounding:  # one fp32 rounding of each sum (rounding_scales)
            floor = max(floor, EPS32 * exact.rounding[name] / max(want.double().norm().item(), denominator))
        limit = bound if base is None or name in bound_only else min(2 * base_err + floor, bound)
        if not err <= limit:
            failures.append(f"{name}: error {err:.2e} > {limit:.2e} (naive {base_err:.2e}, floor {floor:.1e}, "
                            f"bound {bound:.1e})")
    return failures


def loglinear_small_blocks(monkeypatch) -> None:
    """Tiny leaves, scan chunks and dense cut-off, so that short sequences run the loglinear backend's
    divide and conquer over several levels and a deep recursive scan (its results do not change)."""
    from tauformer_kernels import loglinear

    monkeypatch.setattr(loglinear, "LEAF", 16)
    monkeypatch.setattr(loglinear, "SCAN_CHUNK", 4)
    monkeypatch.setattr(loglinear, "DENSE_QUERIES", 8)


def run_trainer(flags: list[str], *, ranks: int = 1, timeout: int = 300):
    """``python -m tauformer_model.train FLAGS`` in a subprocess, under torchrun with ``ranks`` CPU processes
    when ranks > 1 (one thread each, this process's sys.path); asserts it succeeded, returns the process."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), OMP_NUM_THREADS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    proc = subprocess.run(launcher + ["-m", "tauformer_model.train"] + flags, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc
