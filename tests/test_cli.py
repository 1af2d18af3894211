"""Command-line errors: one clear line naming the flag (parse time where possible), never a traceback."""
import io
import sysconfig

import numpy as np
import pytest

from tauformer_kernels import chain_laplacian
from tauformer_model import generate as gen_mod
from tauformer_model import train as train_mod


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import pathlib

    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    folder = tmp_path_factory.mktemp("corpus")
    for p in sorted(root.glob("*.py"))[:40]:
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


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
