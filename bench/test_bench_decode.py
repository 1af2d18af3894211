"""Group 4: one decode step over a cache of N tokens.

Taumode keeps (V, λk) per layer: the step projects the new key and query to λ, writes λk and v at the
last position of a preallocated cache, and attends the one query over all N keys. The peer keeps (K, V)
and runs SDPA with one query over the cache (is_causal=False: a single query sees every cached key;
SDPA's causal mask is top-left aligned). Cache bytes are recorded in extra_info.
"""
import math

import torch
import torch.nn.functional as F

import benchlib


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
