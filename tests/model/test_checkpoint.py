"""Checkpoints under faults: kill -9 at random instants, a full disk, a diverging run, corrupt files."""
import errno
import os
import random
import re
import signal
import subprocess
import sys
import sysconfig
import time

import pytest
import torch
from safetensors.torch import load_file

from tauformer_model import TauGPTConfig
from tauformer_model import checkpoint as ckpt
from tauformer_model import generate as gen_mod
from tauformer_model import train as train_mod
from tauformer_model.model import TauGPT

MICRO = ["--preset", "micro", "--threads", "1", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = sysconfig.get_paths()["stdlib"]
    folder = tmp_path_factory.mktemp("corpus")
    for name in sorted(os.listdir(root))[:60]:
        if name.endswith(".py"):
            with open(os.path.join(root, name), "rb") as f:
                (folder / name).write_bytes(f.read())
    return folder


def _cli(corpus, cache, out, *args):
    return [sys.executable, "-m", "tauformer_model.train", *MICRO, "--data", str(corpus), "--data-cache", str(cache),
            "--out", str(out), *args]


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), OMP_NUM_THREADS="1")


def _resumable(out):
    """The run's checkpoint loads whole: model, state of the same step, finite tensors. Returns the step."""
    folder = ckpt.find_checkpoint(out)  # once: a live run may move the link between two reads
    if folder is None:
        raise ckpt.CheckpointError(f"no checkpoint in {out}")
    model, meta = ckpt.load_model(folder)
    state = ckpt.load_state(folder)
    assert state["step"] == int(meta["step"])
    return state["step"]


def _no_temporaries(out):
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".checkpoint-") or n.endswith(".tmp")], names
    assert len([n for n in names if n.startswith("checkpoint-")]) == 1, names


def test_kill_at_random_instants_always_leaves_a_resumable_checkpoint(tmp_path, corpus):
    """A run checkpointing every step is killed with SIGKILL at 24 random instants and resumed each time;
    every kill leaves a checkpoint that loads whole, and the final weights equal the uninterrupted run's."""
    cache = tmp_path / "cache"
    steps = 300  # more than 24 kills can consume: each resumed process runs a few steps before its kill
    args = ("--max-steps", str(steps), "--checkpoint-every", "1", "--eval-every", "50", "--seed", "3")
    subprocess.run(_cli(corpus, cache, tmp_path / "whole", *args), env=_env(), check=True, capture_output=True)

    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    while kills < 24:
        resume = ("--resume",) if (out / "checkpoint").exists() else ()
        proc = subprocess.Popen(_cli(corpus, cache, out, *args, *resume), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait until this process has started stepping (a checkpoint newer than the one it resumed), then
        # kill at a random instant within the next steps: inside a save, between saves, while evaluating
        start = _resumable(out) if resume else 0
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            try:
                if _resumable(out) > start:
                    break
            except ckpt.CheckpointError:
                pass  # no checkpoint yet (the first run); a kill never leaves one torn (asserted below)
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))
        assert proc.poll() is None, "the run ended before it was killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        assert 1 <= _resumable(out) < steps  # raises if the kill left no whole checkpoint
    subprocess.run(_cli(corpus, cache, out, *args, "--resume"), env=_env(), check=True, capture_output=True)
    assert _resumable(out) == steps
    _no_temporaries(out)
    whole = load_file(str(tmp_path / "whole" / "checkpoint" / ckpt.MODEL_FILE))
    killed = load_file(str(out / "checkpoint" / ckpt.MODEL_FILE))
    for name in whole:
        assert torch.equal(whole[name], killed[name]), name


def _micro(out, corpus, cache, **kw):
    model = TauGPTConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, block_size=32)
    base = dict(preset="micro", out=str(out), data=str(corpus), data_cache=str(cache), batch_size=4, max_steps=8,
                lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=2, checkpoint_every=4, seed=7, progress=False)
    base.update(kw)
    return train_mod.TrainConfig(model=model, **base)


def _quiet(*args, **kwargs):
    pass


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, corpus, monkeypatch):
    out = tmp_path / "run"
    train_mod.train(_micro(out, corpus, tmp_path / "cache", max_steps=4), log=_quiet)
    before = load_file(str(out / "checkpoint" / ckpt.MODEL_FILE))
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):  # half a file, then ENOSPC, as a full disk does
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device.*previous checkpoint .* is kept"):
        train_mod.train(_micro(out, corpus, tmp_path / "cache", resume=True), log=_quiet)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert _resumable(out) == 4
    _no_temporaries(out)
    after = load_file(str(out / "checkpoint" / ckpt.MODEL_FILE))
    assert all(torch.equal(before[k], after[k]) for k in before)
    # and the run goes on from it once there is space
    assert train_mod.train(_micro(out, corpus, tmp_path / "cache", resume=True), log=_quiet)["step"] == 8


def test_a_diverging_run_stops_with_the_message_and_saves_nothing_non_finite(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    argv = [*MICRO, "--data", str(corpus), "--data-cache", str(tmp_path / "cache"), "--out", str(out),
            "--lr", "30", "--checkpoint-every", "1", "--max-steps", "40"]
    assert train_mod.main(argv) == 1
    err = capsys.readouterr().err
    # lr 30 ends either way, by backend and rounding: a non-finite loss or gradient, or the update turning a
    # temperature or tau into 0 (exp underflow); both are the divergence stop with its message
    assert re.search(r"error: (non-finite|the update made a temperature or tau 0)", err), err
    assert "stopping" in err and "Traceback" not in err
    for folder in [p for p in out.iterdir() if p.name.startswith("checkpoint-")]:
        for name, t in load_file(str(folder / ckpt.MODEL_FILE)).items():
            assert torch.isfinite(t).all(), (folder.name, name)
    _resumable(out)
    assert train_mod.main(argv + ["--resume"]) == 1  # resuming diverges again, with the message


def test_save_refuses_non_finite_weights(tmp_path):
    model = TauGPT(TauGPTConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=16, block_size=8))
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(ckpt.CheckpointError, match="non-finite values in lm_head.weight"):
        ckpt.save_checkpoint(tmp_path, model, {"step": 1})
    assert not list(tmp_path.iterdir())


def test_an_older_layout_is_read_and_converted(tmp_path, corpus):
    """A run folder from before the link (checkpoint/ a real folder) resumes, and its next save converts it."""
    out = tmp_path / "run"
    train_mod.train(_micro(out, corpus, tmp_path / "cache", max_steps=4), log=_quiet)
    target = (out / "checkpoint").resolve()
    (out / "checkpoint").unlink()
    os.rename(target, out / "checkpoint")
    assert _resumable(out) == 4
    assert train_mod.train(_micro(out, corpus, tmp_path / "cache", resume=True), log=_quiet)["step"] == 8
    assert (out / "checkpoint").is_symlink() and _resumable(out) == 8
    _no_temporaries(out)


def test_corrupt_files_are_named(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    train_mod.train(_micro(out, corpus, tmp_path / "cache", max_steps=4), log=_quiet)
    folder = (out / "checkpoint").resolve()
    state = (folder / ckpt.STATE_FILE).read_bytes()
    (folder / ckpt.STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(ckpt.CheckpointError, match=r"state\.pt: not a readable training state"):
        ckpt.load_state(out)
    (folder / ckpt.STATE_FILE).write_bytes(state)
    model = (folder / ckpt.MODEL_FILE).read_bytes()
    (folder / ckpt.MODEL_FILE).write_bytes(model[: len(model) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors: not a readable TauGPT checkpoint"):
        ckpt.load_model(out)
    assert gen_mod.main(["--checkpoint", str(out), "--max-new-tokens", "2"]) == 1
    assert "model.safetensors: not a readable TauGPT checkpoint" in capsys.readouterr().err
    argv = [*MICRO, "--data", str(corpus), "--data-cache", str(tmp_path / "cache"), "--out", str(out), "--resume"]
    with pytest.raises(SystemExit) as exit_info:
        train_mod.main(argv)
    assert exit_info.value.code == 2 and "model.safetensors: not a readable" in capsys.readouterr().err


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, corpus):
    out = tmp_path / "run"
    train_mod.train(_micro(out, corpus, tmp_path / "cache", stop_at=4), log=_quiet)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 8, "train_lo')  # a kill while appending an evaluation
    assert train_mod.train(_micro(out, corpus, tmp_path / "cache", resume=True), log=_quiet)["step"] == 8
    assert [r["step"] for r in train_mod.read_metrics(out / "metrics.jsonl")] == [0, 4, 8]


# Issue 29: a full disk fails differently in each writer: ENOSPC from safetensors or a file write, a
# RuntimeError from torch.save's zip writer ("unexpected pos ..."), EIO from fsync. Every one must clean up and
# be one line, and resume must sweep what a killed save left before it writes anything.
TORCH_ZIP_ERROR = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 3328 vs 3216\n"
                               "frame #0: c10::ThrowEnforceNotMet(...)")


def _half_a_file(error):
    def fail(obj, path, *args, **kwargs):  # half a file, then the error, as a full disk does
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise error
    return fail


def _fsync_fails(error):
    def fail(path):
        raise error
    return fail


@pytest.mark.parametrize("error", [TORCH_ZIP_ERROR, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))],
                         ids=["RuntimeError", "ENOSPC"])
@pytest.mark.parametrize("where", ["torch.save", "save_file", "fsync"])
def test_every_failed_write_cleans_up_and_is_one_line(tmp_path, where, error, monkeypatch):
    model = TauGPT(TauGPTConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=16, block_size=8))
    first = ckpt.save_checkpoint(tmp_path, model, {"step": 1})
    target, replacement = {"torch.save": (ckpt.torch, "save"), "save_file": (ckpt, "save_file"),
                           "fsync": (ckpt, "_fsync")}[where]
    monkeypatch.setattr(target, replacement, _fsync_fails(error) if where == "fsync" else _half_a_file(error))
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.save_checkpoint(tmp_path, model, {"step": 2})
    message = str(info.value)
    assert "\n" not in message and "could not write the step-2 checkpoint" in message and "is kept" in message
    assert ("unexpected pos 3328 vs 3216" if isinstance(error, RuntimeError) else "No space left on device") in message
    monkeypatch.undo()
    assert ckpt.find_checkpoint(tmp_path) == first and _resumable(tmp_path) == 1
    _no_temporaries(tmp_path)


def test_an_interrupted_save_cleans_up_and_goes_on_interrupting(tmp_path, monkeypatch):
    model = TauGPT(TauGPTConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=16, block_size=8))
    ckpt.save_checkpoint(tmp_path, model, {"step": 1})
    monkeypatch.setattr(ckpt.torch, "save", _half_a_file(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, model, {"step": 2})
    _no_temporaries(tmp_path)


def test_resume_sweeps_temporaries_before_it_writes(tmp_path, corpus, monkeypatch, capsys):
    """A partial checkpoint left by a failed save filled the disk; --resume then died in write_plot (ENOSPC)
    before it swept it. Now the sweep comes first, and a failed metrics or plot write is one line."""
    out = tmp_path / "run"
    train_mod.train(_micro(out, corpus, tmp_path / "cache", stop_at=4), log=_quiet)
    partial = out / ".checkpoint-000008.partial-12345"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"\0" * 1000)
    (out / "loss.png.tmp").write_bytes(b"\0" * 10)

    def full_disk(folder, rows):
        assert not partial.exists() and not (out / "loss.png.tmp").exists()  # swept before the first write
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "loss.png.tmp"))

    monkeypatch.setattr(train_mod, "write_plot", full_disk)
    argv = [*MICRO, "--data", str(corpus), "--data-cache", str(tmp_path / "cache"), "--out", str(out), "--resume"]
    assert train_mod.main(argv) == 1
    err = capsys.readouterr().err
    assert err == f"error: could not write {out / 'loss.png.tmp'}: No space left on device\n"
    assert _resumable(out) == 4
    _no_temporaries(out)


def test_a_temperature_that_underflows_to_zero_stops_the_run(tmp_path, corpus, capsys):
    """--lr 1e3 drove log_temperature so low that exp gave exactly 0: every value finite, so the guard missed it
    and evaluation died in a traceback. Now the step that does it stops the run with the message."""
    out = tmp_path / "run"
    argv = [*MICRO, "--data", str(corpus), "--data-cache", str(tmp_path / "cache"), "--out", str(out),
            "--lr", "1e3", "--checkpoint-every", "1", "--max-steps", "40"]
    assert train_mod.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "stopping" in err and "Traceback" not in err
    assert "non-finite" in err  # on this seed: "a temperature or tau 0 or non-finite (exp of ...)" at step 2
    model, _ = ckpt.load_model(out)
    temperatures = [t.exp() for name, t in model.named_parameters() if name.endswith("log_temperature")]
    assert temperatures and all(bool((t > 0).all() and torch.isfinite(t).all()) for t in temperatures)


def test_the_guard_names_a_zero_temperature():
    """What the step's guard sees: a log temperature whose exp is 0 in fp32 (every value finite), then a
    non-finite weight; a healthy model passes."""
    model = TauGPT(TauGPTConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=16, block_size=8))
    assert train_mod.broken_parameters(model) is None
    name, log_temperature = next((n, p) for n, p in model.named_parameters() if n.endswith("log_temperature"))
    with torch.no_grad():
        log_temperature.fill_(-200.0)
    assert train_mod.broken_parameters(model) == (
        f"a temperature or tau 0 or non-finite (exp of {name} under- or overflowed)")
    with torch.no_grad():
        log_temperature.fill_(0.0)
        model.lm_head.weight[0, 0] = float("inf")
    assert train_mod.broken_parameters(model) == "parameters non-finite (lm_head.weight)"


def test_the_stop_message_after_a_resume_names_its_evaluation(tmp_path, corpus, capsys):
    """Resumed and stopped again before any evaluation, the message showed the step-0 val loss as if it were
    the stop step's; it now says which step it is from."""
    base = [*MICRO, "--data", str(corpus), "--data-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
            "--eval-every", "100", "--max-steps", "20"]
    assert train_mod.main([*base, "--stop-at", "3"]) == 0
    assert train_mod.main([*base, "--resume", "--stop-at", "5"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("stop_at at step 5: val loss ") and "(the last evaluation, at step 0)" in last
    assert train_mod.main([*base, "--resume"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("done at step 20: val loss ") and "last evaluation" not in last
