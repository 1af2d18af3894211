"""Checkpoints: the model as safetensors (its config in the metadata) + a small state file.

A checkpoint folder holds
  model.safetensors  weights and buffers (Laplacian, tau); metadata: "config" (JSON), "step"
  state.pt           optimizer, step, data sampler and RNG states, configs (torch.save, weights_only-safe)
  config.json        the model config, for people
  tokenizer.json     only for a BPE tokenizer
Each file is written to a temporary name and moved into place with os.replace; state.pt goes last
and records the step that model.safetensors must carry, so a torn write is detected on load.
"""

from __future__ import annotations

import json
import os
import pathlib

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import TauGPTConfig
from .model import TauGPT

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"


def _replace(tmp: pathlib.Path, final: pathlib.Path) -> None:
    os.replace(tmp, final)


def save_checkpoint(folder: str | os.PathLike, model: TauGPT, state: dict, tokenizer=None) -> None:
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    step = int(state["step"])
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(model.config.to_dict()), "step": str(step)}
    save_file(tensors, folder / (MODEL_FILE + ".tmp"), metadata=meta)
    _replace(folder / (MODEL_FILE + ".tmp"), folder / MODEL_FILE)
    (folder / "config.json.tmp").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    _replace(folder / "config.json.tmp", folder / "config.json")
    if tokenizer is not None and getattr(tokenizer, "kind", "byte") != "byte":
        tokenizer.save(folder / "tokenizer.json.tmp")
        _replace(folder / "tokenizer.json.tmp", folder / "tokenizer.json")
    torch.save(state, folder / (STATE_FILE + ".tmp"))
    _replace(folder / (STATE_FILE + ".tmp"), folder / STATE_FILE)


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[TauGPT, dict]:
    """The model of a checkpoint folder, and the safetensors metadata."""
    path = pathlib.Path(folder) / MODEL_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    config = TauGPTConfig.from_dict(json.loads(meta["config"]))
    tensors = load_file(str(path))
    model = TauGPT(config, laplacian=tensors["laplacian"])
    model.load_state_dict(tensors)
    return model.to(device), meta


def load_state(folder: str | os.PathLike, model_meta: dict) -> dict:
    state = torch.load(pathlib.Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    if str(state["step"]) != model_meta.get("step"):
        raise RuntimeError(f"checkpoint {folder} is torn: state.pt is at step {state['step']}, "
                           f"model.safetensors at step {model_meta.get('step')}")
    return state
