"""Training loop, checkpoints, exact resume, generation and data (micro configs: seconds on a CPU)."""

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import pathlib

import pytest
import torch

from tauformer_model import TauGPT, TauGPTConfig
from tauformer_model import generate as gen_mod
from tauformer_model import train as train_mod
from tauformer_model.common import mean_sd, read_metrics
from tauformer_model.data import ByteTokenizer, list_files, load_dataset, split_files


def micro_config(out, corpus, cache, **kw) -> train_mod.TrainConfig:
    model = TauGPTConfig(**{**dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, block_size=32), **kw.pop("model", {})})
    base = dict(preset="micro", out=str(out), data=str(corpus), data_cache=str(cache), batch_size=4,
                max_steps=8, lr=3e-3, warmup_steps=2, eval_every=2, eval_batches=2, checkpoint_every=4,
                seed=7, progress=False)
    base.update(kw)
    return train_mod.TrainConfig(model=model, **base)


def quiet(*args, **kwargs):
    pass


def losses(out: pathlib.Path):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in rows]


@pytest.mark.parametrize("attention", ["taumode", "dot"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, corpus, attention):
    """A run stopped at step 3 (not an eval or checkpoint step) and resumed gives identical losses."""
    model = dict(attention=attention)
    full = train_mod.train(micro_config(tmp_path / "full", corpus, tmp_path / "cache", model=model), log=quiet)
    part = train_mod.train(micro_config(tmp_path / "part", corpus, tmp_path / "cache", model=model, stop_at=3),
                           log=quiet)
    assert part["stopped"] == "stop_at" and part["step"] == 3
    resumed = train_mod.train(micro_config(tmp_path / "part", corpus, tmp_path / "cache", model=model, resume=True),
                              log=quiet)
    assert resumed["step"] == 8 and resumed["stopped"] == "done"
    assert losses(tmp_path / "part") == losses(tmp_path / "full")  # exact, not approximate
    assert full["final_val_loss"] < 5.5


def test_run_outputs_and_generation(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    summary = train_mod.train(micro_config(out, corpus, tmp_path / "cache"), log=quiet)
    assert summary["step"] == 8
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8]
    for r in rows[1:]:
        assert {"step", "train_loss", "val_loss", "tokens_per_s"} <= set(r) and r["tokens_per_s"] > 0
    assert rows[0]["val_loss"] == pytest.approx(5.545, abs=0.05)  # ln 256: the initial model is uniform
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("model.safetensors", "state.pt", "config.json"):
        assert (out / "checkpoint" / name).exists()
    assert not list((out / "checkpoint").glob("*.tmp"))
    assert gen_mod.main(["--checkpoint", str(out), "--prompt", "def ", "--max-new-tokens", "12",
                         "--num-samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "sample 1" in printed and "tokens/s" in printed and "bytes per token per layer" in printed


def test_generate_is_the_cached_continuation(tmp_path, corpus):
    """Greedy decoding with the cache equals greedy decoding by repeated full forwards."""
    out = tmp_path / "run"
    train_mod.train(micro_config(out, corpus, tmp_path / "cache", max_steps=4), log=quiet)
    from tauformer_model.checkpoint import load_model

    model, _ = load_model(out / "checkpoint")
    prompt = torch.tensor([list(b"import os\n")])
    cached, stats = gen_mod.generate(model, prompt, 10, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq)
    assert stats["cache_bytes"] > 0


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, corpus, monkeypatch):
    from tauformer_model.model import TauGPT

    real_forward = TauGPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, **kwargs):
        out = real_forward(self, idx, targets, **kwargs)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] == 6:
                return out * float("nan")
        return out

    monkeypatch.setattr(TauGPT, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(train_mod.NonFiniteLoss, match="non-finite training loss"):
        train_mod.train(micro_config(out, corpus, tmp_path / "cache"), log=quiet)
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 4  # the last good checkpoint


def test_cli_flags_all_have_help_and_reach_the_config(tmp_path):
    parser = train_mod.build_parser()
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help, action.dest
    args = parser.parse_args(["--preset", "tiny", "--attention", "dot", "--recency", "fixed", "--n-kv-head", "2",
                              "--max-steps", "5", "--lr", "1e-3", "--learn-tau", "--out", str(tmp_path)])
    tc = train_mod.config_from_args(args)
    assert tc.model.attention == "dot" and tc.model.recency == "fixed" and tc.model.n_kv_head == 2
    assert tc.model.learn_tau and tc.max_steps == 5 and tc.lr == 1e-3
    assert tc.model.n_embd == 128 and tc.batch_size == 32  # the rest from the preset
    assert tc.model.n_head == 4  # dot keeps the preset's heads
    # the preset's taumode shape (model_taumode), unless a flag says otherwise
    tau = train_mod.config_from_args(parser.parse_args(["--preset", "tiny", "--out", str(tmp_path)]))
    assert tau.model.attention == "taumode" and (tau.model.n_head, tau.model.n_kv_head) == (8, 8)
    tau4 = train_mod.config_from_args(parser.parse_args(["--preset", "tiny", "--n-head", "4", "--n-kv-head", "4",
                                                         "--out", str(tmp_path)]))
    assert (tau4.model.n_head, tau4.model.n_kv_head, tau4.model.n_embd) == (4, 4, 128)
    tc30 = train_mod.config_from_args(parser.parse_args(["--preset", "30m", "--out", str(tmp_path)]))
    assert (tc30.model.n_layer, tc30.model.n_head, tc30.model.n_embd, tc30.model.block_size) == (6, 6, 384, 1024)
    # 30M as its name says: the BPE vocabulary the preset trains makes up the reference's count
    assert (tc30.tokenizer, tc30.bpe_vocab_size) == ("bpe", 25_000)
    with torch.device("meta"):
        model30 = TauGPT(dataclasses.replace(tc30.model, vocab_size=tc30.bpe_vocab_size), laplacian=torch.eye(64))
    assert 29.5e6 < model30.num_params() < 30.5e6
    assert 10.5e6 < model30.num_params() - model30.num_embedding_params() < 10.8e6


def test_data_split_is_by_file_and_cached(tmp_path, corpus):
    root, files = list_files(corpus)
    train_files, val_files = split_files(root, files)
    assert set(train_files).isdisjoint(val_files) and len(train_files) + len(val_files) == len(files)
    assert split_files(root, files) == (train_files, val_files)  # deterministic
    ds = load_dataset(str(corpus), str(tmp_path / "cache"), log=quiet)
    assert isinstance(ds.tokenizer, ByteTokenizer) and ds.train.dtype.name == "uint8"
    if val_files:  # split by file
        assert bytes(ds.val) == b"\n".join(p.read_bytes() for p in val_files)
    else:  # too few files for a file split: the last 5 % of the text
        text = b"\n".join(p.read_bytes() for p in files)
        assert bytes(ds.train) + bytes(ds.val) == text and len(ds.val) == len(text) // 20
    again = load_dataset(str(corpus), str(tmp_path / "cache"), log=pytest.fail)  # no re-tokenising
    assert again.folder == ds.folder
    x, y = ds.batch("train", 3, 16, torch.Generator().manual_seed(0))
    assert x.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_validation_windows_do_not_depend_on_the_seed(tmp_path, corpus):
    """Every seed is scored on the same val text: windows spread over the whole split, one model's val loss
    identical whatever the run's seed (it was drawn with tc.seed + 3, so each seed saw other text)."""
    ds = load_dataset(str(corpus), str(tmp_path / "cache"), log=quiet)
    starts = ds.evaluation_starts("val", 10, 32)
    assert starts[0] == 0 and starts[-1] == ds.last_start("val", 32) and starts == sorted(set(starts))
    x, y = ds.windows("val", [starts[-1]], 32)
    assert y.shape == (1, 32)  # the last window and its targets fit in the split
    model = TauGPTConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, block_size=32)
    torch.manual_seed(0)
    net = TauGPT(model)
    scores = [train_mod.evaluate(net, ds, micro_config(tmp_path, corpus, tmp_path / "cache", seed=seed), "cpu",
                                 contextlib.nullcontext, train_mod.Dist()) for seed in (1, 7, 1337)]
    assert scores[0] == scores[1] == scores[2]
    other = micro_config(tmp_path, corpus, tmp_path / "cache", eval_batches=3)  # more windows: other text
    assert train_mod.evaluate(net, ds, other, "cpu", contextlib.nullcontext, train_mod.Dist()) != scores[0]


def test_bpe_tokenizer(tmp_path, corpus):
    pytest.importorskip("tokenizers")
    ds = load_dataset(str(corpus), str(tmp_path / "cache"), tokenizer="bpe", vocab_size=300, log=quiet)
    assert ds.tokenizer.vocab_size == 300 and ds.train.dtype.name == "uint16"
    assert ds.tokenizer.decode(ds.tokenizer.encode("def f(x):\n    return x\n")) == "def f(x):\n    return x\n"
    assert len(ds.train) < 0.8 * sum(len(p.read_bytes()) for p in corpus.iterdir())  # it compresses


def test_compare_writes_the_side_by_side_table(tmp_path, corpus, capsys):
    from tauformer_model import compare

    out = tmp_path / "cmp"
    argv = ["--preset", "micro", "--out", str(out), "--variants", "dot,taumode,taumode+recency", "--max-steps", "4",
            "--seeds", "2", "--seed", "5", "--data", str(corpus), "--data-cache", str(tmp_path / "cache")]
    assert compare.main(argv) == 0
    text = (out / "table.md").read_text()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines()[2:]}
    assert set(rows) == {"dot", "taumode", "taumode+recency"}
    for name, cells in rows.items():
        assert cells[1] == "5, 6"  # both seeds, each in its own folder
        assert (out / name / "seed-5" / "metrics.jsonl").exists() and (out / name / "seed-6" / "checkpoint").exists()
        vals = [read_metrics(out / name / f"seed-{s}" / "metrics.jsonl")[-1]["val_loss"] for s in (5, 6)]
        assert cells[2] == mean_sd(vals) and " ± " in cells[2]
    assert rows["dot"][3] == "–" and rows["taumode"][3].endswith(" %")
    # micro: head dim 16, 1 kv head, fp32: V + λ = 17 × 4 bytes; K + V = 32 × 4 bytes
    assert rows["taumode+recency"][-1] == "68 |" and rows["dot"][-1] == "128 |"
    assert compare.main(argv) == 0  # finished runs are reused, not retrained
    assert capsys.readouterr().out.count("not retrained") == 6
    metrics = out / "dot" / "seed-6" / "metrics.jsonl"  # as if that run were still going: left out
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:-1]))
    assert compare.main([*argv, "--table-only"]) == 0
    assert "| dot | 5 | " in (out / "table.md").read_text()


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, corpus):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    cmd = [sys.executable, "-m", "tauformer_model.train", "--preset", "micro", "--data", str(corpus),
           "--data-cache", str(tmp_path / "cache"), "--out", str(out), "--max-steps", "100000",
           "--eval-every", "5", "--checkpoint-every", "100000", "--threads", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "interrupted: checkpoint saved" in output
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] >= 5


def test_domain_memory_workflow(tmp_path, corpus):
    """A run's keys over its corpus → a Laplacian (npz and the crate's parquet) → runs with it, named by
    --variant in compare; the first layer's keys are what the file was built from."""
    from tauformer_kernels import knn_laplacian, load_laplacian
    from tauformer_model import compare, laplacian_cli
    from tauformer_model.checkpoint import load_model

    base = ["--preset", "micro", "--max-steps", "4", "--seeds", "1", "--seed", "3", "--data", str(corpus),
            "--data-cache", str(tmp_path / "cache")]
    assert compare.main([*base, "--out", str(tmp_path / "dm"), "--variants", "chain",
                         "--variant", "chain=--laplacian chain"]) == 0
    run = tmp_path / "dm" / "chain" / "seed-3"
    out = tmp_path / "keys.npz"
    assert laplacian_cli.main(["--keys-from", str(run), "--windows", "3", "--out", str(out), "--k", "3"]) == 0
    keys = laplacian_cli.corpus_keys(str(run), None, 3)
    model, _ = load_model(run)
    assert keys.shape == (3 * model.config.block_size * model.config.n_kv_head, model.config.head_dim)
    assert torch.allclose(load_laplacian(out, dtype=torch.float64), knn_laplacian(keys, k=3, dtype=torch.float64))
    argv = [*base, "--out", str(tmp_path / "dm"), "--variants", "chain,corpus",
            "--variant", "chain=--laplacian chain", "--variant", f"corpus=--laplacian {out}"]
    assert compare.main(argv) == 0
    assert torch.equal(load_model(tmp_path / "dm" / "corpus" / "seed-3")[0].laplacian, load_laplacian(out))
    if importlib.util.find_spec("pyarrow"):
        crate = tmp_path / "crate" / "manifold.parquet"
        crate.parent.mkdir()
        assert laplacian_cli.main(["--keys-from", str(run), "--windows", "3", "--out", str(crate), "--k", "3"]) == 0
        assert torch.equal(load_laplacian(crate), load_laplacian(out)) and (crate.parent / "manifold.json").exists()
    with pytest.raises(SystemExit):
        compare.main([*base, "--variant", "no-equals-sign"])
