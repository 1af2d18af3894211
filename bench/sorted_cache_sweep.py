"""Sorted-cache decode vs the plain (V, λk) cache, interleaved, for choosing SortedCache's structure.

    python bench/sorted_cache_sweep.py                       # the defaults at N = 65536
    python bench/sorted_cache_sweep.py 32,16,3 128,8,3 512,16,2 --context 131072

A step is what a decoding model pays per layer: the λ projection of the new key and query, then either
append + attend on a SortedCache (one per BLOCK,FANOUT,LEVELS given) or a write into a preallocated plain
cache + `taumode_attention_from_lambda` over all N keys (backend "auto"). The contenders take turns in
chunks (256 sorted steps, 8 plain steps) over one period of the largest structure, so that a noisy
neighbour or a frequency change hits them all alike; each round starts from a copy of the same
prefilled caches. Prints ms per step and plain / sorted per round. The pytest-benchmark group `decode`
(test_bench_decode.py) is the record; this is the tool for comparing structures side by side.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import benchlib  # noqa: E402

from tauformer_kernels import sorted_cache  # noqa: E402

SORTED_CHUNK, PLAIN_CHUNK = 256, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("structures", nargs="*",
                        default=[f"{sorted_cache.BLOCK},{sorted_cache.FANOUT},{sorted_cache.LEVELS}"],
                        help="BLOCK,FANOUT,LEVELS per sorted cache")
    parser.add_argument("--context", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    structures = {s: dict(zip(("block", "fanout", "levels"), map(int, s.split(",")))) for s in args.structures}
    period = max(c["block"] * c["fanout"] ** (c["levels"] - 1) for c in structures.values())
    steps = -(-period // SORTED_CHUNK) * SORTED_CHUNK
    b, h, f, n = 1, args.heads, args.head_dim, args.context
    gen = torch.Generator().manual_seed(0)
    laplacian = benchlib.chain_laplacian(f).float()
    tau_heads = torch.full((h,), benchlib.TAU)
    temperature = torch.full((h,), benchlib.TEMPERATURE)
    k = torch.randn(b, h, n, f, generator=gen)
    v = torch.randn(b, h, n, f, generator=gen)
    q = torch.randn(b, h, steps, f, generator=gen)
    lam_k = benchlib.lambda_torch(k, laplacian, tau_heads)
    prefilled = {}
    for name, structure in structures.items():
        cache = sorted_cache.SortedCache(temperature, h, capacity=n, **structure)
        cache.append(lam_k[..., :n - steps], v[..., :n - steps, :])
        prefilled[name] = cache
    plain_lk, plain_v = lam_k.clone(), v.clone()

    def project(i, j):
        x = torch.cat([k[:, :, i:i + 1], q[:, :, j:j + 1]], dim=2)
        return benchlib.taumode_lambda(x, laplacian, tau=benchlib.TAU, eps=benchlib.EPS)

    def plain_step(i, j):
        lam = project(i, j)
        plain_lk[:, :, n - 1:] = lam[:, :, :1]
        plain_v[:, :, n - 1:] = v[:, :, i:i + 1]
        return benchlib.taumode_attention_from_lambda(lam[:, :, 1:], plain_lk, plain_v,
                                                      temperature=benchlib.TEMPERATURE, is_causal=True)

    with torch.no_grad():
        for _ in range(args.rounds):
            live = {name: copy.deepcopy(cache) for name, cache in prefilled.items()}
            seconds = dict.fromkeys([*live, "plain"], 0.0)
            counts = dict.fromkeys(seconds, 0)
            for turn, start in enumerate(range(0, steps, SORTED_CHUNK)):
                order = [*live, "plain"][::(-1) ** turn]
                for name in order:
                    chunk = PLAIN_CHUNK if name == "plain" else SORTED_CHUNK
                    t0 = time.perf_counter()
                    for j in range(start, start + chunk):
                        i = n - steps + j
                        if name == "plain":
                            plain_step(i, j)
                        else:
                            lam = project(i, j)
                            live[name].append(lam[:, :, :1], v[:, :, i:i + 1])
                            live[name].attend(lam[:, :, 1:], temperature)
                    seconds[name] += time.perf_counter() - t0
                    counts[name] += chunk
            ms = {name: 1e3 * seconds[name] / counts[name] for name in seconds}
            row = ", ".join(f"{name} {ms[name]:.3f} ms ({ms['plain'] / ms[name]:.1f}×)" for name in live)
            print(f"N={n}: plain {ms['plain']:.2f} ms; sorted {row}", flush=True)


if __name__ == "__main__":
    main()
