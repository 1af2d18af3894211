"""Adaptive tau (train's --recalibrate-tau-every): tau recalibrated at the scheduled steps only, the same schedule
after --resume (micro runs: seconds on a CPU)."""

import pytest
from test_model_train import micro_config, quiet

from tauformer_model import train as train_mod
from tauformer_model.common import read_metrics
from tauformer_model.compare import main as compare_main
from tauformer_model.variants import VARIANTS, as_flags


def taus(out) -> list[tuple[int, float]]:
    """(step, tau) of every evaluation row."""
    return [(r["step"], r["tau"]) for r in read_metrics(out / "metrics.jsonl")]


def run(tmp_path, corpus, name, **kw):
    tc = micro_config(tmp_path / name, corpus, tmp_path / "cache", eval_every=1, **kw)
    return train_mod.train(tc, log=quiet), taus(tmp_path / name)


def test_tau_changes_at_the_scheduled_steps_only(tmp_path, corpus):
    """Every 3 steps of 8: the tau evaluated at steps 0-3 is the start's, at 4-6 the one set before step 4, at 7-8
    the one set before step 7 (each evaluation sees the tau its step trained with); without the option, one tau."""
    _, fixed = run(tmp_path, corpus, "fixed")
    assert len({tau for _, tau in fixed}) == 1
    _, adaptive = run(tmp_path, corpus, "adaptive", recalibrate_tau_every=3)
    assert [s for s, _ in adaptive] == list(range(9))
    by_step = dict(adaptive)
    assert by_step[0] == fixed[0][1]  # the start's calibration is the same batch as without the option
    groups = [[by_step[s] for s in steps] for steps in ([0, 1, 2, 3], [4, 5, 6], [7, 8])]
    assert all(len(set(g)) == 1 for g in groups)
    assert groups[0][0] != groups[1][0] != groups[2][0]


def test_training_batches_do_not_depend_on_the_schedule(tmp_path, corpus):
    """Recalibration draws its own batch, not from the sampler: the losses before the first recalibration (steps 1,
    2) are those of the run without it, and the runs part after it (tau moves the loss little in a micro model)."""
    run(tmp_path, corpus, "fixed")
    run(tmp_path, corpus, "adaptive", recalibrate_tau_every=2)
    fixed, adaptive = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("fixed", "adaptive"))
    assert [r["train_loss"] for r in fixed[:3]] == [r["train_loss"] for r in adaptive[:3]]
    assert [r["val_loss"] for r in fixed[4:]] != [r["val_loss"] for r in adaptive[4:]]


@pytest.mark.parametrize("stop_at", [3, 4])
def test_resume_keeps_the_schedule(tmp_path, corpus, stop_at):
    """Stopped at a recalibration step (3) or just after one (4), then resumed with no flag but --resume: the same
    taus and losses as the unbroken run (the schedule is in the checkpoint's train config)."""
    run(tmp_path, corpus, "full", recalibrate_tau_every=3)
    run(tmp_path, corpus, "part", recalibrate_tau_every=3, stop_at=stop_at)
    # the command line, as a run is resumed: the flags not given again come from the checkpoint's config
    assert train_mod.main(["--resume", "--out", str(tmp_path / "part"), "--no-progress"]) == 0
    def trained(name):  # what the run computed (its timings differ)
        return [(r["step"], r["train_loss"], r["val_loss"], r["tau"]) for r in read_metrics(tmp_path / name /
                                                                                         "metrics.jsonl")]

    assert trained("part") == trained("full")  # exact, not approximate


def test_bad_uses_are_refused_by_name(tmp_path, corpus):
    for model, kw in ((dict(attention="dot"), {}), (dict(learn_tau=True), {}),
                      (dict(tau_rule="vector-median"), {}), ({}, dict(fsdp=True))):
        tc = micro_config(tmp_path / "bad", corpus, tmp_path / "cache", recalibrate_tau_every=3, model=model, **kw)
        with pytest.raises(ValueError, match="--recalibrate-tau-every 3"):
            train_mod.train(tc, log=quiet)
    with pytest.raises(SystemExit):  # the command line: argparse's error names the flag
        train_mod.main(["--preset", "micro", "--attention", "dot", "--recalibrate-tau-every", "3",
                        "--out", str(tmp_path / "cli")])


def test_the_variant_sets_the_training_option():
    flags = as_flags(VARIANTS["taumode+recency+adaptive-tau"])
    tc = train_mod.config_from_args(train_mod.build_parser().parse_args(["--preset", "micro", *flags]))
    assert tc.recalibrate_tau_every > 0 and tc.model.attention == "taumode"


def test_compare_gives_the_paired_gap_to_each_reference(tmp_path, corpus):
    """The variant's row in compare's table, with --gaps-to dot,taumode+recency: one gap column per reference,
    each the mean of the per-seed relative gaps (one seed here: the gap itself)."""
    out = tmp_path / "cmp"
    names = ["dot", "taumode+recency", "taumode+recency+adaptive-tau"]
    argv = ["--preset", "micro", "--out", str(out), "--variants", ",".join(names), "--max-steps", "4", "--seeds", "1",
            "--seed", "5", "--data", str(corpus), "--data-cache", str(tmp_path / "cache"),
            "--gaps-to", "dot,taumode+recency"]
    assert compare_main(argv) == 0
    lines = (out / "table.md").read_text().splitlines()
    assert "| vs dot (paired by seed) | vs taumode+recency (paired by seed) |" in lines[0]
    val = {n: read_metrics(out / n / "seed-5" / "metrics.jsonl")[-1]["val_loss"] for n in names}
    cells = next(line for line in lines if line.startswith("| taumode+recency+adaptive-tau |")).split(" | ")
    for cell, reference in zip(cells[3:5], ("dot", "taumode+recency")):
        assert cell == f"{100 * (val['taumode+recency+adaptive-tau'] / val[reference] - 1):.2f} %"
    assert read_metrics(out / names[2] / "seed-5" / "metrics.jsonl")[-1]["tau"] > 0
    with pytest.raises(SystemExit):  # a reference that is not among the variants
        compare_main([*argv, "--table-only", "--gaps-to", "taumode"])
