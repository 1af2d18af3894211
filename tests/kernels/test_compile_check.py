"""The compile check's rows are what the launchers launch: same constexprs, warps and stages (one source)."""
import importlib
import inspect

import pytest
import torch

triton = pytest.importorskip("triton")
from tauformer_kernels import (  # noqa: E402
    attention_triton,
    attention_triton_backward,
    compile_check,
    lambda_triton,
    lambda_triton_backward,
)

NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
KERNEL_MODULES = ("taumode_attention", "taumode_attention_backward", "taumode_lambda", "taumode_lambda_backward")


@pytest.fixture(scope="module")
def cases():
    return {case.name: case for case in compile_check.kernel_cases()}


def test_rows_have_unique_names_and_cover_every_kernel(cases):
    assert len(cases) == len(compile_check.kernel_cases())
    compiled = {case.kernel for case in cases.values()}
    for module in KERNEL_MODULES:
        mod = importlib.import_module(f"tauformer_kernels.kernels.{module}")
        kernels = [obj for name, obj in inspect.getmembers(mod) if name.endswith("_kernel")]
        assert kernels and all(k in compiled for k in kernels), module


class Recorder:
    """Stands in for a @triton.jit kernel: records each launch's keyword arguments, runs nothing."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(kwargs)


@pytest.fixture
def record(monkeypatch):
    """Launch with the GPU configs (TAUFORMER_GPU_CONFIGS=1) into recorders, one per kernel name."""
    monkeypatch.setenv("TAUFORMER_GPU_CONFIGS", "1")
    recorders = {}
    for module, name in ((attention_triton, "taumode_attention_fwd_kernel"),
                         (attention_triton_backward, "attention_bwd_preprocess_kernel"),
                         (attention_triton_backward, "taumode_attention_bwd_kernel"),
                         (lambda_triton, "taumode_lambda_fwd_kernel"),
                         (lambda_triton_backward, "taumode_lambda_bwd_kernel")):
        recorders[name] = Recorder()
        monkeypatch.setattr(module, name, recorders[name])
    return recorders


def _lambdas(h, hkv, t, dv, dtype):
    return torch.rand(1, h, t), torch.rand(1, hkv, t), torch.randn(1, hkv, t, dv).to(dtype)


@pytest.mark.parametrize("rows, dtype, dv, alibi", [
    (("attn_fwd factorised causal D=64 bf16", "attn_fwd general causal D=64 bf16"), torch.bfloat16, 64, False),
    (("attn_fwd factorised causal alibi D=64 fp16", "attn_fwd general causal alibi D=64 fp16"), torch.float16, 64,
     True),
    (("attn_fwd factorised causal D=384 bf16 (3x128 cols)", "attn_fwd general causal D=384 bf16 (3x128 cols)"),
     torch.bfloat16, 384, False),
])
def test_forward_rows_are_the_launches(cases, record, rows, dtype, dv, alibi):
    lq, lk, v = _lambdas(2, 1, 70, dv, dtype)
    slopes = torch.rand(1, 2) if alibi else None
    attention_triton.attention_fwd_triton(lq, lk, v, torch.ones(2), slopes, True)
    assert record["taumode_attention_fwd_kernel"].launches == [cases[r].launches[90].options() for r in rows]


def test_packed_forward_rows_are_the_launches(cases, record):
    from tauformer_kernels.varlen import Seqs

    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    lq, lk, v = _lambdas(2, 1, 70, 64, torch.bfloat16)
    attention_triton.attention_fwd_triton(lq, lk, v, torch.ones(2), None, True, Seqs(cu, cu, 40, 40))
    rows = ("attn_fwd factorised causal D=64 bf16 varlen", "attn_fwd general causal D=64 bf16 varlen",
            "attn_fwd overflow causal D=64 bf16 varlen")
    assert record["taumode_attention_fwd_kernel"].launches == [cases[r].launches[90].options() for r in rows]


def test_paged_forward_rows_are_the_launches(cases, record):
    from tauformer_kernels import paged

    cache = torch.randn(6, 1, 16, 2 + 64).to(torch.bfloat16)
    table = torch.arange(6, dtype=torch.int32).view(2, 3)
    cu_q = torch.tensor([0, 1, 30], dtype=torch.int32)
    paged.paged_fwd_triton(torch.rand(30, 2), cache, table, torch.tensor([20, 40], dtype=torch.int32), cu_q,
                           torch.ones(2), None, 2, 29, 40)
    table_args = ("BLOCK_TABLE", "SEQ_LENS", "stride_bt", "N_PAGES")  # the table itself, not a config
    launches = [{k: v for k, v in launch.items() if k not in table_args}
                for launch in record["taumode_attention_fwd_kernel"].launches]
    rows = ("attn_fwd factorised causal D=64 bf16 paged", "attn_fwd general causal D=64 bf16 paged",
            "attn_fwd overflow causal D=64 bf16 paged")
    assert launches == [cases[r].launches[90].options() for r in rows]


@pytest.mark.parametrize("row, dtype, dv, alibi, group, t", [
    ("taumode_attention_bwd bf16 D=64 causal=True alibi=False G=1", torch.bfloat16, 64, False, 1, 128),
    ("taumode_attention_bwd bf16 D=64 causal=True alibi=True G=4", torch.bfloat16, 64, True, 4, 97),
    ("taumode_attention_bwd fp32 D=256 causal=True alibi=True G=2", torch.float32, 256, True, 2, 97),  # split
])
def test_backward_rows_are_the_launches(cases, record, row, dtype, dv, alibi, group, t):
    lq, lk, v = _lambdas(group, 1, t, dv, dtype)
    slopes = torch.rand(1, group) if alibi else None
    temp = torch.ones(group)
    out = torch.randn(1, group, t, dv).to(dtype)
    attention_triton_backward.attention_bwd_triton(out, lq, lk, v, out, torch.zeros(1, group, t), temp, slopes, True)
    split = [name for name in cases if name.startswith(row + " ")]  # the "dv" and "dlambda" rows
    want = [cases[name].launches[90].options() for name in (split or [row])]
    launches = record["taumode_attention_bwd_kernel"].launches
    assert launches[:len(want)] == want and len(launches) % len(want) == 0
    if dv == 64 and group == 1:
        preprocess = cases[f"attention_bwd_preprocess {NAMES[dtype]} D=64"]
        assert record["attention_bwd_preprocess_kernel"].launches == [preprocess.launches[90].options()]


@pytest.mark.parametrize("dtype, f", [(torch.float16, 64), (torch.float32, 64), (torch.bfloat16, 384)])
def test_lambda_forward_rows_are_the_launches(cases, record, dtype, f):
    x = torch.randn(1, 2, 5, f).to(dtype)
    lambda_triton.lambda_fwd_triton(x, torch.eye(f), torch.ones(2), 1e-6)
    name = f"lambda_fwd F={f} {NAMES[dtype]}"
    assert record["taumode_lambda_fwd_kernel"].launches == [cases[name].launches[90].options()]


@pytest.mark.parametrize("dtype, f", [(torch.bfloat16, 64), (torch.float32, 256)])
def test_lambda_backward_rows_are_the_launches(cases, record, dtype, f):
    x = torch.randn(1, 2, 5, f).to(dtype)
    lambda_triton_backward.lambda_bwd_triton(torch.randn(1, 2, 5), x, torch.eye(f), torch.ones(2), 1e-6)
    name = f"taumode_lambda_bwd {NAMES[dtype]} F={f}"
    assert record["taumode_lambda_bwd_kernel"].launches == [cases[name].launches[90].options()]


def test_every_rule_says_why():
    for rules in (attention_triton._FORWARD_RULES, attention_triton_backward._RULES,
                  attention_triton._OVERFLOW_RULES, attention_triton_backward._VARLEN_RULES,
                  attention_triton_backward._OVERFLOW_RULES):
        assert all(rule.why and rule.settings for rule in rules)


def test_packed_backward_rows_are_the_launches(cases, record):
    from tauformer_kernels.varlen import Seqs

    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    lq, lk, v = _lambdas(1, 1, 70, 64, torch.bfloat16)
    out = torch.randn(1, 1, 70, 64).to(torch.bfloat16)
    attention_triton_backward.attention_bwd_triton(out, lq, lk, v, out, torch.zeros(1, 1, 70), torch.ones(1), None,
                                                   True, Seqs(cu, cu, 40, 40))
    row = "taumode_attention_bwd varlen bf16 D=64 causal=True alibi=False G=1"
    want = [cases[name].launches[90].options() for name in (row, row + " overflow")]
    assert record["taumode_attention_bwd_kernel"].launches == want
    preprocess = cases["attention_bwd_preprocess varlen bf16 D=64"].launches[90].options()
    assert record["attention_bwd_preprocess_kernel"].launches == [preprocess]
