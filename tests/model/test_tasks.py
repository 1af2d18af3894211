"""The recall diagnostics (tauformer_model.tasks): every generator makes what it claims, and one command
writes the table."""

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
    wrong[:, -1] = tasks.BLANK  # the last query's answer (position 63 holds a repeated key)
    assert tasks.accuracy(Oracle(wrong), x, y) == pytest.approx(3 / 4)


def test_one_command_writes_every_row(tmp_path, capsys):
    out = tmp_path / "table.md"
    assert tasks.main(["--tasks", "mqar,needle", "--seeds", "2", "--steps", "2", "--batch-size", "4",
                       "--eval-size", "8", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Command: `python -m tauformer_model.tasks --tasks mqar,needle" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["variant", "chance", *tasks.DEFAULT_VARIANTS]
    header = rows[0].split(" | ")
    assert "mqar" in header and "needle L64 d0.9 |" in rows[0]
    assert len(header) == 2 + len(tasks.NEEDLE_DEPTHS) * len(tasks.NEEDLE_LENGTHS)
    assert all(" ± " in cell for r in rows[2:] for cell in r.split(" | ")[1:])  # 2 seeds: mean ± sd
    per_seed = json.loads(out.with_suffix(".json").read_text())
    assert set(per_seed["needle"]["dot"]) == {"0", "1"} and len(per_seed["needle"]["dot"]["1"]) == 6


def test_bad_arguments_name_the_flag(capsys):
    for argv, flag in ((["--tasks", "nope"], "--tasks"), (["--variants", "x"], "--variants"),
                       (["--seeds", "0"], "--seeds"), (["--steps", "-1"], "--steps")):
        with pytest.raises(SystemExit):
            tasks.main(argv)
        assert flag in capsys.readouterr().err
