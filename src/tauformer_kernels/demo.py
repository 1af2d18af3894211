"""A one-minute tour: taumode attention on random heads, checked against the float64 oracle.

    python -m tauformer_kernels.demo [--T 1024] [--heads 8] [--kv-heads 2] [--dim 64]
"""
from __future__ import annotations

import argparse
import time

import torch

from . import chain_laplacian, reference, taumode_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=1024, help="sequence length")
    ap.add_argument("--heads", type=int, default=8, help="query heads H")
    ap.add_argument("--kv-heads", type=int, default=2, help="kv heads H_kv (GQA)")
    ap.add_argument("--dim", type=int, default=64, help="head dim F = Dv")
    ap.add_argument("--temperature", type=float, default=0.05, help="softmax temperature")
    args = ap.parse_args()

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(1, args.heads, args.T, args.dim, device=device)
    k = torch.randn(1, args.kv_heads, args.T, args.dim, device=device)
    v = torch.randn(1, args.kv_heads, args.T, args.dim, device=device)
    lap = chain_laplacian(args.dim).to(device)

    start = time.perf_counter()
    out = taumode_attention(q, k, v, lap, temperature=args.temperature)
    elapsed = time.perf_counter() - start

    group = args.heads // args.kv_heads
    tau = torch.ones(args.kv_heads, dtype=torch.float64, device=device)
    lq = reference.lambda_naive(q.double(), lap.double(), tau.repeat_interleave(group))
    lk = reference.lambda_naive(k.double(), lap.double(), tau)
    temps = torch.full((args.heads,), args.temperature, dtype=torch.float64, device=device)
    ref = reference.attention_naive(lq, lk, v.double(), temps)
    err = ((out.double() - ref).norm() / ref.norm()).item()

    kv_bytes = 2 * args.dim * 4
    tau_bytes = (args.dim + 1) * 4
    print(f"taumode attention B=1 H={args.heads} H_kv={args.kv_heads} T={args.T} F={args.dim} on {device}: "
          f"{elapsed * 1e3:.1f} ms, relative error vs float64 {err:.2e}")
    print(f"λ range: q [{lq.min():.3f}, {lq.max():.3f}], k [{lk.min():.3f}, {lk.max():.3f}]")
    print(f"cache bytes per token per kv head: (V, λk) {tau_bytes} vs (K, V) {kv_bytes} "
          f"({tau_bytes / kv_bytes:.3f} = (F+1)/(2F))")


if __name__ == "__main__":
    main()
