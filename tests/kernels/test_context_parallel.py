"""Context parallel taumode attention (tauformer_kernels.context_parallel) on 2 and 4 gloo ranks on CPU against
one process: outputs and every gradient (λq, λk, V, temperature, slopes; tau and the Laplacian from q, k),
float64 and fp32, dense and packed, Tq = Tk and decode-shaped (Tq < Tk), GQA, both layouts; and the bytes
the exchange sends against a K/V exchange."""

import os
import pathlib
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tauformer_kernels as tk
from tauformer_kernels.context_parallel import exchange_bytes

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

# name: (dtype, B, H, Hkv, Tq, Tk, Dv, slopes, cu_seqlens (packed) or None, layout)
CASES = {
    "f64-causal-gqa-slopes": (torch.float64, 2, 4, 2, 48, 48, 5, "h", None, "zigzag"),
    "f32-causal-gqa-slopes-bh": (torch.float32, 2, 4, 2, 48, 48, 5, "bh", None, "zigzag"),
    "f64-decode-shaped": (torch.float64, 1, 4, 1, 16, 48, 3, "h", None, "zigzag"),
    "f32-decode-shaped": (torch.float32, 2, 2, 2, 16, 48, 4, None, None, "zigzag"),
    "f64-contiguous": (torch.float64, 1, 2, 1, 48, 48, 3, "h", None, "contiguous"),
    "f64-packed": (torch.float64, 1, 4, 2, 48, 48, 5, "sh", [0, 5, 6, 17, 40, 48], "zigzag"),
    "f32-packed": (torch.float32, 1, 4, 2, 48, 48, 5, "h", [0, 13, 14, 30, 48], "zigzag"),
}
QKV_CASE = (torch.float64, 2, 4, 2, 48, 48, 8)  # dtype, B, H, Hkv, T, T, F = Dv: λ projected on each rank


def inputs(name: str) -> dict:
    """The whole problem of a case (every rank draws it alike and keeps its share)."""
    dtype, B, H, Hkv, Tq, Tk, Dv, slopes, cu, _ = CASES[name]
    g = torch.Generator().manual_seed(list(CASES).index(name))  # str hashes differ between processes
    packed = cu is not None
    lq = torch.rand((Tq, H) if packed else (B, H, Tq), generator=g, dtype=dtype)
    lk = torch.rand((Tk, Hkv) if packed else (B, Hkv, Tk), generator=g, dtype=dtype)
    v = torch.randn((Tk, Hkv, Dv) if packed else (B, Hkv, Tk, Dv), generator=g, dtype=dtype)
    temperature = 0.2 + 0.3 * torch.rand(H, generator=g, dtype=dtype)
    rows = {"h": (H,), "bh": (B, H), "sh": (len(cu or []) - 1, H)}
    s = None if slopes is None else 0.05 * torch.rand(rows[slopes], generator=g, dtype=torch.float32) + 0.01
    out_grad = torch.randn((Tq, H, Dv) if packed else (B, H, Tq, Dv), generator=g, dtype=dtype)
    return dict(lam_q=lq, lam_k=lk, v=v, temperature=temperature, alibi_slopes=s, out_grad=out_grad,
                cu_seqlens=None if cu is None else torch.tensor(cu, dtype=torch.int32))


def qkv_inputs() -> dict:
    dtype, B, H, Hkv, T, _, Fd = QKV_CASE
    g = torch.Generator().manual_seed(7)
    return dict(q=torch.randn(B, H, T, Fd, generator=g, dtype=dtype),
                k=torch.randn(B, Hkv, T, Fd, generator=g, dtype=dtype),
                v=torch.randn(B, Hkv, T, Fd, generator=g, dtype=dtype), laplacian=tk.chain_laplacian(Fd).to(dtype),
                tau=0.5 + torch.rand(Hkv, generator=g, dtype=dtype), temperature=0.3,
                out_grad=torch.randn(B, H, T, Fd, generator=g, dtype=dtype))


def leaves(d: dict, names) -> dict:
    return {n: d[n].clone().requires_grad_(True) for n in names if d.get(n) is not None}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    results = {}
    for name, case in CASES.items():
        layout, packed = case[-1], case[-2] is not None
        cp = tk.ContextParallel(group, layout)
        d = inputs(name)
        seq = 0 if packed else -1
        local = {n: cp.shard(d[n], seq if n != "v" else (0 if packed else 2)) for n in ("lam_q", "lam_k", "v")}
        local = leaves(local, local)
        shared = leaves(d, ("temperature", "alibi_slopes"))
        y = cp.attend(local["lam_q"], local["lam_k"], local["v"], cu_seqlens=d["cu_seqlens"], **shared)
        (y * cp.shard(d["out_grad"], 0 if packed else 2)).sum().backward()
        results[name] = {"out": y.detach(), **{n: t.grad for n, t in {**local, **shared}.items()}}
    d = qkv_inputs()
    cp = tk.ContextParallel(group)
    local = leaves({n: cp.shard(d[n], 2) for n in ("q", "k", "v")}, ("q", "k", "v"))
    shared = leaves(d, ("tau", "laplacian"))
    y = tk.context_parallel_taumode_attention(local["q"], local["k"], local["v"], shared["laplacian"], group=group,
                                              tau=shared["tau"], temperature=d["temperature"])
    (y * cp.shard(d["out_grad"], 2)).sum().backward()
    results["qkv"] = {"out": y.detach(), **{n: t.grad for n, t in {**local, **shared}.items()}}
    torch.save(results, pathlib.Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 4], ids=["2-ranks", "4-ranks"])
def ranks(request, tmp_path_factory):
    """Every case run once on `world` spawned ranks; (world, [each rank's results])."""
    world, out = request.param, tmp_path_factory.mktemp(f"cp{request.param}")
    mp.spawn(_worker, args=(world, free_port(), str(out)), nprocs=world)
    return world, [torch.load(out / f"rank{r}.pt") for r in range(world)]


def unshard(shares: list[torch.Tensor], layout: str, dim: int) -> torch.Tensor:
    """The ranks' shares back in global order (ContextParallel.gather without a group)."""
    world = len(shares)
    chunks = 2 * world if layout == "zigzag" else world
    pieces = {}
    for r, share in enumerate(shares):
        ids = (r, chunks - 1 - r) if layout == "zigzag" else (r,)
        pieces.update(zip(ids, share.chunk(len(ids), dim)))
    return torch.cat([pieces[c] for c in range(chunks)], dim)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def tolerance(dtype) -> float:
    # fp32: λ's rounding (6e-8) over temperatures >= 0.2 stays below the 1e-5 of docs/math.md §Precision
    return 1e-12 if dtype == torch.float64 else 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_context_parallel_attention_equals_one_process(ranks, name):
    world, results = ranks
    layout, packed = CASES[name][-1], CASES[name][-2] is not None
    d = inputs(name)
    full = leaves(d, ("lam_q", "lam_k", "v", "temperature", "alibi_slopes"))
    kw = {} if not packed else dict(cu_seqlens_q=d["cu_seqlens"], cu_seqlens_k=d["cu_seqlens"])
    y = tk.taumode_attention_from_lambda(full["lam_q"], full["lam_k"], full["v"], temperature=full["temperature"],
                                         alibi_slopes=full.get("alibi_slopes"), is_causal=True, **kw)
    (y * d["out_grad"]).sum().backward()
    tol = tolerance(CASES[name][0])
    seq = {"out": 0 if packed else 2, "lam_q": 0 if packed else 2, "lam_k": 0 if packed else 2, "v": 0 if packed else 2}
    got = {n: unshard([r[name][n] for r in results], layout, dim) for n, dim in seq.items()}
    assert rel(got["out"], y.detach()) < tol
    for n in ("lam_q", "lam_k", "v"):
        assert rel(got[n], full[n].grad) < tol, n
    # shared parameters: each rank's share, summed over ranks; the slopes are fp32 whatever the case's dtype
    assert rel(sum(r[name]["temperature"] for r in results), full["temperature"].grad) < tol * 10
    if "alibi_slopes" in full:
        assert rel(sum(r[name]["alibi_slopes"] for r in results), full["alibi_slopes"].grad) < tolerance(torch.float32)


def test_context_parallel_from_q_k_v_equals_one_process(ranks):
    """λ projected on each rank: tau and the Laplacian get each rank's share of their gradients."""
    world, results = ranks
    d = qkv_inputs()
    full = leaves(d, ("q", "k", "v", "tau", "laplacian"))
    y = tk.taumode_attention(full["q"], full["k"], full["v"], full["laplacian"], tau=full["tau"],
                             temperature=d["temperature"])
    (y * d["out_grad"]).sum().backward()
    assert rel(unshard([r["qkv"]["out"] for r in results], "zigzag", 2), y.detach()) < 1e-12
    for n in ("q", "k", "v"):
        assert rel(unshard([r["qkv"][n] for r in results], "zigzag", 2), full[n].grad) < 1e-12, n
    for n in ("tau", "laplacian"):
        assert rel(sum(r["qkv"][n] for r in results), full[n].grad) < 1e-10, n


def test_exchange_bytes_at_the_30m_shape():
    """30m preset: 6 kv heads of F = Dv = 64, context 1024, batch 32, fp32, 2 ranks: λk and V are 65/128 of
    K and V (50.8 %): 51.1 MB instead of 100.7 MB per rank, layer and step."""
    got = exchange_bytes(batch=32, kv_heads=6, seq_len=1024, head_dim=64, v_dim=64, world=2)
    assert got["ratio"] == pytest.approx(65 / 128)
    tokens = 32 * 6 * 512  # the other rank's half of the window, per direction
    assert got["lambda_v"] == 2 * tokens * 65 * 4 == 51_118_080
    assert got["k_v"] == 2 * tokens * 128 * 4 == 100_663_296
    bf16 = exchange_bytes(batch=32, kv_heads=6, seq_len=1024, head_dim=64, v_dim=64, world=2, v_itemsize=2)
    assert bf16["ratio"] == pytest.approx((64 + 2) / 128)  # λk stays fp32 beside a bf16 V


def test_bad_split_is_refused():
    class OneRank:  # the shape checks run before any collective
        pass
    with pytest.raises(ValueError, match="layout"):
        tk.ContextParallel(OneRank(), "ring")
