"""Group 3: the λ projection alone (`taumode_lambda`) against the same math in plain torch ops."""
import benchlib
import torch


def test_lambda_projection(benchmark, bench, lambda_case):
    head_dim, length, contender = lambda_case
    s = bench.settings
    bench.gate("lambda", contender, length, head_dim, benchlib.lambda_unavailable_reason(contender, s.device))
    benchmark.group = benchlib.group_name("lambda", s.batch, s.heads, length, head_dim, s.dtype, s.device)
    backend = contender.removeprefix("ours-") if contender.startswith("ours-") else None
    benchmark.extra_info.update(kind="lambda", contender=contender, backend=backend,
                                shape=[s.batch, s.heads, length, head_dim],
                                dtype=str(s.dtype).removeprefix("torch."), device=s.device, tau=benchlib.TAU)
    inp = benchlib.make_inputs(s.batch, s.heads, length, head_dim, s.dtype, s.device)
    x = inp.q
    if backend is not None:
        def project():
            with torch.no_grad():
                return benchlib.taumode_lambda(x, inp.laplacian, tau=benchlib.TAU, eps=benchlib.EPS, backend=backend)
    else:
        def project():
            with torch.no_grad():
                return benchlib.lambda_torch(x, inp.laplacian, inp.tau_heads)

    start = benchlib.time.perf_counter()
    lam = project()
    benchlib.synchronize(s.device)
    first_call_s = benchlib.time.perf_counter() - start
    ref = benchlib.lambda_f64(x, inp.laplacian, inp.tau_heads)
    err = benchlib.relative_error(lam, ref)
    tol = benchlib.LAMBDA_TOL[x.dtype]
    benchmark.extra_info.update(rel_error=err, tolerance=tol)
    assert lam.shape == x.shape[:-1] and lam.dtype == torch.float32
    assert err <= tol, f"{contender}: λ relative error {err:.3g} > {tol:.3g} against the float64 oracle"
    bench.warm_and_time(benchmark, "lambda", contender, length, head_dim, project, first_call_s)
