"""Fixtures of the model tests."""

import pathlib
import sysconfig

import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> pathlib.Path:
    """About 40 of the stdlib's .py files (~0.5 MB), copied into a folder: a small corpus split by file (read only)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    folder = tmp_path_factory.mktemp("corpus")
    for p in sorted(root.glob("*.py"))[:40]:
        (folder / p.name).write_bytes(p.read_bytes())
    return folder
