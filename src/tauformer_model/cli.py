"""Argument types of the command-line tools (a bad value is a one-line error naming the flag, at parse time),
and the commit their results tables name."""

from __future__ import annotations

import argparse
import math
import pathlib
import subprocess


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


def git_commit() -> str:
    """The short commit of the package's checkout, for the header of a results table ("unknown" outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=pathlib.Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
