"""What only a large GPU run would meet, checked here: 64-bit offsets (in the PTX), O(T) backward scratch,
launch limits (B·H past 65,535 programs on a grid axis), head sizes past the fused kernels' tiles."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import relative_error

from tauformer_kernels import reference, taumode_attention_from_lambda

triton = pytest.importorskip("triton")
from tauformer_kernels import attention_triton_backward as bwd  # noqa: E402
from tauformer_kernels import compile_check  # noqa: E402

HAS_CUDA_TOOLS = importlib.util.find_spec("triton.backends.nvidia") is not None

# one row per kernel of the compile check (which checks every row in CI; here a few, compiled for real)
PTX_ROWS = ["lambda_fwd F=64 fp16", "attn_fwd factorised causal D=64 bf16", "attention_bwd_preprocess bf16 D=64",
            "bwd main loop bf16 D=64", "taumode_lambda_bwd bf16 F=64"]


@pytest.mark.skipif(not HAS_CUDA_TOOLS, reason="needs triton's NVIDIA backend to compile for sm_90")
def test_batch_and_head_bases_are_64_bit_in_the_ptx():
    """b·stride_b and h·stride_h pass 2^31 elements on large tensors (O at B=3, H=16, T=1M, Dv=64): the
    compile check fails a kernel whose PTX takes a batch or head stride into a 32-bit multiply. The kernels
    compile for sm_90 in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for row in PTX_ROWS:
        proc = subprocess.run([sys.executable, "-m", "tauformer_kernels.compile_check", "--arch", "90", "--only", row],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and row in proc.stdout, proc.stdout + proc.stderr


def test_the_base_offset_check_catches_a_32_bit_product():
    args = {"X": "*fp32:16", "stride_x_b": "i32:16", "stride_x_t": "i32", "stride_x_d": "i32:1", "T": "i32"}
    load = "ld.param.b32 %r3, [f_param_1];\nld.param.b32 %r4, [f_param_2];\n"
    assert compile_check.narrow_base_products(
        args, load + "mul.wide.s32 %rd5, %r2, %r3;\nmul.lo.s32 %r6, %r4, %r2;") == []
    assert compile_check.narrow_base_products(args, load + "mul.lo.s32 %r5, %r2, %r3;") == [
        "stride_x_b: mul.lo.s32 %r5, %r2, %r3"]


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton backend's device (else the interpreter)


def _lambdas(b, h, hkv, t, dv, dtype=torch.float32):
    return (torch.rand(b, h, t, device=DEVICE), torch.rand(b, hkv, t, device=DEVICE),
            torch.randn(b, hkv, t, dv, device=DEVICE).to(dtype))


def test_backward_scratch_does_not_grow_with_the_length(monkeypatch):
    """The partial dλq buffer is slots × B × H × Tq floats with at most MAX_SLOTS slots, whatever Tk: the
    largest buffer the backward allocates, over the size of q's λ, is a constant."""
    shapes = []  # of the tensors allocated while recording
    real_empty, real_full = torch.empty, torch.full

    def record(factory):
        def make(shape, *args, **kwargs):
            t = factory(shape, *args, **kwargs)
            if shapes and shapes[0] == "on":
                shapes.append(tuple(t.shape))
            return t
        return make

    monkeypatch.setattr(torch, "empty", record(real_empty))  # the launcher's allocations (torch.empty / full)
    monkeypatch.setattr(torch, "full", record(real_full))
    monkeypatch.setattr(bwd, "partial_slots", lambda num_kb, b_hkv, device: min(num_kb, bwd.MAX_SLOTS))
    ratios = []
    for t in (64, 512, 1024):
        lq, lk, v = _lambdas(1, 2, 1, t, 16)
        temp = torch.full((2,), 0.3, device=DEVICE)
        out, lse = reference.attention_fwd_chunked(lq, lk, v, temp, None, True)
        dout = torch.randn_like(out)
        shapes[:] = ["on"]
        bwd.attention_bwd_triton(dout, lq, lk, v, out, lse, temp, None, True, poison=True)
        # scratch: everything but the output dV (Tk × Dv per kv head, the size of V)
        scratch = [torch.Size(sh).numel() for sh in shapes[1:] if sh != tuple(v.shape)]
        shapes.clear()
        ratios.append(max(scratch) / lq.numel())
    # below MAX_SLOTS key blocks the slots grow with the blocks; from there the ratio stays put
    assert ratios[-1] == ratios[-2] <= bwd.MAX_SLOTS + 3, ratios


def test_slots_fill_a_gpu_and_cap_the_scratch():
    cpu = torch.device("cpu")
    assert bwd.partial_slots(1000, 4, cpu) == 2 and bwd.partial_slots(1, 4, cpu) == 1


@pytest.mark.parametrize("cap", [7, 65535])
def test_batch_heads_past_the_grid_axis_limit(cap, monkeypatch):
    """Grid axes 1 and 2 take at most 65,535 programs: the forward spreads B·H over both (programs past B·H
    exit) and the other kernels put it on axis 0 (2^31 - 1). Here the cap is lowered to 7 so that B·H = 30
    crosses it as B·H = 65,536 would on a GPU (the interpreter runs ~1 ms per program: 65k of them is a
    GPU job, bench/run_gpu.sh); at the real cap every launch fits on the first axis pair."""
    from tauformer_kernels import attention_triton

    monkeypatch.setattr(attention_triton, "_MAX_GRID_YZ", cap)
    launches = []
    kernel = attention_triton.taumode_attention_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(attention_triton, "taumode_attention_fwd_kernel", Spy())
    b, h, t, dv = 10, 3, 5, 16
    lq, lk, v = _lambdas(b, h, 1, t, dv)
    slopes = torch.rand(b, h, device=DEVICE) * 0.1
    leaves = [x.clone().requires_grad_() for x in (lq, lk, v)]
    out = taumode_attention_from_lambda(*leaves, temperature=0.3, alibi_slopes=slopes, backend="triton")
    assert all(max(grid[1:]) <= cap for grid in launches) and (cap > 30 or launches[0][2] > 1), launches
    ref_leaves = [x.double().requires_grad_() for x in (lq, lk, v)]
    ref = reference.attention_naive(*ref_leaves, torch.full((h,), 0.3, dtype=torch.float64, device=DEVICE),
                                    slopes.double())
    assert relative_error(out, ref) < 1e-5
    dout = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(out, leaves, dout.float()), torch.autograd.grad(ref, ref_leaves, dout)):
        assert relative_error(g, r) < 1e-4


def test_grids_at_b_h_65536_fit_the_limits(monkeypatch):
    """At the real size (B·H = 65,540): every launch's grid fits CUDA's limits (axis 0 < 2^31, axes 1 and 2
    <= 65,535). The launches are recorded, not run (the interpreter would take minutes)."""
    from tauformer_kernels import attention_triton, lambda_triton, lambda_triton_backward

    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return lambda *args, **kwargs: None

    for module, name in ((attention_triton, "taumode_attention_fwd_kernel"),
                         (bwd, "attention_bwd_preprocess_kernel"), (bwd, "taumode_attention_bwd_kernel"),
                         (lambda_triton, "taumode_lambda_fwd_kernel"),
                         (lambda_triton_backward, "taumode_lambda_bwd_kernel")):
        monkeypatch.setattr(module, name, Recorder())
    b, h, t, dv = 16385, 4, 1, 16
    lq, lk, v = _lambdas(b, h, 2, t, dv)
    temp = torch.full((h,), 0.3, device=DEVICE)
    out, lse = attention_triton.attention_fwd_triton(lq, lk, v, temp, None, True)
    bwd.attention_bwd_triton(out, lq, lk, v, out, lse, temp, None, True)
    x = torch.randn(b, h, t, 16, device=DEVICE)
    lap = torch.eye(16, device=DEVICE)
    lambda_triton.lambda_fwd_triton(x, lap, torch.ones(h, device=DEVICE), 1e-6)
    lambda_triton_backward.lambda_bwd_triton(lq, x, lap, torch.ones(h, device=DEVICE), 1e-6)
    assert len(grids) >= 5
    for grid in grids:
        assert grid[0] < 2**31 and all(n <= 65535 for n in grid[1:]), grid
    forward = grids[0]
    assert forward[1] * (forward[2] // 1) >= b * h  # the forward's axes 1 and 2 cover every b·h


def test_head_size_600_forward_and_backward():
    """Dv = 600: the forward splits V's columns over programs; the backward past the fused tiles (512) runs
    the chunked PyTorch backward, the same gradients."""
    lq, lk, v = _lambdas(1, 2, 1, 40, 600)
    temp = torch.tensor([0.05, 0.5], device=DEVICE)
    leaves = [x.clone().requires_grad_() for x in (lq, lk, v, temp)]
    out = taumode_attention_from_lambda(*leaves[:3], temperature=leaves[3], backend="triton")
    ref_leaves = [x.double().requires_grad_() for x in (lq, lk, v, temp)]
    ref = reference.attention_naive(*ref_leaves)
    assert out.shape == (1, 2, 40, 600) and relative_error(out, ref) < 1e-5
    dout = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(out, leaves, dout.float()), torch.autograd.grad(ref, ref_leaves, dout)):
        assert relative_error(g, r) < 1e-4


def test_the_gpu_script_plans_inside_the_device_limit():
    """bench/run_gpu.sh --dry-run prints every step and a budget within the device tool's 600 s a command."""
    import pathlib

    script = pathlib.Path(__file__).resolve().parents[2] / "bench" / "run_gpu.sh"
    proc = subprocess.run(["bash", str(script), "--dry-run", "/tmp/unused"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    for step in ("tests", "bench", "sweep", "sdpa", "big-forward", "many-heads", "long-backward", "FLASH_ATTENTION"):
        assert step in proc.stdout, step
    parts = re.search(r"budget: (.*) = (\d+) s", proc.stdout)
    terms = [int(n) * int(m or 1) for m, n in re.findall(r"(?:(\d+) x )?(\d+)", parts.group(1))]
    assert sum(terms) == int(parts.group(2)) <= 570 and all(t > 0 for t in terms), parts.group(0)
