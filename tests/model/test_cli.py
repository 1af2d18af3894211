"""Command-line errors: one clear line naming the flag (parse time where possible), never a traceback."""
import io

import numpy as np
import pytest
import torch

from tauformer_kernels import chain_laplacian
from tauformer_model import compare, decode_bench, laplacian_cli, tasks
from tauformer_model import generate as gen_mod
from tauformer_model import train as train_mod
from tauformer_model.checkpoint import load_model


def _train_error(argv, capsys):
    """Run train's CLI; returns (exit code, stderr)."""
    try:
        code = train_mod.main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flag, value, says", [
    ("--eval-every", "0", "expected an integer >= 1"),
    ("--grad-accum", "0", "expected an integer >= 1"),
    ("--batch-size", "-2", "expected an integer >= 1"),
    ("--max-steps", "ten", "expected an integer >= 1, got 'ten'"),
    ("--checkpoint-every", "0", "expected an integer >= 1"),
    ("--n-layer", "0", "expected an integer >= 1"),
    ("--block-size", "-1", "expected an integer >= 1"),
    ("--lr", "-1", "expected a finite number > 0"),
    ("--lr", "nan", "expected a finite number > 0"),
    ("--min-lr-frac", "2", "expected a number in [0, 1]"),
    ("--warmup-steps", "-1", "expected an integer >= 0"),
    ("--grad-clip", "-1", "expected a finite number >= 0"),
    ("--temperature-init", "0", "expected a finite number > 0"),
    ("--attention", "flash", "invalid choice: 'flash'"),
    ("--backend", "cuda", "invalid choice: 'cuda'"),
    ("--tokenizer", "word", "invalid choice: 'word'"),
    ("--laplacian", "missing.npy", "expected 'chain' or a Laplacian file"),
])
def test_train_flags_are_checked_at_parse_time(flag, value, says, capsys, tmp_path):
    code, err = _train_error(["--out", str(tmp_path), flag, value], capsys)
    assert code == 2 and flag in err and says in err and "Traceback" not in err


def test_train_config_and_file_errors_are_one_line(corpus, tmp_path, capsys):
    base = ["--preset", "micro", "--out", str(tmp_path / "run"), "--data-cache", str(tmp_path / "cache"),
            "--no-progress", "--device", "cpu"]
    code, err = _train_error(base + ["--n-embd", "30", "--n-head", "4"], capsys)
    assert code == 2 and "n_embd (30) must be a multiple of n_head (4)" in err

    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.eye(5))  # not a Laplacian (rows do not sum to 0), and not 16×16
    code, err = _train_error(base + ["--laplacian", str(wrong), "--data", str(corpus)], capsys)
    assert code == 2 and "wrong.npy" in err and "laplacian must be 16×16" in err
    good = tmp_path / "chain.npy"
    np.save(good, chain_laplacian(16).numpy())  # an F×F .npy is a Laplacian file too
    args = train_mod.build_parser().parse_args(base + ["--laplacian", str(good)])
    assert train_mod.config_from_args(args).model.laplacian == str(good)

    binaries = tmp_path / "binaries"
    binaries.mkdir()
    (binaries / "a.bin").write_bytes(b"\0\1\2" * 100)
    code, err = _train_error(base + ["--data", str(binaries)], capsys)
    assert code == 1 and "--data" in err and "binary" in err and "Traceback" not in err
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("print('hello')\n" * 3)
    code, err = _train_error(base + ["--data", str(tiny)], capsys)
    assert code == 1 and "--block-size" in err and "tokens" in err
    code, err = _train_error(base + ["--data", str(tmp_path / "nowhere")], capsys)
    assert code == 1 and "no such file or folder" in err
    code, err = _train_error(base + ["--data", str(corpus), "--resume"], capsys)
    assert code == 1 and "--resume: no checkpoint" in err


@pytest.mark.parametrize("flag, value, says", [
    ("--num-samples", "0", "expected an integer >= 1"),
    ("--top-k", "-1", "expected an integer >= 0"),
    ("--max-new-tokens", "-5", "expected an integer >= 1"),
    ("--temperature", "-0.5", "expected a finite number >= 0"),
    ("--threads", "0", "expected an integer >= 1"),
])
def test_generate_flags_are_checked_at_parse_time(flag, value, says, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        gen_mod.main(["--checkpoint", str(tmp_path), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and flag in err and says in err


def test_generate_without_a_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gen_mod.main(["--checkpoint", str(tmp_path / "run")])
    assert e.value.code == 2 and "no checkpoint there" in capsys.readouterr().err


def test_progress_in_a_log_file_is_plain_periodic_lines(monkeypatch):
    """Not a terminal: no tqdm redraws (carriage returns), a line every every_s seconds."""
    monkeypatch.setattr("sys.stderr", io.StringIO())
    lines = []
    progress = train_mod.Progress(10, 0, "run", lines.append, every_s=0.0)
    for step in range(1, 4):
        progress.update(step, 2.5, 1000.0)
    progress.close()
    assert progress.bar is None and "\r" not in "".join(lines)
    assert lines == [f"step {s}/10: loss 2.5000, 1000 tokens/s" for s in range(1, 4)]
    quiet = train_mod.Progress(10, 0, "run", lines.append, every_s=3600.0)
    quiet.update(1, 2.5, 1000.0)
    assert len(lines) == 3


# ----------------------------------------------------------------------------------------------------
# Issue 29's command-line repros: each bad value a one-line error, each checked before any work starts
# ----------------------------------------------------------------------------------------------------

def _exit(main, argv, capsys):
    """Run a CLI's main; returns (exit code, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def micro_run(corpus, tmp_path_factory):
    """A micro run of 2 steps (context 32): a checkpoint to build Laplacians and generate from."""
    out = tmp_path_factory.mktemp("micro") / "run"
    argv = ["--preset", "micro", "--max-steps", "2", "--out", str(out), "--data", str(corpus), "--data-cache",
            str(out.parent / "cache"), "--no-progress", "--device", "cpu", "--threads", "1"]
    assert train_mod.main(argv) == 0
    return out


@pytest.mark.parametrize("flag, value, says", [
    ("--eps-graph", "-1", "expected a finite number > 0"),  # wrote an all-zero Laplacian and exited 0
    ("--k", "0", "expected an integer >= 1"),
    ("--sigma", "0", "expected a finite number > 0"),
    ("--p", "nan", "expected a finite number > 0"),
    ("--windows", "0", "expected an integer >= 1"),
    ("--n-clusters", "-3", "expected an integer >= 1"),
    ("--out", "no/such/folder/lap.npz", "its folder 'no/such/folder' does not exist"),
])
def test_laplacian_cli_values_are_checked_at_parse_time(flag, value, says, tmp_path, capsys):
    argv = ["--embeddings", str(tmp_path / "e.npy"), "--out", str(tmp_path / "lap.npz"), flag, value]
    code, err = _exit(laplacian_cli.main, argv, capsys)
    assert code == 2 and flag in err and says in err and "Traceback" not in err


def test_laplacian_cli_errors_are_one_line(tmp_path, capsys, micro_run):
    emb = tmp_path / "e.npy"
    np.save(emb, np.random.default_rng(0).normal(size=(50, 16)))
    out = tmp_path / "lap.npz"
    cases = [
        (["--eps-graph", "1e-9"], "the graph has no edges"),  # no pair that close: λ would be 0 everywhere
        (["--k", "16"], "k must be in [1, F) = [1, 16), got 16"),
        (["--embeddings", str(tmp_path / "missing.npy")], "missing.npy"),
    ]
    for extra, says in cases:
        code, err = _exit(laplacian_cli.main, ["--embeddings", str(emb), "--out", str(out), *extra], capsys)
        assert code == 1 and err.startswith("error: ") and says in err and err.count("\n") == 1, err
        assert not out.exists()
    code, err = _exit(laplacian_cli.main, ["--keys-from", str(micro_run), "--data", "/nonexistent", "--out", str(out)],
                      capsys)
    assert code == 1 and "error: --data /nonexistent: no such file or folder" in err and "bytes of text" not in err
    code, err = _exit(laplacian_cli.main, ["--keys-from", str(tmp_path), "--out", str(out)], capsys)
    assert code == 1 and err.startswith("error: ") and "no checkpoint here" in err


def test_compare_refuses_a_variant_named_like_a_built_in_one(capsys):
    """`--variant "dot=--lr 1"` silently replaced the dot baseline and labelled it as dot product."""
    code, err = _exit(compare.main, ["--variants", "dot", "--variant", "dot=--lr 1"], capsys)
    assert code == 2 and "--variant dot: a built-in variant has this name (--attention dot --recency none)" in err
    code, err = _exit(compare.main, ["--variant", "mine=--lr 1", "--variant", "mine=--lr 2"], capsys)
    assert code == 2 and "--variant mine: an earlier --variant has this name" in err


@pytest.mark.parametrize("main", [tasks.main, decode_bench.main], ids=["tasks", "decode_bench"])
def test_out_is_checked_before_the_runs(main, tmp_path, capsys):
    """A typo in --out was found only after the runs (56 minutes lost): now at parse time, before any run (the
    runs asked for here would take hours)."""
    many = ["--steps", "1000000"] if main is tasks.main else ["--new-tokens", "1000000"]
    for out, says in ((tmp_path / "typo" / "table.md", "does not exist"), (tmp_path, "is a folder")):
        code, err = _exit(main, [*many, "--out", str(out)], capsys)
        assert code == 2 and "--out" in err and says in err
    assert not list(tmp_path.iterdir())  # the probe file is gone


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys, micro_run):
    code, err = _exit(train_mod.main, ["--preset", "micro", "--out", str(tmp_path), "--device", "cuda"], capsys)
    assert code == 2 and "--device cuda: no CUDA GPU on this machine" in err and "Traceback" not in err
    code, err = _exit(gen_mod.main, ["--checkpoint", str(micro_run), "--device", "cuda:1"], capsys)
    assert code == 2 and "--device cuda:1: no CUDA GPU on this machine" in err
    code, err = _exit(gen_mod.main, ["--checkpoint", str(micro_run), "--device", "gpu"], capsys)
    assert code == 2 and "--device gpu: not a device name" in err


def test_generate_refuses_more_than_the_context(micro_run, capsys):
    """The micro model's context is 32 tokens: a longer prompt + new tokens was accepted without a word."""
    code, err = _exit(gen_mod.main, ["--checkpoint", str(micro_run), "--prompt", "x" * 20, "--max-new-tokens", "13"],
                      capsys)
    assert code == 2 and "--prompt of 20 tokens + --max-new-tokens 13 exceeds the model's context of 32" in err
    code, err = _exit(gen_mod.main, ["--checkpoint", str(micro_run), "--prompt", "x" * 40], capsys)
    assert code == 2 and "--prompt of 40 tokens fills the model's context of 32 tokens" in err
    model, _ = load_model(micro_run)
    with pytest.raises(ValueError, match=r"a prompt of 30 tokens \+ max_new_tokens 3 = 33 tokens exceeds"):
        gen_mod.generate(model, [torch.arange(5), torch.arange(30)], 3)
    # by default it fills the context (at most 200 tokens): a cache of 20 + 12 positions
    assert gen_mod.main(["--checkpoint", str(micro_run), "--prompt", "x" * 20, "--temperature", "0"]) == 0
    assert "for 1 × 32 positions" in capsys.readouterr().out
