"""The recall diagnostics (tauformer_model.tasks): every generator makes what it claims, and one command
writes the table."""

import argparse
import json

import pytest
import torch

from tauformer_model import tasks


@pytest.mark.parametrize("name", list(tasks.TASKS))
@pytest.mark.parametrize("length", [33, 64, 65])
def test_the_answer_is_in_the_sequence(name, length):
    """The task's solver, reading x alone, gives every answer of y (so a model can too), and the answers
    sit where the task says."""
    task = tasks.TASKS[name]
    x, y = task.make(16, length, torch.Generator().manual_seed(length))
    assert x.shape == y.shape == (16, length) and x.dtype == y.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < tasks.VOCAB
    assert torch.equal(task.solve(x), y)
    answers = y != tasks.IGNORE
    assert answers.any(dim=1).all()
    if name == "selective-copy":  # the 8 tokens after SEP, the content tokens in their order
        assert answers.sum(1).eq(8).all() and (x == tasks.SEP).sum(1).eq(1).all()
    elif name == "mqar":  # one answer per pair, at the repeated keys
        assert answers.sum(1).eq(4).all()
        assert (y[answers] >= tasks.FIRST_CONTENT + tasks.CONTENT // 2).all()  # values, never keys
    elif name == "needle":  # one answer, at the QUERY that ends x
        assert answers[:, -1].all() and answers.sum(1).eq(1).all() and (x[:, -1] == tasks.QUERY).all()
    else:  # induction: the repeat but its last token (its successor is past x)
        assert answers.sum(1).eq(length // 3 - 1).all()


def test_the_generators_are_not_trivial():
    """The solver is needed: the answer is not a fixed token, and other x give other y (a constant or a
    shifted copy of x would pass the solver check too)."""
    gen = torch.Generator().manual_seed(0)
    for task in tasks.TASKS.values():
        x, y = task.make(64, task.length, gen)
        answers = y[y != tasks.IGNORE]
        assert answers.unique().numel() > 10, task.name
        x2, y2 = task.make(64, task.length, gen)
        assert not torch.equal(y, y2)


@pytest.mark.parametrize("depth", tasks.NEEDLE_DEPTHS)
def test_needle_sits_at_its_depth(depth):
    x, y = tasks.needle(4, 64, torch.Generator().manual_seed(1), depth)
    at = (x == tasks.NEEDLE).int().argmax(1)
    assert (at == round(depth * 61)).all() and torch.equal(x[torch.arange(4), at + 1], y[:, -1])


def test_the_evaluation_sets_do_not_depend_on_the_training_seed():
    for task in tasks.TASKS.values():
        torch.manual_seed(123)
        first = task.eval_sets()
        torch.manual_seed(456)
        again = task.eval_sets()
        assert first.keys() == again.keys()
        assert all(torch.equal(first[k][0], again[k][0]) for k in first)
    assert len(tasks.TASKS["needle"].eval_sets()) == len(tasks.NEEDLE_DEPTHS) * len(tasks.NEEDLE_LENGTHS)


def test_accuracy_counts_only_the_answers():
    class Oracle(torch.nn.Module):  # predicts y where there is one, a wrong token elsewhere
        def __init__(self, y):
            super().__init__()
            self.y = y

        def forward(self, x):
            target = torch.where(self.y == tasks.IGNORE, 5, self.y)
            return torch.nn.functional.one_hot(target, tasks.VOCAB).float()

    x, y = tasks.mqar(8, 64, torch.Generator().manual_seed(2))
    assert tasks.accuracy(Oracle(y), x, y) == 1.0
    wrong = y.clone()
    last = (y != tasks.IGNORE).int().cumsum(1).argmax(1)  # each row's last answer (of 4)
    wrong[torch.arange(8), last] = tasks.BLANK
    assert tasks.accuracy(Oracle(wrong), x, y) == pytest.approx(3 / 4)


@pytest.mark.parametrize("pairs,queries,length", [(4, None, 32), (8, 8, 64), (4, 24, 32), (28, 28, 84)])
def test_mqar_pairs_then_lone_queries(pairs, queries, length):
    """Keys distinct, values distinct, each key queried at least once; after the pairs x holds only the queried
    keys and blanks, never a value (the earlier layout showed each answer after its query, so the last answers
    followed by elimination); the solver reads every answer off x."""
    x, y = tasks.mqar(32, length, torch.Generator().manual_seed(pairs), pairs, queries)
    keys, values, rest = x[:, 0:2 * pairs:2], x[:, 1:2 * pairs:2], x[:, 2 * pairs:]
    half = tasks.FIRST_CONTENT + tasks.CONTENT // 2
    assert (keys >= tasks.FIRST_CONTENT).all() and (keys < half).all() and (values >= half).all()
    for row in range(32):
        assert keys[row].unique().numel() == values[row].unique().numel() == pairs
        asked = rest[row][rest[row] != tasks.BLANK]
        assert asked.numel() == (queries or pairs) and set(asked.tolist()) == set(keys[row].tolist())
    assert ((rest == tasks.BLANK) | (rest < half)).all()  # no value after the pairs
    assert torch.equal((y != tasks.IGNORE)[:, 2 * pairs:], rest != tasks.BLANK) and (y[:, :2 * pairs] < 0).all()
    assert torch.equal(tasks.solve_mqar(x, pairs), y)


def test_mqar_refuses_what_does_not_fit():
    for pairs, queries, length in ((29, None, 100), (4, 3, 32), (8, None, 23), (4, 25, 32)):
        with pytest.raises(ValueError, match="mqar: need"):
            tasks.mqar(2, length, torch.Generator(), pairs, queries)


@pytest.mark.parametrize("depth", [0.1, 0.5])
def test_needle_depth_at_length_256(depth):
    """At 256 tokens the needle at depth 0.1 sits ~230 tokens before the QUERY (what a recency bias must
    overcome)."""
    x, y = tasks.needle(8, 256, torch.Generator().manual_seed(3), depth)
    at = (x == tasks.NEEDLE).int().argmax(1)
    assert (at == round(depth * 253)).all() and (x == tasks.NEEDLE).sum(1).eq(1).all()
    assert torch.equal(x[torch.arange(8), at + 1], y[:, -1]) and (x[:, -1] == tasks.QUERY).all()
    assert torch.equal(tasks.solve_needle(x), y)


def test_needle_training_queries_come_after_the_value():
    """queries > 1: more QUERY tokens, all after v, each answered with v in y, never shown in x after NEEDLE."""
    x, y = tasks.needle(64, 64, torch.Generator().manual_seed(4), queries=8)
    at = (x == tasks.NEEDLE).int().argmax(1)
    value = x[torch.arange(64), at + 1]
    asked = x == tasks.QUERY
    assert torch.equal(asked, y != tasks.IGNORE) and (y[asked] == value[:, None].expand_as(y)[asked]).all()
    assert asked[:, -1].all() and asked.sum(1).max() == 8 and asked.sum(1).float().mean() > 6
    first = asked.int().argmax(1)
    assert (first > at + 1).all()
    assert torch.equal(tasks.solve_needle(x), y)


def test_flags_replace_a_tasks_settings():
    ns = argparse.Namespace(steps=5, batch_size=None, eval_size=7, lr=1e-2, width=32, length=48, pairs=8,
                            queries=16, needle_lengths=(32, 256), needle_depths=(0.1,), needle_queries=4)
    mqar = tasks.configured("mqar", ns)
    assert (mqar.length, mqar.options, mqar.run.steps, mqar.run.lr, mqar.run.n_embd) == (
        48, {"pairs": 8, "queries": 16}, 5, 1e-2, 32)
    assert mqar.run.batch_size == tasks.TASKS["mqar"].run.batch_size  # not given: the task's own
    needle = tasks.configured("needle", ns)
    assert needle.lengths == (32, 256) and needle.block_size == 256 and needle.train_options == {"queries": 4}
    assert list(needle.eval_sets(3)) == ["L32 d0.1", "L256 d0.1"]
    assert needle.settings()["lengths"] == [32, 256] and "length" not in needle.settings()
    assert tasks.TASKS["mqar"].options == {"pairs": 4, "queries": 24}  # TASKS itself unchanged


def test_one_command_writes_every_row(tmp_path, capsys):
    out = tmp_path / "table.md"
    assert tasks.main(["--tasks", "mqar,needle", "--seeds", "2", "--steps", "2", "--batch-size", "4",
                       "--eval-size", "8", "--needle-lengths", "32,64", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Command: `python -m tauformer_model.tasks --tasks mqar,needle" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["variant", "chance", *tasks.DEFAULT_VARIANTS]
    header = rows[0].split(" | ")
    assert "mqar" in header and "needle L64 d0.9 |" in rows[0]
    assert len(header) == 2 + len(tasks.NEEDLE_DEPTHS) * 2  # mqar, and the needle at 2 lengths
    assert all(" ± " in cell and cell.rstrip(" |").endswith("/2)") for r in rows[2:]
               for cell in r.split(" | ")[1:])  # 2 seeds: mean ± sd (seeds solved/2)
    settings = "- mqar: {'length': 32, 'pairs': 4, 'queries': 24, 'steps': 2, 'batch_size': 4"
    assert settings in text and "- needle: {'lengths': [32, 64]" in text  # every task's settings
    per_seed = json.loads(out.with_suffix(".json").read_text())
    assert set(per_seed["needle"]["dot"]) == {"0", "1"} and len(per_seed["needle"]["dot"]["1"]) == 6


def test_bad_arguments_name_the_flag(capsys):
    for argv, flag in ((["--tasks", "nope"], "--tasks"), (["--variants", "x"], "--variants"),
                       (["--seeds", "0"], "--seeds"), (["--steps", "-1"], "--steps")):
        with pytest.raises(SystemExit):
            tasks.main(argv)
        assert flag in capsys.readouterr().err
