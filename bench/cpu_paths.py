"""The CPU paths of issue #32 against SDPA's dot product, interleaved in one run (medians of alternating calls):

    OMP_NUM_THREADS=2 python bench/cpu_paths.py [--quick] [--out bench/results/cpu-fast-paths.md]

Rows: the causal forward (B 1, H 8, F = Dv = 64, fp32, λ projection included, no gradient) at T = 1,024, 4,096
and 16,384; a decode step over a plain (V, λk) cache of 1k, 16k and 64k tokens (λ of the new query and key,
the cache write, the attention) against SDPA over a (K, V) cache; the 30m preset's attention in a prefill of
1,152 tokens (6 layers of B 1, H 6, F 64); and a vLLM decode step's packed call (15 sequences of 1 query and
400–700 keys, H 4, Dv 32, ALiBi; no peer: vLLM's own attention is measured end to end by
bench/vllm_serving.py); and a training step of the tiny preset (B 32, T 128, AdamW, its taumode model with
learned recency against its dot-product model), as tokens per second. `ours` is backend="auto" (numba's
compiled paths where the package is installed). The machine's load (os.getloadavg) is printed before and after.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

import tauformer_kernels as tk
from tauformer_kernels import backends

TEMPERATURE, TAU = 0.05, 1.0


def _median_ms(fns: dict, budget_s: float, min_rounds: int = 3, max_rounds: int = 200) -> dict:
    """Median milliseconds of each function, the functions called in turn (one call each per round)."""
    times = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    start = time.perf_counter()
    while True:
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        rounds = len(times[next(iter(fns))])
        if rounds >= max_rounds or (rounds >= min_rounds and time.perf_counter() - start > budget_s):
            break
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def forward(t: int, heads: int = 8, f: int = 64, budget_s: float = 10.0):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, t, f, generator=g) for _ in range(3))
    lap = tk.chain_laplacian(f)

    def ours():
        with torch.no_grad():
            return tk.taumode_attention(q, k, v, lap, tau=TAU, temperature=TEMPERATURE)

    def sdpa():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return _median_ms({"ours": ours, "sdpa": sdpa}, budget_s)


def prefill_30m(t: int = 1152, layers: int = 6, budget_s: float = 10.0):
    ms = forward(t, heads=6, f=64, budget_s=budget_s)  # one layer: the six layers make the same call
    return {name: layers * value for name, value in ms.items()}


def decode(n: int, heads: int = 8, f: int = 64, budget_s: float = 5.0):
    g = torch.Generator().manual_seed(1)
    q_new, k_new, v_new = (torch.randn(1, heads, 1, f, generator=g) for _ in range(3))
    v_cache, k_cache = torch.randn(1, heads, n, f, generator=g), torch.randn(1, heads, n, f, generator=g)
    lap = tk.chain_laplacian(f)
    lk_cache = tk.taumode_lambda(torch.randn(1, heads, n, f, generator=g), lap, tau=TAU)

    def ours():
        with torch.no_grad():
            lam = tk.taumode_lambda(torch.cat([k_new, q_new], dim=2), lap, tau=TAU)
            lk_cache[:, :, n - 1:] = lam[:, :, :1]
            v_cache[:, :, n - 1:] = v_new
            return tk.taumode_attention_from_lambda(lam[:, :, 1:], lk_cache, v_cache, temperature=TEMPERATURE)

    def sdpa():
        with torch.no_grad():
            k_cache[:, :, n - 1:] = k_new
            v_cache[:, :, n - 1:] = v_new
            return F.scaled_dot_product_attention(q_new, k_cache, v_cache)

    return _median_ms({"ours": ours, "sdpa": sdpa}, budget_s)


def vllm_step(budget_s: float = 5.0):
    g = torch.Generator().manual_seed(0)
    s, h, dv = 15, 4, 32
    lengths = torch.randint(400, 700, (s,), generator=g)
    cu_k = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
    cu_q = torch.arange(s + 1, dtype=torch.int32)
    total = int(cu_k[-1])
    lq, lk, v = torch.rand(s, h, generator=g), torch.rand(total, h, generator=g), torch.randn(total, h, dv, generator=g)
    slopes = 0.01 * torch.rand(h, generator=g)

    def ours():
        with torch.no_grad():
            return tk.taumode_attention_from_lambda(lq, lk, v, temperature=TEMPERATURE, alibi_slopes=slopes,
                                                    cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=1,
                                                    max_seqlen_k=int(lengths.max()))

    return _median_ms({"ours": ours}, budget_s)


def training_step(budget_s: float = 20.0):
    """Milliseconds per optimizer step of the tiny preset's two models on one fixed batch, in turn."""
    from tauformer_model.config import PRESETS, TauGPTConfig
    from tauformer_model.model import TauGPT

    preset = PRESETS["tiny"]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (32, 128), generator=g), torch.randint(0, 256, (32, 128), generator=g)
    steps = {}
    for name, attention, extra in (("ours", "taumode", dict(preset["model_taumode"], recency="learned")),
                                   ("sdpa", "dot", dict(recency="none"))):
        torch.manual_seed(0)
        model = TauGPT(TauGPTConfig(vocab_size=256, attention=attention, **dict(preset["model"], **extra)))
        opt = torch.optim.AdamW(model.parameters(), lr=preset["train"]["lr"])

        def step(model=model, opt=opt):
            model(x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[name] = step
    return _median_ms(steps, budget_s, min_rounds=5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short budgets (a smoke run)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    scale = 0.1 if args.quick else 1.0
    load_before = os.getloadavg()
    rows = []
    for t in (1024, 4096, 16384):
        ms = forward(t, budget_s=scale * (10 if t < 16384 else 30))
        via = backends.resolve("attention", "auto", torch.device("cpu"), torch.float32, t, needs_grad=False)
        rows.append((f"forward T={t:,} (auto → {via})", ms))
    for n in (1024, 16384, 65536):
        rows.append((f"decode, plain cache of {n:,}", decode(n, budget_s=scale * 5)))
    rows.append(("30m-shape prefill, 1,152 tokens, 6 layers (attention only)", prefill_30m(budget_s=scale * 10)))
    rows.append(("vLLM decode step, one layer's packed call (15 × 1 query, 400–700 keys)",
                 vllm_step(budget_s=scale * 5)))
    step = training_step(budget_s=scale * 30)
    rows.append(("tiny-preset training step (B 32 × T 128, taumode 8×16 + recency vs dot 4×32)", step))
    load_after = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"commit {commit} (+ working tree), torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}", "",
             "| case | ours ms | SDPA ms | SDPA / ours |", "|---|---|---|---|"]
    for name, ms in rows:
        sdpa = ms.get("sdpa", math.nan)
        lines.append(f"| {name} | {ms['ours']:.3g} | {sdpa:.3g} | {sdpa / ms['ours']:.2f}× |")
    tokens = 32 * 128
    lines += ["", f"Training tokens/s (tiny preset step): ours {tokens / step['ours'] * 1e3:,.0f}, "
              f"dot {tokens / step['sdpa'] * 1e3:,.0f}."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
