"""FSDP2 training under torchrun (2 CPU ranks, gloo): the sharded run trains like one process, and its
checkpoint (full tensors gathered to rank 0) resumes exactly in one process."""

import json
import shutil

import pytest
import torch
from helpers import run_trainer
from safetensors.torch import load_file

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

STEPS = 20
# the learned Laplacian's edge weights (the root unit's), learned tau and temperatures are all sharded
MODEL = ["--learn-laplacian", "--learn-tau"]


def run(args, out, corpus, cache, ranks=1):
    return run_trainer(["--preset", "micro", "--data", str(corpus), "--data-cache", str(cache), "--out", str(out),
                        "--batch-size", "2", "--max-steps", str(STEPS), "--eval-every", "1", "--checkpoint-every",
                        str(STEPS), "--seed", "5", "--threads", "1", "--no-progress", "--device", "cpu"]
                       + MODEL + args, ranks=ranks)


def losses(out):
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in rows]


def assert_same_losses(a, b, rel):
    assert [r[0] for r in a] == [r[0] for r in b] == list(range(STEPS + 1))
    for x, y in zip(a, b):
        assert (x[1] is None and y[1] is None) or x[1] == pytest.approx(y[1], rel=rel), (x, y)
        assert x[2] == pytest.approx(y[2], rel=rel), (x, y)


def assert_bitwise(a, b, where=""):
    """Nested dicts / lists of tensors and values equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_bitwise(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_fsdp_trains_like_one_process_and_resumes_in_one(tmp_path, corpus):
    cache = tmp_path / "cache"
    run(["--grad-accum", "2"], tmp_path / "one", corpus, cache)
    fsdp = run(["--fsdp"], tmp_path / "fsdp", corpus, cache, ranks=2)
    assert "2 ranks (FSDP)" in fsdp.stdout
    # fp32 noise: the sharded run sums the two ranks' gradients in another order
    assert_same_losses(losses(tmp_path / "fsdp"), losses(tmp_path / "one"), 1e-5)
    one = load_file(str(tmp_path / "one" / "checkpoint" / "model.safetensors"))
    sharded = load_file(str(tmp_path / "fsdp" / "checkpoint" / "model.safetensors"))
    assert one.keys() == sharded.keys() and "edge_log_scale" in one
    for name in one:
        assert torch.allclose(one[name], sharded[name], rtol=1e-5, atol=1e-6), name

    # stopped at step 10 under FSDP; resumed in one process and stopped at once, its checkpoint is the same
    # bits (weights and optimizer state: gathered whole, loaded whole); continued, it ends like the others
    run(["--fsdp", "--stop-at", "10"], tmp_path / "stop", corpus, cache, ranks=2)
    shutil.copytree(tmp_path / "stop", tmp_path / "switch", symlinks=True)
    run(["--resume", "--grad-accum", "2", "--stop-at", "10"], tmp_path / "switch", corpus, cache)
    before, after = (tmp_path / "stop" / "checkpoint").resolve(), (tmp_path / "switch" / "checkpoint").resolve()
    assert before.name != after.name  # a new save, not the copied folder
    assert_bitwise(load_file(str(before / "model.safetensors")), load_file(str(after / "model.safetensors")))
    saved = [torch.load(p / "state.pt", weights_only=True) for p in (before, after)]
    assert_bitwise(saved[0]["optimizer"], saved[1]["optimizer"], "optimizer")
    assert isinstance(saved[0]["optimizer"]["param_groups"][0]["params"][0], str)  # keyed by name
    run(["--resume", "--grad-accum", "2"], tmp_path / "switch", corpus, cache)
    assert_same_losses(losses(tmp_path / "switch"), losses(tmp_path / "fsdp"), 1e-5)


@pytest.mark.slow  # 1.5-3 min on 2 busy CPU cores: inductor compiles the sharded model on each rank
def test_fsdp_with_a_compiled_model_trains_like_eager(tmp_path, corpus):
    cache, short = tmp_path / "cache", ["--max-steps", "6"]
    run(short + ["--fsdp"], tmp_path / "eager", corpus, cache, ranks=2)
    run(short + ["--fsdp", "--compile"], tmp_path / "compiled", corpus, cache, ranks=2)
    for a, b in zip(losses(tmp_path / "eager"), losses(tmp_path / "compiled"), strict=True):
        assert a[0] == b[0] and (a[1] is None or a[1] == pytest.approx(b[1], rel=1e-4))
        assert a[2] == pytest.approx(b[2], rel=1e-4)
