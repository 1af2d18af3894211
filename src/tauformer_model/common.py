"""What every script of the package shares (nanochat's common.py): rank-0 output, the device, the learning-rate
schedule, mean ± sd, the metrics.jsonl reader, the argparse types (a bad value is a one-line error naming the
flag, at parse time) and the commit a results table names. No script imports another script for its helpers."""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

import torch


def print0(*args, **kwargs) -> None:
    """The one output function: prints on rank 0 only, above the progress bar."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from tqdm import tqdm

    out = kwargs.get("file", sys.stdout)
    tqdm.write(" ".join(str(a) for a in args), file=out)
    out.flush()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...; a bare 'cuda' is this rank's GPU.
    Raises ValueError naming --device for a name torch does not know or a GPU this machine lacks."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name ('auto', 'cpu', 'cuda', 'cuda:1', ...)") from None
    if device.type == "cuda":
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU on this machine (torch {torch.__version__}); "
                             "use --device cpu or auto")
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def lr_at(step: int, *, max_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps to max_lr, then cosine decay to max_lr * min_ratio at step `total`."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    low = max_lr * min_ratio
    return low + 0.5 * (max_lr - low) * (1.0 + math.cos(math.pi * progress))


def mean_sd(values: list[float], digits: int = 4) -> str:
    """"mean ± sd" (sample sd, n − 1) of values; the mean alone for one value."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def read_metrics(path: pathlib.Path, up_to_step: int | None = None) -> list[dict]:
    """The rows of a run's metrics.jsonl (none when it is absent), up to `up_to_step`. A torn last line (a run
    killed while appending it) is dropped: --resume redoes that evaluation. A torn line before others raises."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i + 1 < len(lines):
                raise
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


def _number(kind, text: str, what: str, ok) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, "an integer >= 1", lambda v: v >= 1)


def nonnegative_int(text: str) -> int:
    return _number(int, text, "an integer >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _number(float, text, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)


def nonnegative_float(text: str) -> float:
    return _number(float, text, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)


def fraction(text: str) -> float:
    return _number(float, text, "a number in [0, 1]", lambda v: 0 <= v <= 1)


def laplacian_spec(text: str) -> str:
    """'chain' or an existing Laplacian file (.npz from save_laplacian / laplacian_cli, or an F×F .npy)."""
    if text != "chain" and not pathlib.Path(text).is_file():
        raise argparse.ArgumentTypeError(
            f"expected 'chain' or a Laplacian file (.npz from python -m tauformer_model.laplacian_cli, or an "
            f"F×F .npy), got {text!r}: no such file")
    return text


def output_file(text: str) -> str:
    """A file the script can write when it ends: checked before a long run starts, so a typo costs nothing.
    Its folder must exist and take a new file (a probe file is created there and removed)."""
    path = pathlib.Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: its folder {str(folder)!r} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {e.strerror}") from None
    return text


def git_commit() -> str:
    """The short commit of the package's checkout, for the header of a results table ("unknown" outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=pathlib.Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
