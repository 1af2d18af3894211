"""What the benchmarks share: the grids, the contenders, the float64 oracles and the timing rule.

Every group runs its contenders on the same inputs. Before a contender is timed, its output (and, for
forward+backward, its gradients) is compared with a float64 oracle; beyond tolerance the benchmark fails.
The oracles are exact but cheap at any length: they compute only a sample of query rows (all rows when
T is small), in float64, so a 16k-token check costs O(rows · T) instead of O(T²).

Contenders (names as they appear in the tables):
    ours-auto, ours-reference, ours-triton, ours-loglinear, ours-numba   `taumode_attention(..., backend=...)`
    naive-eager     reference.lambda_naive + reference.attention_naive (materialises T×T)
    flex-compiled   torch.compile(flex_attention) with a taumode score_mod and a causal block mask
    sdpa-dot        F.scaled_dot_product_attention(q, k, v, is_causal=True): ordinary attention's cost
    torch-einsum    (λ group) the λ projection written as plain torch ops
    sdpa-dot-cache  (decode group) one query over a (K, V) cache through SDPA

Importing this module starts no work.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import time

import torch
import torch.nn.functional as F

from tauformer_kernels import (
    backends,
    chain_laplacian,
    reference,
    taumode_attention,
    taumode_attention_from_lambda,  # noqa: F401  re-exported: test_bench_decode, sorted_cache_sweep call benchlib.*
    taumode_lambda,  # noqa: F401  re-exported: test_bench_lambda, test_bench_decode, sorted_cache_sweep call benchlib.*
)

# The taumode parameters every benchmark uses: one global tau (as the 30M run calibrated one) and a
# temperature sharp enough that attention is far from uniform (logits span about (−20, 0]).
TAU = 1.0
TEMPERATURE = 0.05
EPS = 1e-6

OURS = ("ours-auto", "ours-reference", "ours-triton", "ours-loglinear", "ours-numba")
ATTENTION_PEERS = ("naive-eager", "flex-compiled", "sdpa-dot")
LAMBDA_CONTENDERS = ("ours-auto", "ours-reference", "ours-triton", "torch-einsum")
DECODE_CONTENDERS = ("ours-auto", "ours-reference", "ours-triton", "ours-loglinear", "ours-numba", "ours-sorted-cache",
                     "sdpa-dot-cache")

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

# Relative-norm tolerances against the float64 oracle: flash-attention's criterion, error ≤ 2 × the
# error of the naive version in the same precision (taumode_rows(precise=False), computed on the same
# rows) + a floor. The floor for the forward is docs/math.md §Precision and tolerances (fp32 1e-5
# scaled by 0.01/temperature as in tests/helpers.temperature_tolerance; bf16 1e-2). Gradients w.r.t. λ
# cancel (Σ_j dS_ij = 0) and 1/temperature amplifies fp32 rounding of λ: at temperature 0.05 the naive
# fp32 dq is ~6e-4 off.
FWD_TOL = {torch.float32: 1e-5 * max(1.0, 0.01 / TEMPERATURE), torch.bfloat16: 1e-2, torch.float16: 5e-3}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def tolerance(floor: float, naive_error: float) -> float:
    return floor + 2.0 * naive_error


LAMBDA_TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}  # λ is fp32 from any input


@dataclasses.dataclass(frozen=True)
class Settings:
    """The run's grid, chosen once per session from the command line (conftest.py)."""

    device: str                 # "cpu" or "cuda"
    quick: bool                 # tiny shapes: the smoke test (`--benchmark-disable` or `--bench-quick`)
    batch: int
    heads: int
    lengths: tuple[int, ...]    # T of the attention and λ groups
    head_dims: tuple[int, ...]  # F
    contexts: tuple[int, ...]   # decode cache lengths
    dtype: torch.dtype
    # Largest T per contender, keyed by what runs ("naive-eager", "flex-compiled", or a backend name —
    # ours-auto is capped as the backend auto picks), optionally "/<kind>" for one group only.
    max_len: dict
    # A contender whose next call is predicted (extrapolated from its last length by GROWTH) to take
    # longer than this many seconds is skipped: a safety net so one slow contender cannot eat the session.
    call_cap_s: float

    @staticmethod
    def make(device: str, quick: bool, lengths=None, head_dims=None, contexts=None) -> "Settings":
        if quick:
            # odd lengths on purpose (masking paths); flex only at the first (each length compiles anew)
            return Settings(device, True, 1, 2, tuple(lengths or (128, 333)), tuple(head_dims or (32,)),
                            tuple(contexts or (257,)), torch.float32 if device == "cpu" else torch.bfloat16,
                            {"flex-compiled": 128}, 30.0)
        if device == "cpu":
            # 65536: the O(T log T) path in seconds; the dense contenders are skipped there by the
            # call-time guard, which states their predicted time (minutes)
            return Settings(device, False, 1, 8, tuple(lengths or (1024, 2048, 4096, 8192, 16384, 65536)),
                            tuple(head_dims or (64,)), tuple(contexts or (1024, 4096, 16384, 65536, 131072)),
                            torch.float32,
                            # naive materialises T×T (and its autograd graph); flex fails to compile at
                            # 16384; the O(T²) reference takes ~4 s per forward at 4096 on 2 cores
                            # the dense reference forward runs up to 65536 once, for the record of what
                            # the O(T log T) path saves there (~1 min per call; the guard allows 100 s)
                            {"naive-eager": 4096, "naive-eager/attn-fwdbwd": 2048, "flex-compiled": 8192,
                             "reference/attn-fwdbwd": 2048,
                             # SDPA's CPU backward at 16384 alone would take ~25 s per call
                             "sdpa-dot/attn-fwdbwd": 8192},
                            100.0)
        return Settings(device, False, 4, 16, tuple(lengths or (1024, 2048, 4096, 8192, 16384)),
                        tuple(head_dims or (64, 128)), tuple(contexts or (1024, 4096, 16384, 32768)),
                        torch.bfloat16, {"naive-eager": 4096}, 10.0)


# How a contender's call time grows with T (for the safety-net prediction): dense attention is O(T²),
# the loglinear and numba backends O(T log T).
GROWTH = {"loglinear": 1.15, "numba": 1.15}

# ----------------------------------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------------------------------

def unavailable_reason(contender: str, device: str) -> str | None:
    """Why a contender cannot run on this device (None when it can): reported as a skip, not a failure."""
    backend = contender.removeprefix("ours-") if contender.startswith("ours-") else None
    if backend == "triton":
        if device != "cuda":
            return "backend 'triton' needs CUDA (Triton's CPU interpreter is a test tool, not a contender)"
        missing = _missing_triton_modules()
        if missing:
            return f"backend 'triton' is not importable yet (missing: {', '.join(missing)})"
    if backend == "numba" and (device != "cpu" or not backends.numba_available()):
        return "backend 'numba' runs CPU tensors with the numba package (the cpu extra)"
    if backend == "loglinear" and importlib.util.find_spec("tauformer_kernels.loglinear") is None:
        return "backend 'loglinear' is not importable yet (tauformer_kernels.loglinear missing)"
    if contender == "flex-compiled" and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    return None


def lambda_unavailable_reason(contender: str, device: str) -> str | None:
    return unavailable_reason(contender, device)


# The ops import a backend's forward and backward together, and backend="triton" attention runs the
# Triton λ projection too: every one of these must import.
_TRITON_MODULES = ("attention_triton", "attention_triton_backward", "lambda_triton", "lambda_triton_backward")


def _missing_triton_modules() -> list[str]:
    if not backends.triton_available():
        return ["triton"]
    return [m for m in _TRITON_MODULES if importlib.util.find_spec(f"tauformer_kernels.{m}") is None]


def auto_resolves_to(device: str, dtype: torch.dtype, length: int, needs_grad: bool) -> str:
    """What backend="auto" picks here, for the record."""
    return backends.resolve("attention", "auto", torch.device(device), dtype, length, needs_grad)


# ----------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class AttentionInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    laplacian: torch.Tensor
    tau_heads: torch.Tensor     # (H,) fp32, for the peers that compute λ themselves
    temp_heads: torch.Tensor    # (H,) fp32

    @property
    def shape(self):
        return tuple(self.q.shape)


def make_inputs(batch, heads, length, head_dim, dtype, device, seed=0) -> AttentionInputs:
    """Fresh random q, k, v (never zeros), the chain Laplacian (the reference's default), tau and T."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=gen, device=device).to(dtype)
               for _ in range(3))
    laplacian = chain_laplacian(head_dim).to(device=device, dtype=torch.float32)
    tau_heads = torch.full((heads,), TAU, device=device)
    temp_heads = torch.full((heads,), TEMPERATURE, device=device)
    return AttentionInputs(q, k, v, laplacian, tau_heads, temp_heads)


def check_rows(length: int, device, count: int = 128, seed: int = 1) -> torch.Tensor:
    """The query rows the oracle checks: all of them for short sequences, else both ends and a random
    sample in between (every kind of row: few keys, many keys, leaf and level boundaries at random)."""
    if length <= 2 * count:
        return torch.arange(length, device=device)
    gen = torch.Generator().manual_seed(seed)
    ends = torch.cat([torch.arange(16), torch.arange(length - 16, length)])
    middle = torch.randint(16, length - 16, (count - 32,), generator=gen)
    return torch.unique(torch.cat([ends, middle])).to(device)


# ----------------------------------------------------------------------------------------------------
# float64 oracles on a subset of rows
# ----------------------------------------------------------------------------------------------------

def lambda_f64(x, laplacian, tau_heads):
    return reference.lambda_naive(x.double(), laplacian.double(), tau_heads.double(), EPS)


def _attend_rows(logits, rows, v):
    """Causal softmax over keys j ≤ row (Tq = Tk) of logits (B, H, R, T), then · V (B, H, T, D) in v's
    dtype (P rounded to it, as a low-precision naive version would)."""
    keys = torch.arange(v.shape[-2], device=v.device)
    logits = logits.masked_fill(keys[None, :] > rows[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1).to(v.dtype) @ v


def taumode_rows(q, k, v, laplacian, tau_heads, temp_heads, rows, precise=True):
    """Taumode attention for the query rows `rows`, differentiable (used for the gradient checks too).

    precise: everything in float64 (the oracle). Otherwise the naive version in the inputs' precision
    (λ and logits fp32, P·V in v's dtype: docs/math.md §Precision and tolerances), whose error sets the
    tolerance."""
    if precise:
        q, k, v = q.double(), k.double(), v.double()
        laplacian, tau_heads, temp_heads = laplacian.double(), tau_heads.double(), temp_heads.double()
    lq = reference.lambda_naive(q[:, :, rows], laplacian, tau_heads, EPS)
    lk = reference.lambda_naive(k, laplacian, tau_heads, EPS)
    logits = -(lq[..., :, None] - lk[..., None, :]).abs() / temp_heads.to(lq.dtype).view(1, -1, 1, 1)
    return _attend_rows(logits, rows, v)


def dot_rows(q, k, v, rows, precise=True):
    """Causal dot-product attention (SDPA's default scale 1/sqrt(F)) for the query rows `rows`;
    precise: in float64, else the naive version (q·kᵀ and P·V in the inputs' dtype, softmax fp32)."""
    if precise:
        q, k, v = q.double(), k.double(), v.double()
    logits = (q[:, :, rows] @ k.transpose(-1, -2)).to(torch.float64 if precise else torch.float32)
    return _attend_rows(logits / math.sqrt(q.shape[-1]), rows, v)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# ----------------------------------------------------------------------------------------------------
# the contenders
# ----------------------------------------------------------------------------------------------------

def lambda_torch(x, laplacian, tau_heads, eps=EPS):
    """The λ projection as a user would write it in plain torch (fp32 compute, docs/math.md §The λ projection)."""
    xf = x.float()
    energy = torch.einsum("bhtf,gf,bhtg->bht", xf, laplacian, xf) / ((xf * xf).sum(-1) + eps)
    energy = energy.clamp_min(0)
    tau = tau_heads.view(1, -1, 1)
    return energy / (energy + tau)


_FLEX = {}


def _flex_compiled():
    """torch.compile(flex_attention), built once per process (each new shape still compiles once)."""
    if "fn" not in _FLEX:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # One compiled graph per shape and grad mode: more than dynamo's default of 8 per code object,
        # past which it would silently fall back to eager flex (which materialises every score).
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
            torch._dynamo.config.accumulated_cache_size_limit = max(
                torch._dynamo.config.accumulated_cache_size_limit, 256)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _causal_block_mask(length: int, device: str):
    key = ("mask", length, device)
    if key not in _FLEX:
        from torch.nn.attention.flex_attention import create_block_mask

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        # built once per shape outside the timed region, as a model reuses it across layers and steps
        _FLEX[key] = create_block_mask(causal, None, None, length, length, device=device)
    return _FLEX[key]


def flex_taumode(inp: AttentionInputs):
    """FlexAttention computing taumode: λ in plain torch, score_mod = −|λq − λk| / temperature."""
    lam_q = lambda_torch(inp.q, inp.laplacian, inp.tau_heads)
    lam_k = lambda_torch(inp.k, inp.laplacian, inp.tau_heads)
    inv_temp = 1.0 / inp.temp_heads

    def taumode_score(score, b, h, q_idx, kv_idx):
        return -(lam_q[b, h, q_idx] - lam_k[b, h, kv_idx]).abs() * inv_temp[h]

    block_mask = _causal_block_mask(inp.q.shape[-2], str(inp.q.device))
    return _flex_compiled()(inp.q, inp.k, inp.v, score_mod=taumode_score, block_mask=block_mask)


def naive_taumode(inp: AttentionInputs):
    lam_q = reference.lambda_naive(inp.q, inp.laplacian, inp.tau_heads, EPS)
    lam_k = reference.lambda_naive(inp.k, inp.laplacian, inp.tau_heads, EPS)
    return reference.attention_naive(lam_q, lam_k, inp.v, inp.temp_heads, None, True)


def attention_callable(contender: str, inp: AttentionInputs):
    """(q, k, v) -> out for one contender, the rest of the inputs bound."""
    if contender.startswith("ours-"):
        backend = contender.removeprefix("ours-")
        return lambda q, k, v: taumode_attention(q, k, v, inp.laplacian, tau=TAU, temperature=TEMPERATURE,
                                                 eps=EPS, is_causal=True, backend=backend)
    if contender == "naive-eager":
        return lambda q, k, v: naive_taumode(dataclasses.replace(inp, q=q, k=k, v=v))
    if contender == "flex-compiled":
        return lambda q, k, v: flex_taumode(dataclasses.replace(inp, q=q, k=k, v=v))
    if contender == "sdpa-dot":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    raise ValueError(f"unknown attention contender {contender!r}")


def attention_oracle(contender: str, inp: AttentionInputs, q, k, v, rows, precise=True):
    """The rows `rows` of the function this contender computes: float64 (precise) or naive low precision."""
    if contender == "sdpa-dot":
        return dot_rows(q, k, v, rows, precise)
    return taumode_rows(q, k, v, inp.laplacian, inp.tau_heads, inp.temp_heads, rows, precise)


# ----------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------

def first_call(contender: str, fn):
    """The contender's first call. FlexAttention failing to compile or run at a shape (as it does on CPU
    at T=16384) means unavailable there: a skip with the reason, not a failure."""
    if contender != "flex-compiled":
        return fn()
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001  (torch.compile raises many kinds)
        import pytest

        pytest.skip(f"FlexAttention failed here: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def wall_time(fn, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def cpu_rounds(call_s: float) -> tuple[int, int]:
    """(rounds, iterations) for pytest-benchmark's pedantic mode on CPU: about 2–3 s of timing per
    benchmark, at least 3 rounds for anything under 1 s, one round for calls slower than 3 s."""
    if call_s > 3.0:
        return 1, 1
    if call_s > 1.0:
        return 2, 1
    if call_s > 0.2:
        return 3, 1
    iterations = max(1, min(100, int(0.02 / max(call_s, 1e-6))))
    rounds = max(5, min(50, int(2.0 / max(call_s * iterations, 1e-6))))
    return rounds, iterations


def run_benchmark(benchmark, fn, device: str, call_s: float) -> None:
    """Time `fn` (already called once: correctness check and warm-up) and store the numbers.

    CPU: pytest-benchmark's pedantic mode, rounds from the measured call time.
    CUDA: `triton.testing.do_bench` (CUDA events, median) is the number the summary reports
    (extra_info['do_bench_median_s']); pytest-benchmark also records a few synchronised rounds.
    """
    if benchmark.disabled:
        benchmark.pedantic(fn, rounds=1, iterations=1)  # disabled: pytest-benchmark calls it once, untimed
        return
    if device == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=25, rep=100 if call_s < 0.05 else 300, return_mode="median")
        benchmark.extra_info["do_bench_median_s"] = ms / 1e3
        benchmark.extra_info["timer"] = "triton.testing.do_bench (CUDA events, median)"

        def synced():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=3 if call_s > 0.2 else 10, iterations=1, warmup_rounds=1)
        return
    rounds, iterations = cpu_rounds(call_s)
    benchmark.extra_info["timer"] = f"pytest-benchmark pedantic ({rounds} rounds x {iterations} iterations)"
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=0)


def group_name(kind: str, batch, heads, length, head_dim, dtype, device, length_label="T") -> str:
    """Group names sort by kind, then shape (lengths zero-padded so 16384 sorts after 4096)."""
    return f"{kind} B{batch} H{heads} {length_label}={length:05d} F{head_dim} {DTYPE_NAMES[dtype]} {device}"
