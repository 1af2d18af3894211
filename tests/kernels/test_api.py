"""The public API: fp32 against float64, GQA, Tq < Tk, T = 1, temperatures, backends, bad input."""
import pytest
import torch
from helpers import oracle_attention, per_head, random_heads, random_lambdas, relative_error, temperature_tolerance

from tauformer_kernels import (
    BACKENDS,
    chain_laplacian,
    reference,
    taumode_attention,
    taumode_attention_from_lambda,
    taumode_lambda,
)

TEMPERATURES = [1e-3, 0.05, 1.0, 10.0]
SHAPES = [  # (B, H, H_kv, Tq, Tk, F, Dv)
    (1, 1, 1, 1, 1, 16, 16),
    (2, 8, 2, 33, 33, 32, 24),
    (1, 4, 4, 17, 61, 16, 8),
    (1, 2, 1, 129, 129, 64, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_fp32_forward_matches_float64(shape, temperature):
    b, h, hkv, tq, tk, f, dv = shape
    q, k, v = random_heads(b, h, hkv, tq, tk, f, dv)
    lap = chain_laplacian(f, dtype=torch.float64)
    tau = torch.rand(hkv, dtype=torch.float64) + 0.05
    ref = oracle_attention(q, k, v, lap, tau, per_head(temperature, h))
    out = taumode_attention(q.float(), k.float(), v.float(), lap.float(), tau=tau.float(), temperature=temperature)
    assert out.dtype == torch.float32 and out.shape == (b, h, tq, dv)
    assert relative_error(out, ref) < temperature_tolerance(1e-5, temperature)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_fp32_gradients_match_float64_on_each_half(shape, temperature):
    """Gradients pass through sign(λq − λk): a near-tie may flip in fp32, so each half is checked on
    shared inputs: attention from the same λ, and the λ projection from the same x."""
    b, h, hkv, tq, tk, f, dv = shape
    lq, lk = random_lambdas(b, h, hkv, tq, tk)
    v = torch.randn(b, hkv, tk, dv, dtype=torch.float64)
    temp = per_head(temperature, h)
    slopes = torch.rand(b, h, dtype=torch.float64) * 0.1
    leaves64 = [t.clone().requires_grad_() for t in (lq, lk, v, temp, slopes)]
    leaves32 = [t.float().requires_grad_() for t in (lq, lk, v, temp, slopes)]
    ref = reference.attention_naive(*leaves64)
    out = taumode_attention_from_lambda(*leaves32[:3], temperature=leaves32[3], alibi_slopes=leaves32[4])
    dout = torch.randn_like(ref)
    g64 = torch.autograd.grad(ref, leaves64, dout)
    g32 = torch.autograd.grad(out, leaves32, dout.float())
    for name, a, r in zip(("lq", "lk", "v", "temperature", "slopes"), g32, g64):
        assert relative_error(a, r, floor=1e-6) < temperature_tolerance(1e-4, temperature), name

    x = torch.randn(b, hkv, tk, f, dtype=torch.float64)
    lap = chain_laplacian(f, dtype=torch.float64)
    tau = torch.rand(hkv, dtype=torch.float64) + 0.05
    x64, tau64 = x.clone().requires_grad_(), tau.clone().requires_grad_()
    x32, tau32 = x.float().requires_grad_(), tau.float().requires_grad_()
    lam64 = reference.lambda_naive(x64, lap, tau64)
    lam32 = taumode_lambda(x32, lap.float(), tau=tau32)
    assert lam32.dtype == torch.float32 and relative_error(lam32, lam64) < 1e-6
    dlam = torch.randn_like(lam64)
    for a, r in zip(torch.autograd.grad(lam32, (x32, tau32), dlam.float()),
                    torch.autograd.grad(lam64, (x64, tau64), dlam)):
        assert relative_error(a, r) < 1e-5


def test_fp32_gradients_of_the_composition_loosely():
    """End to end, q/k gradients may differ where a near-tie of λq − λk flips sign in fp32: loose bound."""
    q, k, v = random_heads(1, 4, 2, 40, 40, 16, 16)
    lap = chain_laplacian(16, dtype=torch.float64)
    leaves64 = [t.clone().requires_grad_() for t in (q, k, v)]
    leaves32 = [t.float().requires_grad_() for t in (q, k, v)]
    ref = oracle_attention(*leaves64, lap, per_head(1.0, 2), per_head(0.05, 4))
    out = taumode_attention(*leaves32, lap.float(), temperature=0.05)
    dout = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, leaves32, dout.float()), torch.autograd.grad(ref, leaves64, dout)):
        assert relative_error(a, r) < 1e-3


def test_half_precision_inputs_keep_v_dtype():
    q, k, v = random_heads(1, 2, 1, 20, 20, 16, 8, dtype=torch.bfloat16)
    out = taumode_attention(q, k, v, chain_laplacian(16), temperature=0.1)
    assert out.dtype == torch.bfloat16
    ref = oracle_attention(q, k, v, chain_laplacian(16), per_head(1.0, 1), per_head(0.1, 2))
    assert relative_error(out, ref) < 1e-2


def test_lambda_any_leading_shape_and_range():
    x = torch.randn(3, 5, 7, 8)
    lam = taumode_lambda(x, chain_laplacian(8), tau=0.3)
    assert lam.shape == (3, 5, 7) and lam.dtype == torch.float32
    assert bool(((lam >= 0) & (lam < 1)).all())
    assert taumode_lambda(torch.randn(10, 8), chain_laplacian(8)).shape == (10,)


def test_from_lambda_accepts_any_finite_lambda():
    """The reference crate's retrieval test: λk = key position, temperature 1e-3 picks the nearest key."""
    t = 12
    lk = torch.arange(t, dtype=torch.float32).view(1, 1, t)
    lq = torch.full((1, 1, t), 3.0)
    v = torch.eye(t).view(1, 1, t, t)
    out = taumode_attention_from_lambda(lq, lk, v, temperature=1e-3, is_causal=False)
    assert out[0, 0, :, 3].min().item() == pytest.approx(1.0)


def test_torch_ops_are_registered():
    q, k, v = random_heads(1, 2, 1, 5, 5, 8, 4, dtype=torch.float32)
    lap = chain_laplacian(8)
    one = torch.tensor(1.0)
    out = torch.ops.tauformer.taumode_attention(q, k, v, lap, one, torch.tensor(0.1), 1e-6, True, None, "auto")
    assert torch.equal(out, taumode_attention(q, k, v, lap, temperature=0.1))
    lq = torch.ops.tauformer.taumode_lambda(q, lap, one, 1e-6, "reference")
    assert lq.shape == (1, 2, 5)
    assert torch.ops.tauformer.taumode_attention_from_lambda(
        lq, lq[:, :1], v, torch.tensor(0.1), True, None, "auto").shape == (1, 2, 5, 4)


@pytest.mark.parametrize("length", [40, 1100])
def test_eager_inference_skips_dispatch_with_the_same_results(length, monkeypatch):
    """No grad: the public functions call the ops' implementations directly (ops.eager_inference), with
    bitwise the results of the torch.ops path; with grad they go through the ops. 1100 keys: loglinear."""
    from tauformer_kernels import ops

    q, k, v = random_heads(1, 4, 2, length, length, 16, 8, dtype=torch.float32)
    lap, temp = chain_laplacian(16), torch.full((4,), 0.1)
    slopes = torch.rand(4) * 0.1
    with torch.no_grad():
        direct = taumode_attention(q, k, v, lap, tau=torch.ones(2), temperature=temp, alibi_slopes=slopes)
        lam = taumode_lambda(q, lap, tau=torch.ones(4))
        monkeypatch.setattr(ops, "eager_inference", lambda *tensors: False)
        via_ops = taumode_attention(q, k, v, lap, tau=torch.ones(2), temperature=temp, alibi_slopes=slopes)
        assert torch.equal(direct, via_ops)
        assert torch.equal(lam, taumode_lambda(q, lap, tau=torch.ones(4)))
    monkeypatch.undo()
    assert ops.eager_inference(q, None) and not ops.eager_inference(q.requires_grad_())
    assert not ops.eager_inference(torch.nn.Parameter(torch.ones(2)))


def test_torch_compile_fullgraph_matches_eager():
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("laplacian", chain_laplacian(16))
            self.log_temperature = torch.nn.Parameter(torch.full((4,), -3.0))

        def forward(self, q, k, v):
            return torch.ops.tauformer.taumode_attention(
                q, k, v, self.laplacian, torch.ones(2), self.log_temperature.exp(), 1e-6, True, None, "auto"
            )

    module = Attention()
    q, k, v = random_heads(2, 4, 2, 24, 24, 16, 16, dtype=torch.float32)
    # the default backend (inductor) traces the ops through their fake implementations
    compiled = torch.compile(module, fullgraph=True, )
    eager_out = module(q, k, v)
    compiled_out = compiled(q, k, v)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-6, atol=1e-6)
    compiled_out.sum().backward()
    g_compiled = module.log_temperature.grad.clone()
    module.log_temperature.grad = None
    eager_out.sum().backward()
    torch.testing.assert_close(g_compiled, module.log_temperature.grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Bad input: a clear error that names the argument
# ----------------------------------------------------------------------------------------------------

def _good():
    q, k, v = random_heads(2, 4, 2, 6, 6, 8, 8, dtype=torch.float32)
    return q, k, v, chain_laplacian(8)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(q=a["q"][0]), ValueError, "q must have 4 dimensions"),
        (lambda a: a.update(k=a["k"][:1]), ValueError, "batch sizes differ"),
        (lambda a: a.update(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8)), ValueError,
         "multiple of the kv heads"),
        (lambda a: a.update(k=a["k"][:, :, :, :4]), ValueError, "share the head dim"),
        (lambda a: a.update(v=a["v"][:, :, :5]), ValueError, "kv heads and length"),
        (lambda a: a.update(q=torch.randn(2, 4, 7, 8)), ValueError, "Tq <= Tk"),
        (lambda a: a.update(laplacian=torch.eye(7)), ValueError, "laplacian must be F×F"),
        (lambda a: a.update(laplacian=torch.ones(8)), ValueError, "laplacian must have 2 dimensions"),
        (lambda a: a.update(v=a["v"].double()), TypeError, "share a dtype"),
        (lambda a: a.update(q=a["q"].int(), k=a["k"].int()), TypeError, "q must be a floating tensor"),
        (lambda a: a.update(temperature=0.0), ValueError, "temperature must be > 0"),
        (lambda a: a.update(temperature=torch.tensor([0.1, -1.0, 0.1, 0.1])), ValueError, "temperature must be > 0"),
        (lambda a: a.update(temperature=torch.ones(3)), ValueError,
         r"temperature must be a float or a tensor of shape \(4,\)"),
        (lambda a: a.update(tau=-1.0), ValueError, "tau must be > 0"),
        (lambda a: a.update(tau=torch.ones(4)), ValueError, r"tau must be a float or a tensor of shape \(2,\)"),
        (lambda a: a.update(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes must have shape"),
        (lambda a: a.update(backend="cuda"), ValueError, "backend must be one of 'auto', 'reference'"),
        (lambda a: a.update(eps=-1.0), ValueError, "eps must be"),
        (lambda a: a.update(q=a["q"].clone().index_fill_(2, torch.tensor([1]), float("nan")), check_finite=True),
         ValueError, "q contains non-finite"),
    ],
)
def test_bad_input_names_the_argument(mutate, error, match):
    q, k, v, lap = _good()
    args = dict(q=q, k=k, v=v, laplacian=lap)
    mutate(args)
    with pytest.raises(error, match=match):
        taumode_attention(**args)


def test_bad_input_from_lambda_and_lambda():
    lq, lk = random_lambdas(1, 2, 1, 4, 4, dtype=torch.float32)
    v = torch.randn(1, 1, 4, 3)
    with pytest.raises(ValueError, match="lq must have 3 dimensions"):
        taumode_attention_from_lambda(lq[0], lk, v)
    with pytest.raises(TypeError, match="lq and lk must share a dtype"):
        taumode_attention_from_lambda(lq, lk.double(), v)
    with pytest.raises(ValueError, match="lk contains non-finite"):
        taumode_attention_from_lambda(lq, lk / 0, v, check_finite=True)
    with pytest.raises(ValueError, match="laplacian must be F×F with F = 8"):
        taumode_lambda(torch.randn(2, 3, 4, 8), torch.eye(6))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        taumode_lambda([1.0, 2.0], torch.eye(2))


def test_backend_names():
    assert BACKENDS == ("auto", "reference", "triton", "loglinear", "numba")
    lq, lk = random_lambdas(1, 1, 1, 3, 3, dtype=torch.float32)
    with pytest.raises(TypeError, match="float64"):
        taumode_attention_from_lambda(lq.double(), lk.double(), torch.randn(1, 1, 3, 2, dtype=torch.float64),
                                      backend="triton")


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    lq, lk = random_lambdas(1, 1, 1, 3, 3, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        taumode_attention_from_lambda(lq, lk, torch.randn(1, 1, 3, 2), backend="triton")


def test_auto_backend_choice_on_cpu_with_numba():
    from tauformer_kernels import backends

    pytest.importorskip("numba", reason="the numba package (the cpu extra) is not installed")
    cpu = torch.device("cpu")
    for keys in (1, 100, 10**6):
        for needs_grad in (True, False):
            assert backends.resolve("attention", "auto", cpu, torch.float32, keys, needs_grad) == "numba"
    assert backends.resolve("attention", "auto", cpu, torch.float64, 10) == "numba"
    # an explicit backend is kept; the λ projection has no numba path
    assert backends.resolve("attention", "reference", cpu, torch.float32, 10) == "reference"
    assert backends.resolve("lambda", "numba", cpu, torch.float32) == backends.resolve("lambda", "auto", cpu,
                                                                                       torch.float32)


def test_numba_backend_errors(monkeypatch):
    from tauformer_kernels import backends

    lq, lk = random_lambdas(1, 1, 1, 3, 3, dtype=torch.float32)
    monkeypatch.setattr(backends, "numba_available", lambda: False)
    with pytest.raises(RuntimeError, match="backend='numba' needs the numba package"):
        taumode_attention_from_lambda(lq, lk, torch.randn(1, 1, 3, 2), backend="numba")
    monkeypatch.setattr(backends, "numba_available", lambda: True)
    with pytest.raises(RuntimeError, match="backend='numba' runs CPU tensors"):
        backends.resolve("attention", "numba", torch.device("cuda"), torch.float32, 3)


def test_auto_backend_choice_on_cpu_without_numba(monkeypatch):
    from tauformer_kernels import backends
    from tauformer_kernels.backends import CPU_LOGLINEAR_MIN_KEYS, CPU_LOGLINEAR_MIN_KEYS_INFERENCE, resolve

    monkeypatch.setattr(backends, "numba_available", lambda: False)

    def resolve_attention_backend(backend, device, dtype, keys, needs_grad=True):
        return resolve("attention", backend, device, dtype, keys, needs_grad)

    cpu = torch.device("cpu")
    assert resolve_attention_backend("auto", cpu, torch.float32, CPU_LOGLINEAR_MIN_KEYS - 1) == "reference"
    assert resolve_attention_backend("auto", cpu, torch.float32, CPU_LOGLINEAR_MIN_KEYS) == "loglinear"
    assert CPU_LOGLINEAR_MIN_KEYS_INFERENCE < CPU_LOGLINEAR_MIN_KEYS
    for keys, expected in ((CPU_LOGLINEAR_MIN_KEYS_INFERENCE - 1, "reference"),
                           (CPU_LOGLINEAR_MIN_KEYS_INFERENCE, "loglinear")):
        assert resolve_attention_backend("auto", cpu, torch.float32, keys, needs_grad=False) == expected
    assert resolve_attention_backend("reference", cpu, torch.float32, 10**6) == "reference"
    # the λ projection has no sorted algorithm: "loglinear" and "auto" choose it alike, at any length
    assert resolve("lambda", "loglinear", cpu, torch.float32, 10**6) == resolve("lambda", "auto", cpu, torch.float32)


def test_auto_at_long_context_matches_the_reference():
    lq, lk = random_lambdas(1, 2, 1, 2100, 2100, dtype=torch.float32)
    v = torch.randn(1, 1, 2100, 16)
    out = taumode_attention_from_lambda(lq, lk, v, temperature=0.05)
    ref = taumode_attention_from_lambda(lq, lk, v, temperature=0.05, backend="reference")
    assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("entry", ["lambda", "attention", "from_lambda"])
def test_a_public_call_reaches_the_backend_in_three_frames(entry, monkeypatch):
    """Eager inference: public function -> its op's implementation -> the backend function (the dispatch
    decision is taken once, in the public function)."""
    import inspect

    from tauformer_kernels import api, reference

    depths = []

    def spy(real):
        def backend_function(*args):
            names = [frame.function for frame in inspect.stack()[1:4]]
            depths.append(names)
            return real(*args)
        return backend_function

    monkeypatch.setattr(reference, "lambda_fwd_reference", spy(reference.lambda_fwd_reference))
    monkeypatch.setattr(reference, "attention_fwd_chunked", spy(reference.attention_fwd_chunked))
    q, k, v = random_heads(1, 2, 1, 5, 5, 8, 4, dtype=torch.float32)
    lap = chain_laplacian(8)
    with torch.no_grad():
        if entry == "lambda":
            taumode_lambda(q, lap, backend="reference")
        elif entry == "attention":
            taumode_attention(q, k, v, lap, backend="reference")
        else:
            taumode_attention_from_lambda(q[..., 0], k[..., 0], v, backend="reference")
    public = {"lambda": api.taumode_lambda, "attention": api.taumode_attention,
              "from_lambda": api.taumode_attention_from_lambda}[entry].__name__
    assert depths and all(names[1] == public for names in depths), depths
