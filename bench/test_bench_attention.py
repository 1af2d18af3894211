"""Groups 1 and 2: causal attention forward, and forward+backward, every contender on the same inputs.

Each benchmark first checks the contender against the float64 oracle on a sample of query rows
(benchlib.check_rows) and fails beyond tolerance; only then is it timed.
"""
import benchlib
import torch


def _start(benchmark, bench, kind, attn_case):
    head_dim, length, contender = attn_case
    s = bench.settings
    bench.gate(kind, contender, length, head_dim, benchlib.unavailable_reason(contender, s.device))
    benchmark.group = benchlib.group_name(kind, s.batch, s.heads, length, head_dim, s.dtype, s.device)
    backend = contender.removeprefix("ours-") if contender.startswith("ours-") else None
    benchmark.extra_info.update(
        kind=kind, contender=contender, backend=backend,
        auto_backend=(benchlib.auto_resolves_to(s.device, s.dtype, length, needs_grad=kind == "attn-fwdbwd")
                      if backend == "auto" else None),
        shape=[s.batch, s.heads, length, head_dim], dtype=str(s.dtype).removeprefix("torch."), device=s.device,
        temperature=benchlib.TEMPERATURE, tau=benchlib.TAU,
    )
    inp = benchlib.make_inputs(s.batch, s.heads, length, head_dim, s.dtype, s.device)
    return inp, contender, length, head_dim


def test_attention_forward(benchmark, bench, attn_case):
    inp, contender, length, head_dim = _start(benchmark, bench, "attn-fwd", attn_case)
    device = bench.settings.device
    attend = benchlib.attention_callable(contender, inp)
    rows = benchlib.check_rows(length, device)

    def forward():
        with torch.no_grad():
            return attend(inp.q, inp.k, inp.v)

    start = benchlib.time.perf_counter()
    out = benchlib.first_call(contender, forward)
    benchlib.synchronize(device)
    first_call_s = benchlib.time.perf_counter() - start
    with torch.no_grad():
        ref = benchlib.attention_oracle(contender, inp, inp.q, inp.k, inp.v, rows)
        naive = benchlib.attention_oracle(contender, inp, inp.q, inp.k, inp.v, rows, precise=False)
    err = benchlib.relative_error(out[:, :, rows], ref)
    tol = benchlib.tolerance(benchlib.FWD_TOL[inp.q.dtype], benchlib.relative_error(naive, ref))
    benchmark.extra_info.update(rel_error=err, tolerance=tol, checked_rows=int(rows.numel()))
    assert out.shape == inp.v.shape and out.dtype == inp.v.dtype
    assert err <= tol, f"{contender}: relative error {err:.3g} > {tol:.3g} against the float64 oracle"
    del out
    bench.warm_and_time(benchmark, "attn-fwd", contender, length, head_dim, forward, first_call_s)


def test_attention_forward_backward(benchmark, bench, attn_case):
    device = bench.settings.device
    reason = None
    if attn_case[2] == "flex-compiled" and device == "cpu":
        reason = "FlexAttention on CPU is forward-only (its backward raises)"
    bench.gate("attn-fwdbwd", attn_case[2], attn_case[1], attn_case[0], reason)
    inp, contender, length, head_dim = _start(benchmark, bench, "attn-fwdbwd", attn_case)
    attend = benchlib.attention_callable(contender, inp)
    q, k, v = (t.detach().requires_grad_() for t in (inp.q, inp.k, inp.v))

    # Check: the upstream gradient is non-zero only on the checked rows, so the float64 oracle needs
    # those rows alone and still gives every gradient exactly (dk, dv gather from those rows only).
    rows = benchlib.check_rows(length, device)
    gen = torch.Generator().manual_seed(2)
    dout_rows = torch.randn(inp.q.shape[0], inp.q.shape[1], rows.numel(), inp.v.shape[-1], generator=gen)
    dout_sparse = torch.zeros_like(inp.v, dtype=torch.float32)
    dout_sparse[:, :, rows] = dout_rows.to(device)
    dout_sparse = dout_sparse.to(inp.v.dtype)

    def checked_call():
        o = attend(q, k, v)
        return o, torch.autograd.grad(o, (q, k, v), dout_sparse)

    start = benchlib.time.perf_counter()
    out, grads = benchlib.first_call(contender, checked_call)
    benchlib.synchronize(device)
    first_call_s = benchlib.time.perf_counter() - start

    def rows_and_grads(precise):
        leaves = [t.detach().double() if precise else t.detach().clone() for t in (inp.q, inp.k, inp.v)]
        leaves = [t.requires_grad_() for t in leaves]
        rows_out = benchlib.attention_oracle(contender, inp, *leaves, rows, precise=precise)
        upstream = dout_sparse[:, :, rows].to(rows_out.dtype)
        return [rows_out.detach()] + list(torch.autograd.grad(rows_out, leaves, upstream))

    ref, naive = rows_and_grads(True), rows_and_grads(False)
    names = ("out", "dq", "dk", "dv")
    errors = {n: benchlib.relative_error(x, r) for n, x, r in zip(names, [out.detach()[:, :, rows], *grads], ref)}
    floors = [benchlib.FWD_TOL[inp.q.dtype]] + [benchlib.GRAD_TOL[inp.q.dtype]] * 3
    tols = {n: benchlib.tolerance(f, benchlib.relative_error(x, r)) for n, f, x, r in zip(names, floors, naive, ref)}
    benchmark.extra_info.update(rel_errors=errors, tolerances=tols, checked_rows=int(rows.numel()))
    for name in names:
        assert errors[name] <= tols[name], \
            f"{contender}: {name} relative error {errors[name]:.3g} > {tols[name]:.3g} against the float64 oracle"
    del out, grads, ref, naive

    # Timing: a dense random upstream gradient (never time on zeros).
    dout_gen = torch.Generator(device=device).manual_seed(4)
    dout = torch.randn(inp.v.shape, generator=dout_gen, device=device).to(inp.v.dtype)

    def forward_backward():
        return torch.autograd.grad(attend(q, k, v), (q, k, v), dout)

    bench.warm_and_time(benchmark, "attn-fwdbwd", contender, length, head_dim, forward_backward, first_call_s)
