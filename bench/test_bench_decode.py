"""Group 4: one decode step over a cache of N tokens.

Taumode keeps (V, λk) per layer: the step projects the new key and query to λ, writes λk and v at the
last position of a preallocated cache, and attends the one query over all N keys. The peer keeps (K, V)
and runs SDPA with one query over the cache (is_causal=False: a single query sees every cached key;
SDPA's causal mask is top-left aligned). Cache bytes are recorded in extra_info.

ours-sorted-cache (tauformer_kernels.SortedCache) appends every key for good, so one timed call is a
whole period of its structure: as many steps (λ projection, append, attend) as the largest block holds,
BLOCK·FANOUT^(LEVELS−1), from N minus that many cached keys to N (fewer below that), which include every
seal and merge of the period, the periodic costs at their true weight. Every round starts from a copy of the same
prefilled cache (untimed); summarize.py divides by steps_per_call, so the tables show time per step.
"""
import copy
import math

import benchlib
import torch
import torch.nn.functional as F


def test_decode_step(benchmark, bench, decode_case):
    head_dim, context, contender = decode_case
    s = bench.settings
    bench.gate("decode", contender, context, head_dim, benchlib.unavailable_reason(contender, s.device))
    b, h, dev, dt = s.batch, s.heads, s.device, s.dtype
    benchmark.group = benchlib.group_name("decode", b, h, context, head_dim, dt, dev, length_label="N")
    backend = contender.removeprefix("ours-") if contender.startswith("ours-") else None
    benchmark.extra_info.update(kind="decode", contender=contender, backend=backend,
                                shape=[b, h, context, head_dim], dtype=str(dt).removeprefix("torch."), device=dev,
                                temperature=benchlib.TEMPERATURE, tau=benchlib.TAU)

    if contender == "ours-sorted-cache":
        return _sorted_cache_cycle(benchmark, bench, head_dim, context)

    gen = torch.Generator(device=dev).manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device=dev).to(dt)  # noqa: E731
    q_new, k_new, v_new = rand(b, h, 1, head_dim), rand(b, h, 1, head_dim), rand(b, h, 1, head_dim)
    v_cache = rand(b, h, context, head_dim)
    laplacian = benchlib.chain_laplacian(head_dim).to(device=dev, dtype=torch.float32)
    tau_heads = torch.full((h,), benchlib.TAU, device=dev)

    if backend is not None:
        lk_cache = benchlib.lambda_torch(rand(b, h, context, head_dim), laplacian, tau_heads)
        cache_bytes = v_cache.nbytes + lk_cache.nbytes

        def step():
            with torch.no_grad():
                lam = benchlib.taumode_lambda(torch.cat([k_new, q_new], dim=2), laplacian, tau=benchlib.TAU,
                                              eps=benchlib.EPS, backend=backend)
                lk_cache[:, :, context - 1:] = lam[:, :, :1]
                v_cache[:, :, context - 1:] = v_new
                return benchlib.taumode_attention_from_lambda(lam[:, :, 1:], lk_cache, v_cache,
                                                              temperature=benchlib.TEMPERATURE, is_causal=True,
                                                              backend=backend)

        def oracle():
            lk = lk_cache.double().clone()
            lk[:, :, -1] = benchlib.lambda_f64(k_new, laplacian, tau_heads)[:, :, 0]
            lq = benchlib.lambda_f64(q_new, laplacian, tau_heads)
            logits = -(lq[..., :, None] - lk[..., None, :]).abs() / benchlib.TEMPERATURE
            return torch.softmax(logits, -1) @ v_cache.double()
    else:
        k_cache = rand(b, h, context, head_dim)
        cache_bytes = k_cache.nbytes + v_cache.nbytes

        def step():
            with torch.no_grad():
                k_cache[:, :, context - 1:] = k_new
                v_cache[:, :, context - 1:] = v_new
                return F.scaled_dot_product_attention(q_new, k_cache, v_cache, is_causal=False)

        def oracle():
            logits = q_new.double() @ k_cache.double().transpose(-1, -2) / math.sqrt(head_dim)
            return torch.softmax(logits, -1) @ v_cache.double()

    # the (K, V) cache this step replaces, for the ratio
    dot_bytes = 2 * v_cache.nbytes
    benchmark.extra_info.update(cache_bytes=cache_bytes, cache_bytes_vs_kv=cache_bytes / dot_bytes)

    start = benchlib.time.perf_counter()
    out = step()
    benchlib.synchronize(dev)
    first_call_s = benchlib.time.perf_counter() - start
    err = benchlib.relative_error(out, oracle())
    tol = benchlib.FWD_TOL[dt]
    benchmark.extra_info.update(rel_error=err, tolerance=tol)
    assert out.shape == (b, h, 1, head_dim)
    assert err <= tol, f"{contender}: relative error {err:.3g} > {tol:.3g} against the float64 oracle"
    bench.warm_and_time(benchmark, "decode", contender, context, head_dim, step, first_call_s)


def _sorted_cache_cycle(benchmark, bench, head_dim, context):
    from tauformer_kernels import sorted_cache

    s = bench.settings
    b, h, dev, dt = s.batch, s.heads, s.device, s.dtype
    steps = min(sorted_cache.BLOCK * sorted_cache.FANOUT ** (sorted_cache.LEVELS - 1), context - 1)
    gen = torch.Generator(device=dev).manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device=dev).to(dt)  # noqa: E731
    laplacian = benchlib.chain_laplacian(head_dim).to(device=dev, dtype=torch.float32)
    tau_heads = torch.full((h,), benchlib.TAU, device=dev)
    temperature = torch.full((h,), benchlib.TEMPERATURE, device=dev)
    k_all, q_new, v_all = rand(b, h, context, head_dim), rand(b, h, steps, head_dim), rand(b, h, context, head_dim)
    lk_all = benchlib.lambda_torch(k_all, laplacian, tau_heads)
    prefilled = sorted_cache.SortedCache(temperature, h, capacity=context)
    prefilled.append(lk_all[..., :context - steps], v_all[..., :context - steps, :])
    cache_bytes = prefilled.nbytes
    benchmark.extra_info.update(cache_bytes=cache_bytes, cache_bytes_vs_kv=cache_bytes / (2 * v_all.nbytes),
                                steps_per_call=steps)
    state = {}

    def fresh():
        state["cache"] = copy.deepcopy(prefilled)
        return (), {}

    def cycle():
        cache = state["cache"]
        with torch.no_grad():
            for i in range(context - steps, context):
                t = i - (context - steps)
                lam = benchlib.taumode_lambda(torch.cat([k_all[:, :, i:i + 1], q_new[:, :, t:t + 1]], dim=2),
                                              laplacian, tau=benchlib.TAU, eps=benchlib.EPS)
                cache.append(lam[:, :, :1], v_all[:, :, i:i + 1])
                out = cache.attend(lam[:, :, 1:], temperature)
        return out

    fresh()
    start = benchlib.time.perf_counter()
    out = cycle()
    benchlib.synchronize(dev)
    first_call_s = benchlib.time.perf_counter() - start
    # the last step's query over all `context` keys, against the float64 oracle
    lq = benchlib.lambda_f64(q_new[:, :, -1:], laplacian, tau_heads)
    logits = -(lq[..., :, None] - lk_all.double()[..., None, :]).abs() / benchlib.TEMPERATURE
    err = benchlib.relative_error(out, torch.softmax(logits, -1) @ v_all.double())
    tol = benchlib.FWD_TOL[dt]
    benchmark.extra_info.update(rel_error=err, tolerance=tol, warm_call_s=round(first_call_s, 6))
    assert out.shape == (b, h, 1, head_dim)
    assert err <= tol, f"ours-sorted-cache: relative error {err:.3g} > {tol:.3g} against the float64 oracle"
    if benchmark.disabled:  # pytest-benchmark calls it once, untimed
        benchmark.pedantic(cycle, setup=fresh, rounds=1, iterations=1)
        return
    benchmark.extra_info["timer"] = f"pytest-benchmark pedantic (3 rounds of {steps} steps, each from a fresh copy)"
    benchmark.pedantic(cycle, setup=fresh, rounds=3, iterations=1)
