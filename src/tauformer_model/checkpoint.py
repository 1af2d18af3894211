"""Checkpoints: the model as safetensors (its config in the metadata) + a small state file, saved as a unit.

A run folder holds its checkpoint as

  checkpoint -> checkpoint-000200      a symbolic link, the one name readers use
  checkpoint-000200/
    model.safetensors  weights and buffers (Laplacian, tau); metadata: "config" (JSON), "step"
    state.pt           optimizer, step, data sampler and RNG states, configs (torch.save, weights_only-safe);
                       the optimizer state whole, keyed by parameter name, whatever the run's sharding
    config.json        the model config, for people
    tokenizer.json     only for a BPE tokenizer

A save writes a new folder under a temporary name, flushes every file and the folder to disk, renames it
to checkpoint-<step>, then points the link at it with one atomic rename (os.replace of a symlink), and only
then deletes the previous folder. A kill at any instant therefore leaves the link on the previous complete
checkpoint or on the new one; a write that fails in any way (a full disk: ENOSPC from one writer, a
RuntimeError from torch.save's zip writer) removes its temporary folder and raises CheckpointError with one
line, keeping the previous checkpoint; `remove_temporaries` sweeps what a killed save left (--resume calls it
before writing anything). `find_checkpoint` also accepts a run whose link is missing (a run killed while
converting an older layout) by taking its newest complete folder.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import TauGPTConfig
from .model import TauGPT

LINK = "checkpoint"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
_FOLDER = re.compile(r"checkpoint-(\d+)(?:-(\d+))?$")
_TEMPORARY_PREFIX = ".checkpoint-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _complete_folders(run: pathlib.Path) -> list[pathlib.Path]:
    """The run's checkpoint-<step>[-n] folders, oldest first (a folder only gets that name once complete)."""
    found = []
    for p in run.iterdir() if run.is_dir() else ():
        m = _FOLDER.match(p.name)
        try:
            complete = m is not None and p.is_dir() and not p.is_symlink()
        except FileNotFoundError:  # pruned by a live run between the listing and the check
            complete = False
        if complete:
            found.append(((int(m.group(1)), int(m.group(2) or 0)), p))
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | os.PathLike) -> pathlib.Path | None:
    """The checkpoint folder of `path`: a run folder (its checkpoint link, else its newest complete
    checkpoint-<step> folder) or a checkpoint folder itself. None when there is none."""
    path = pathlib.Path(path)
    if (path / MODEL_FILE).exists() and (path / STATE_FILE).exists():
        return path
    link = path / LINK
    if (link / STATE_FILE).exists():
        return link.resolve()
    folders = _complete_folders(path)
    return folders[-1] if folders else None


def remove_temporaries(run: str | os.PathLike) -> None:
    """Leftovers of a save that was killed: partial folders and unplaced links."""
    for p in pathlib.Path(run).glob(_TEMPORARY_PREFIX + "*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _new_folder_name(run: pathlib.Path, step: int) -> str:
    name, n = f"checkpoint-{step:06d}", 0
    while (run / name).exists():  # the same step saved again (e.g. stopped at a checkpoint step)
        n += 1
        name = f"checkpoint-{step:06d}-{n}"
    return name


def _write_files(folder: pathlib.Path, model: TauGPT, weights: dict, state: dict, tokenizer) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    meta = {"config": json.dumps(model.config.to_dict()), "step": str(int(state["step"]))}
    save_file(tensors, folder / MODEL_FILE, metadata=meta)
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    if tokenizer is not None and getattr(tokenizer, "kind", "byte") != "byte":
        tokenizer.save(folder / "tokenizer.json")
    torch.save(state, folder / STATE_FILE)
    for p in folder.iterdir():
        _fsync(p)
    _fsync(folder)


def _reason(error: Exception) -> str:
    """One line saying why a write failed: the OS's words, else the exception's first line."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else 'no message'}"


def _point_link(run: pathlib.Path, name: str) -> None:
    """Make run/checkpoint point at run/name with one rename."""
    link = run / LINK
    if link.exists() and not link.is_symlink():  # a checkpoint folder of the layout before links
        os.rename(link, run / _new_folder_name(run, 0))
    tmp = run / f"{_TEMPORARY_PREFIX}link-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(name, tmp)
    os.replace(tmp, link)
    _fsync(run)


def save_checkpoint(run: str | os.PathLike, model: TauGPT, state: dict, tokenizer=None,
                    weights: dict | None = None) -> pathlib.Path:
    """Write a checkpoint of the run folder `run` as one unit (see the module docstring); returns its folder.
    ``weights``: the model's full state dict when the model holds only shards of it (FSDP: the trainer gathers
    it to this rank first); default model.state_dict().

    Refuses (CheckpointError) a model with a non-finite parameter or buffer: a diverged run must never
    replace its last good checkpoint."""
    run = pathlib.Path(run)
    step = int(state["step"])
    weights = model.state_dict() if weights is None else weights
    bad = [name for name, t in weights.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"not saving the step-{step} checkpoint: non-finite values in {', '.join(bad[:5])}"
                              + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    run.mkdir(parents=True, exist_ok=True)
    remove_temporaries(run)
    previous = find_checkpoint(run)
    tmp = run / f"{_TEMPORARY_PREFIX}{step:06d}.partial-{os.getpid()}"
    name = _new_folder_name(run, step)
    try:
        tmp.mkdir()
        _write_files(tmp, model, weights, state, tokenizer)
        os.rename(tmp, run / name)
        _fsync(run)
        _point_link(run, name)
    except BaseException as e:  # every failure of a write cleans up; Ctrl-C and exits then go on as they were
        shutil.rmtree(tmp, ignore_errors=True)
        if find_checkpoint(run) != (run / name).resolve():  # renamed but never linked: not the run's checkpoint
            shutil.rmtree(run / name, ignore_errors=True)
        remove_temporaries(run)
        if not isinstance(e, Exception):
            raise
        kept = f"the previous checkpoint ({previous}) is kept" if previous else "there is no previous checkpoint"
        raise CheckpointError(f"could not write the step-{step} checkpoint into {run}: {_reason(e)}; {kept}") from e
    for old in _complete_folders(run):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return run / name


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[TauGPT, dict]:
    """The model of a checkpoint folder (or of a run folder's checkpoint), and the safetensors metadata."""
    found = find_checkpoint(folder)
    if found is None:
        raise CheckpointError(f"{folder}: no checkpoint here ({MODEL_FILE} + {STATE_FILE}, or a run folder "
                              f"with a {LINK}/ link)")
    path = found / MODEL_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        config = TauGPTConfig.from_dict(json.loads(meta["config"]))
        tensors = load_file(str(path))
        model = TauGPT(config, laplacian=tensors["laplacian"])
        model.load_state_dict(tensors)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable TauGPT checkpoint ({type(e).__name__}: {e})") from e
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{path}: non-finite values in {', '.join(bad[:5])} (a diverged run?)")
    return model.to(device), meta


def load_state(folder: str | os.PathLike) -> dict:
    """The training state of a checkpoint (or of a run folder's); checks that it and the model file
    belong to one step."""
    found = pathlib.Path(find_checkpoint(folder) or folder)
    path = found / STATE_FILE
    try:
        with safe_open(str(found / MODEL_FILE), framework="pt") as f:
            model_meta = f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError) as e:  # safetensors reports a missing file as RuntimeError
        raise CheckpointError(f"{found / MODEL_FILE}: not a readable TauGPT checkpoint ({e})") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        step = state["step"]
    except Exception as e:  # torch.load raises pickle, zip and EOF errors of many kinds
        raise CheckpointError(f"{path}: not a readable training state ({type(e).__name__}: {e})") from e
    if str(step) != model_meta.get("step"):
        raise CheckpointError(f"checkpoint {path.parent} is torn: {STATE_FILE} is at step {step}, "
                              f"{MODEL_FILE} at step {model_meta.get('step')}")
    return state
