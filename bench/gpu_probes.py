"""GPU-only measurements of bench/run_gpu.sh that pytest-benchmark does not cover.

    python bench/gpu_probes.py sweep OUT.json      num_stages {1,2,3} × warps {4,8}, forward, B4 H16 T4096 D64 bf16
    python bench/gpu_probes.py sdpa OUT.json       taumode forward / forward+backward vs SDPA pinned to flash
    python bench/gpu_probes.py PROBE OUT.json      one size probe (run each in its own process):
        big-forward   O with more than 2^31 elements (B3 H16 T1M Dv64 bf16): the 64-bit (WIDE) build
        many-heads    B·H = 65,536 through forward and backward (grid axes 1 and 2 past 65,535)
        long-backward a T = 131,072 backward (the O(T) dλq scratch)

Each writes one JSON object: what ran, its time or error, and the error against a float64 reference on
sampled rows. Nothing here runs without CUDA.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import torch

from tauformer_kernels import attention_triton, reference, taumode_attention, taumode_attention_from_lambda
from tauformer_kernels.laplacian import chain_laplacian

PROBES = ("big-forward", "many-heads", "long-backward")


def bench_ms(fn, reps: int = 20) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=reps))


def sampled_error(lq, lk, v, temp, out, rows) -> float:
    """Relative error of out at rows `rows` (batch 0, head 0) against the float64 oracle."""
    b0 = (slice(0, 1), slice(0, 1))
    ref = reference.attention_naive(lq[b0].double(), lk[b0].double(), v[b0].double(), temp[:1].double())
    got = out[0, 0, rows].double()
    want = ref[0, 0, rows]
    return float((got - want).norm() / want.norm())


def sweep() -> dict:
    """The forward's launch options at the floor shape, side by side (forward_launches patched per run)."""
    b, h, t, d = 4, 16, 4096, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    lq, lk = torch.rand(b, h, t, device="cuda", generator=g), torch.rand(b, h, t, device="cuda", generator=g)
    v = torch.randn(b, h, t, d, device="cuda", generator=g, dtype=torch.bfloat16)
    temp = torch.full((h,), 0.05, device="cuda")
    real = attention_triton.forward_launches
    rows = []
    for stages in (1, 2, 3):
        for warps in (4, 8):
            def patched(*args, **kwargs):
                return [dataclasses.replace(launch, num_warps=warps, num_stages=stages)
                        for launch in real(*args, **kwargs)]
            attention_triton.forward_launches = patched
            try:
                fn = lambda: attention_triton.attention_fwd_triton(lq, lk, v, temp, None, True)  # noqa: E731
                fn()
                rows.append({"num_stages": stages, "num_warps": warps, "ms": bench_ms(fn)})
            except Exception as e:  # noqa: BLE001  (a config that fails to compile or launch is a row too)
                rows.append({"num_stages": stages, "num_warps": warps, "error": f"{type(e).__name__}: {e}"[:300]})
            finally:
                attention_triton.forward_launches = real
    scores = b * h * t * (t + 1) / 2
    for r in rows:
        if "ms" in r:
            r["tscores_per_s"] = scores / (r["ms"] * 1e-3) / 1e12
    return {"shape": [b, h, t, d], "dtype": "bf16", "causal": True, "rows": rows}


def sdpa() -> dict:
    """Kernels alone and end to end against SDPA with its backend pinned to FlashAttention (recorded)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {"rows": []}
    for t in (1024, 4096, 16384):
        b, h, d = 4, 16, 64
        q = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        lap = chain_laplacian(d).cuda()
        lq, lk = torch.rand(b, h, t, device="cuda"), torch.rand(b, h, t, device="cuda")
        temp = torch.full((h,), 0.05, device="cuda")
        row = {"T": t, "B": b, "H": h, "D": d, "dtype": "bf16"}
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa_f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
            row["sdpa_backend"] = "FLASH_ATTENTION (pinned with torch.nn.attention.sdpa_kernel)"
            row["sdpa_fwd_ms"] = bench_ms(sdpa_f)
            o = sdpa_f()
            go = torch.randn_like(o)
            row["sdpa_fwdbwd_ms"] = bench_ms(lambda: torch.autograd.grad(sdpa_f(), (q, k, v), go))
        kern = lambda: attention_triton.attention_fwd_triton(lq, lk, v.detach(), temp, None, True)  # noqa: E731
        row["taumode_kernel_fwd_ms"] = bench_ms(kern)
        full = lambda: taumode_attention(q, k, v, lap, temperature=0.05, backend="triton")  # noqa: E731
        row["taumode_fwd_ms"] = bench_ms(full)
        row["taumode_fwdbwd_ms"] = bench_ms(lambda: torch.autograd.grad(full(), (q, k, v), go))
        row["fwd_speedup_vs_sdpa"] = row["sdpa_fwd_ms"] / row["taumode_fwd_ms"]
        row["fwdbwd_speedup_vs_sdpa"] = row["sdpa_fwdbwd_ms"] / row["taumode_fwdbwd_ms"]
        out["rows"].append(row)
    return out


def probe(name: str) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if name == "big-forward":
        b, h, t, d = 3, 16, 1 << 20, 64  # O: 3.2e9 elements
        lq, lk = torch.rand(b, h, t, device="cuda"), torch.rand(b, h, t, device="cuda")
        v = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)
        temp = torch.full((h,), 0.05, device="cuda")
        out, _ = attention_triton.attention_fwd_triton(lq, lk, v, temp, None, True)
        torch.cuda.synchronize()
        rows = torch.arange(0, 4096, 97, device="cuda")
        # the last batch lies past 2^31 elements of O: check its rows too
        err_last = sampled_error(lq[-1:, :, :4096], lk[-1:, :, :4096], v[-1:, :, :4096], temp, out[-1:, :, :4096],
                                 rows)
        return {"probe": name, "elements_O": out.numel(), "seconds": time.perf_counter() - t0,
                "rel_error_first_batch": sampled_error(lq[:, :, :4096], lk[:, :, :4096], v[:, :, :4096], temp,
                                                       out[:, :, :4096], rows),
                "rel_error_last_batch": err_last}
    if name == "many-heads":
        b, h, t, d = 16384, 4, 16, 64  # B·H = 65,536
        lq = torch.rand(b, h, t, device="cuda", requires_grad=True)
        lk = torch.rand(b, h, t, device="cuda", requires_grad=True)
        v = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out = taumode_attention_from_lambda(lq, lk, v, temperature=0.05, backend="triton")
        grads = torch.autograd.grad(out.float().sum(), (lq, lk, v))
        torch.cuda.synchronize()
        last = (slice(b - 1, b), slice(h - 1, h))
        ref = reference.attention_naive(lq[last].double(), lk[last].double(), v[last].double(),
                                        torch.full((1,), 0.05, device="cuda", dtype=torch.float64))
        return {"probe": name, "B_times_H": b * h, "seconds": time.perf_counter() - t0,
                "rel_error_last_head": float((out[last].double() - ref).norm() / ref.norm()),
                "grads_finite": all(bool(torch.isfinite(g).all()) for g in grads)}
    if name == "long-backward":
        b, h, t, d = 1, 8, 131072, 64
        lq = torch.rand(b, h, t, device="cuda", requires_grad=True)
        lk = torch.rand(b, h, t, device="cuda", requires_grad=True)
        v = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = taumode_attention_from_lambda(lq, lk, v, temperature=0.05, backend="triton")
        grads = torch.autograd.grad(out.float().sum(), (lq, lk, v))
        torch.cuda.synchronize()
        return {"probe": name, "T": t, "seconds": time.perf_counter() - t0,
                "peak_mib_above_inputs": (torch.cuda.max_memory_allocated() - base) / 2**20,
                "grads_finite": all(bool(torch.isfinite(g).all()) for g in grads)}
    raise SystemExit(f"unknown probe {name!r}; one of {PROBES}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    what, path = argv
    if not torch.cuda.is_available():
        result = {"skipped": "no CUDA"}
    elif what == "sweep":
        result = sweep()
    elif what == "sdpa":
        result = sdpa()
    else:
        try:
            result = probe(what)
        except Exception as e:  # noqa: BLE001  (a probe that fails is the finding: record it)
            result = {"probe": what, "error": f"{type(e).__name__}: {e}"[:1000]}
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
