"""Data parallel training under torchrun (2 CPU ranks, gloo) against one process with --grad-accum 2, and context
parallel training (each window split over the ranks) against one process."""

import json

import pytest
import torch
from helpers import run_trainer
from safetensors.torch import load_file

pytest.importorskip("torch.distributed")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)


def run(args, out, corpus, cache, ranks=1):
    return run_trainer(["--preset", "micro", "--data", str(corpus), "--data-cache", str(cache), "--out", str(out),
                        "--batch-size", "2", "--max-steps", "6", "--eval-every", "2", "--checkpoint-every", "6",
                        "--seed", "5", "--threads", "1", "--no-progress", "--device", "cpu"] + args, ranks=ranks)


def params(out):
    return load_file(str(out / "checkpoint" / "model.safetensors"))


def losses(out):
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in rows]


def close(a, b, rel):
    """Equal losses to `rel`; None (the step-0 row has no train loss) only equals None."""
    return a is None and b is None or a is not None and b is not None and a == pytest.approx(b, rel=rel)


def test_two_ranks_equal_one_process_with_grad_accum(tmp_path, corpus):
    cache = tmp_path / "cache"
    run(["--grad-accum", "2"], tmp_path / "one", corpus, cache)
    run([], tmp_path / "two", corpus, cache, ranks=2)
    one, two = params(tmp_path / "one"), params(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-5, atol=1e-6), name
    for a, b in zip(losses(tmp_path / "one"), losses(tmp_path / "two"), strict=True):
        assert a[0] == b[0] and close(a[2], b[2], 1e-5)

    # the 2-rank run stopped at step 2 and resumed in one process (grad-accum 2) continues with the same losses
    run(["--stop-at", "2"], tmp_path / "switch", corpus, cache, ranks=2)
    run(["--resume", "--grad-accum", "2"], tmp_path / "switch", corpus, cache)
    for a, b in zip(losses(tmp_path / "switch"), losses(tmp_path / "one"), strict=True):
        assert a[0] == b[0] and close(a[1], b[1], 1e-5) and close(a[2], b[2], 1e-5)


def test_two_ranks_with_a_compiled_model_train_like_eager(tmp_path, corpus):
    """The custom ops under DDP and torch.compile of the wrapped model: same losses as the eager run."""
    cache = tmp_path / "cache"
    run([], tmp_path / "eager", corpus, cache, ranks=2)
    run(["--compile"], tmp_path / "compiled", corpus, cache, ranks=2)
    for a, b in zip(losses(tmp_path / "eager"), losses(tmp_path / "compiled"), strict=True):
        assert a[0] == b[0] and close(a[1], b[1], 1e-4) and close(a[2], b[2], 1e-4)


def test_context_parallel_trains_like_one_process(tmp_path, corpus):
    """--context-parallel 2: each window split over the 2 ranks (zigzag chunks, λk and V exchanged per layer),
    20 steps: the same losses as one process training on the whole windows."""
    cache, steps = tmp_path / "cache", ["--max-steps", "20", "--eval-every", "1", "--checkpoint-every", "20"]
    run(steps, tmp_path / "one", corpus, cache)
    cp = run(steps + ["--context-parallel", "2"], tmp_path / "cp", corpus, cache, ranks=2)
    assert "context parallel over 2 × data parallel over 1" in cp.stdout
    assert "each rank sends 0.004 MB per layer and step" in cp.stdout  # exchange_bytes of the micro preset
    one, two = losses(tmp_path / "one"), losses(tmp_path / "cp")
    assert [r[0] for r in one] == [r[0] for r in two] == list(range(21))
    for a, b in zip(one, two):  # fp32 noise: the keys of a chunk's queries are summed in another order
        assert close(a[1], b[1], 1e-5) and close(a[2], b[2], 1e-5)
