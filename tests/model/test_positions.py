"""Loss by position (tauformer_model.positions): per-token losses attributed to the right positions, their mean
equal to train.evaluate's val loss, the tables' arithmetic, the command line (micro runs: seconds on a CPU)."""

import contextlib

import numpy as np
import pytest
import torch
from test_model_train import micro_config, quiet

from tauformer_model import positions as pos
from tauformer_model import train as train_mod
from tauformer_model.checkpoint import load_model
from tauformer_model.common import read_metrics
from tauformer_model.data import load_dataset


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """compare's layout: dot/seed-1, dot/seed-2, taumode/seed-1 (4 steps of the micro model, context 32), and a
    run at context 16 (other val windows)."""
    root = tmp_path_factory.mktemp("positions")
    cache = root / "cache"
    for variant, seed in (("dot", 1), ("dot", 2), ("taumode", 1)):
        tc = micro_config(root / "cmp" / variant / f"seed-{seed}", corpus, cache, seed=seed, max_steps=4,
                          model=dict(attention=variant))
        train_mod.train(tc, log=quiet)
    train_mod.train(micro_config(root / "short", corpus, cache, max_steps=2, model=dict(block_size=16)), log=quiet)
    return root


@pytest.mark.parametrize("variant", ["dot", "taumode"])
def test_positions_are_the_prefix_models_losses_and_average_to_the_val_loss(runs, variant):
    """Position p's loss is, window by window, the cross-entropy of the model run on the window's first p tokens
    alone (an independent path: a forward per prefix, log-sum-exp by hand); the mean over positions is
    train.evaluate's val loss and the one metrics.jsonl logged, to 1e-6."""
    folder = runs / "cmp" / variant / "seed-1"
    result = pos.measure(folder, "cpu", None, log=quiet)
    tc, step = pos.train_config(folder)
    model, _ = load_model(folder)
    tc.model = model.config
    dataset = load_dataset(tc.data, tc.data_cache, tc.tokenizer, tc.bpe_vocab_size, log=quiet)
    T = tc.model.block_size
    assert step == 4 and result.count.tolist() == [tc.eval_batches * tc.batch_size] * T

    starts = dataset.evaluation_starts("val", tc.eval_batches * tc.batch_size, T)
    x, y = dataset.windows("val", starts, T)
    by_hand = np.zeros(T)
    model.eval()
    with torch.no_grad():
        for p in range(1, T + 1):
            last = model(x[:, :p])[:, -1].double()  # logits predicting the token after position p
            ce = torch.logsumexp(last, -1) - last.gather(1, y[:, p - 1:p]).squeeze(1)
            by_hand[p - 1] = float(ce.mean())
    np.testing.assert_allclose(result.by_position, by_hand, rtol=0, atol=2e-5)
    assert result.per_window.shape == (len(starts), T)
    np.testing.assert_allclose(result.per_window.mean(0), result.by_position, rtol=0, atol=1e-12)

    evaluated = train_mod.evaluate(model, dataset, tc, "cpu", contextlib.nullcontext, train_mod.Dist())
    assert result.mean == pytest.approx(evaluated, abs=1e-6)
    assert result.logged_val_loss == read_metrics(folder / "metrics.jsonl")[-1]["val_loss"]
    assert result.mean == pytest.approx(result.logged_val_loss, abs=1e-6)


def test_positions_inside_packed_documents():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [3, 3, 3, 3, 3, 3], [4, 5, 6, 6, 7, 7]])
    assert pos.positions_in_document(doc_ids).tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5],
                                                           [0, 0, 0, 1, 0, 1]]


def fake(variant, seed, losses, counts=None):
    losses = np.asarray(losses, dtype=np.float64)
    counts = np.ones(len(losses), dtype=np.int64) if counts is None else np.asarray(counts)
    return pos.PositionLoss(pos.pathlib.Path(f"{variant}/seed-{seed}"), variant, seed, 10, losses * counts, counts,
                            None)


def test_bins_and_tables_by_hand():
    assert pos.position_bins(8) == [(1, 1), (2, 2), (3, 4), (5, 8)]
    assert pos.position_bins(6) == [(1, 1), (2, 2), (3, 4), (5, 6)]
    # a bin's mean weighs tokens, not positions: positions 3 (2 tokens of 1.0) and 4 (1 token of 4.0)
    assert pos.bin_mean(fake("a", 1, [0, 0, 1.0, 4.0], [1, 1, 2, 1]), 3, 4) == pytest.approx(2.0)
    grouped = pos.group([fake("a", 1, [4, 3, 2, 2]), fake("a", 2, [6, 5, 4, 0]),
                         fake("b", 1, [4, 3, 2, 1]), fake("b", 2, [5, 5, 5, 5])])
    text = pos.tables(grouped, pos.position_bins(4))
    # a: position 1 mean of 4 and 6 = 5 ± 1.414; positions 3-4: 2 and 2 -> 2.000 ± 0.000; all: 2.75, 3.75
    assert ("| a | 1, 2 | 10 | 5.000 ± 1.414 | 4.000 ± 1.414 | 2.000 ± 0.000 | 3.2500 ± 0.7071 |") in text
    # b minus a, paired by seed: position 1: 0 and -1; positions 3-4: -0.5 and 3; all positions: -0.25 and 1.25
    gap = [line for line in text.splitlines() if line.startswith("| b | 1, 2 |")][-1]
    assert gap.startswith("| b | 1, 2 | -0.500 ± 0.707 | 0.000 ± 0.000 | 1.250 ± 2.475 | 0.5000 ± 1.0607 |")
    fall = [line for line in text.splitlines() if line.startswith("| a | ") and "of 2" in line][0]
    # last bin (3-4) minus the one before (2): 2 - 3 and 2 - 5
    assert fall.startswith("| a | -2.0000 ± 1.4142 | – | 2 of 2 |")  # no per-window losses: no window error
    # the windows' standard error: 4 windows whose position-1 losses are 1, 2, 3, 6: sd 2.160 / √4
    windows = fake("w", 1, [3.0, 0.0])
    windows.per_window = np.array([[1.0, 0], [2, 0], [3, 0], [6, 0]])
    assert pos.window_se([windows], lambda w: w[:, 0]) == "1.080"
    assert "| standard error from the choice of val windows | | | 1.080 | 0.000 | 0.540 |" in pos.tables(
        pos.group([windows]), pos.position_bins(2))
    with pytest.raises(ValueError, match="seed 1"):
        pos.group([fake("a", 1, [1.0]), fake("a", 1, [2.0])])


def test_command_line(runs, tmp_path, capsys):
    out = tmp_path / "table.md"
    assert pos.main([str(runs / "cmp"), "--out", str(out), "--threads", "1"]) == 0
    text = out.read_text()
    assert "| dot | 1, 2 | 4 |" in text and "| taumode | 1 | 4 |" in text and "Gap to dot" in text
    assert (tmp_path / "loss_by_position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # runs scored on other windows (context 16) are refused by name
    assert pos.main([str(runs / "cmp" / "dot" / "seed-1"), str(runs / "short"), "--out", str(out)]) == 1
    assert f"{runs / 'short'}" in capsys.readouterr().err
    assert pos.main([str(tmp_path), "--out", str(out)]) == 1  # no runs there
    with pytest.raises(SystemExit):
        pos.main([str(runs / "short"), "--out", str(tmp_path / "table.txt")])
