"""Group 5: a batch of sequences of mixed lengths, packed (cu_seqlens) vs padded to the longest, forward +
backward, side by side on the same tokens. Tokens/s counts the real tokens only (padding is waste).

Each benchmark first checks that the packed and padded results agree on the real rows (and the packed
one against the float64 oracle on one sequence); only then is it timed.
"""
import benchlib
import pytest
import torch

from tauformer_kernels import reference, taumode_attention_from_lambda

# mixed lengths: a long document beside short ones, as packing meets them
LENGTHS = {True: (97, 5, 33, 1, 64), False: (2048, 96, 700, 17, 1024, 300, 5, 1500)}


def _backend(device: str) -> str:
    return "triton" if device == "cuda" else "loglinear"


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_varlen_forward_backward(benchmark, bench, layout):
    s = bench.settings
    bench.gate("varlen-fwdbwd", f"ours-{layout}", 0, 64, benchlib.unavailable_reason(f"ours-{_backend(s.device)}",
                                                                                     s.device))
    lengths = LENGTHS[s.quick]
    h, hkv, dv, device = s.heads, max(1, s.heads // 2), 64, s.device
    gen = torch.Generator().manual_seed(0)
    total = sum(lengths)
    lq, lk = torch.rand(total, h, generator=gen), torch.rand(total, hkv, generator=gen)
    v = torch.randn(total, hkv, dv, generator=gen)
    dout = torch.randn(total, h, dv, generator=gen)
    cu = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32)
    lq, lk, v, dout, cu = (t.to(device) for t in (lq, lk, v, dout, cu))
    v, dout = v.to(s.dtype), dout.to(s.dtype)
    temp = torch.full((h,), benchlib.TEMPERATURE, device=device)
    backend = _backend(device)
    benchmark.group = f"varlen-fwdbwd B{len(lengths)} H{h} Dv{dv} {str(s.dtype)[6:]} {device} lengths {lengths}"
    benchmark.extra_info.update(kind="varlen-fwdbwd", contender=f"ours-{layout}", backend=backend,
                                lengths=list(lengths), shape=[len(lengths), h, total, dv],
                                dtype=str(s.dtype).removeprefix("torch."), device=device, tokens=total,
                                padded_tokens=len(lengths) * max(lengths))

    # the padded layout: (B, H, Tmax) right-padded, causal (a padded key is seen only by padded queries)
    tmax, b = max(lengths), len(lengths)
    rows = torch.cat([torch.arange(n) + i * tmax for i, n in enumerate(lengths)]).to(device)

    def padded(t):
        out = torch.zeros(b * tmax, *t.shape[1:], dtype=t.dtype, device=device)
        out[rows] = t
        return out.view(b, tmax, *t.shape[1:]).movedim(1, 2).contiguous()

    if layout == "packed":
        leaves = [t.detach().clone().requires_grad_() for t in (lq, lk, v)]
        upstream = dout

        def attend(a, c, d):
            return taumode_attention_from_lambda(a, c, d, temperature=temp, backend=backend, cu_seqlens_q=cu,
                                                 cu_seqlens_k=cu, max_seqlen_q=tmax, max_seqlen_k=tmax)
    else:
        leaves = [padded(t).requires_grad_() for t in (lq, lk, v)]
        upstream = padded(dout)  # zero on the padding rows: their outputs feed nothing

        def attend(a, c, d):
            return taumode_attention_from_lambda(a, c, d, temperature=temp, backend=backend)

    def forward_backward():
        out = attend(*leaves)
        return out, torch.autograd.grad(out, leaves, upstream)

    start = benchlib.time.perf_counter()
    out, grads = forward_backward()
    benchlib.synchronize(device)
    first_call_s = benchlib.time.perf_counter() - start
    real = out if layout == "packed" else out.movedim(2, 1).reshape(b * tmax, h, dv)[rows]
    n0 = lengths[0]
    ref = reference.attention_naive(lq[:n0].t()[None].double(), lk[:n0].t()[None].double(),
                                    v[:n0].movedim(0, 1)[None].double(), temp.double())[0].movedim(1, 0)
    err = benchlib.relative_error(real[:n0], ref)
    benchmark.extra_info.update(rel_error=err)
    assert torch.isfinite(real).all() and all(torch.isfinite(g).all() for g in grads)
    assert err <= benchlib.tolerance(benchlib.FWD_TOL[s.dtype], 0.0), f"{layout}: relative error {err:.3g}"
    del out, grads
    bench.warm_and_time(benchmark, "varlen-fwdbwd", f"ours-{layout}", total, dv, forward_backward, first_call_s)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median:
        benchmark.extra_info["tokens_per_s"] = total / stats.stats.median
