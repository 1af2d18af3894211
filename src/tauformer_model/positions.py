"""Loss by position: does a model use long context, i.e. does its loss keep falling deeper into the window?
``python -m tauformer_model.positions RUN [RUN ...] --out FILE.md [--plot FILE.png]``

For every trained run folder (its checkpoint), the per-token cross-entropy on the same fixed val windows the
trainer scores (train.evaluate: Dataset.evaluation_starts over eval_batches × batch_size windows), averaged over
the windows at each position. Position p is the p-th token of a window: the model predicts the token after it
having seen p tokens (with --pack-documents the tokens seen of its own document, where attention and RoPE
restart). Runs are grouped into variants by folder (compare's <out>/<variant>/seed-<seed> layout; a folder not
named seed-N is a variant of its own) and summarised as mean ± sd over the seeds: a table over position bins
1, 2, 3-4, 5-8, ... (ending at powers of two), the gap to the first variant paired by seed, and a plot of loss against
position. A folder holding compare's layout (e.g. runs/evidence) stands for all of its runs.

The mean over positions of a dense run is its val loss at the checkpoint's step (train.evaluate); the table says
how far from metrics.jsonl's it is.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import re
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, find_checkpoint, load_model, load_state
from .common import mean_sd, positive_int, print0, read_metrics, resolve_device
from .data import DataError, Dataset, load_dataset
from .train import TrainConfig, read_batch

SEED_FOLDER = re.compile(r"seed-(-?\d+)")


@dataclass
class PositionLoss:
    """One run's per-token val loss summed and counted by position (index p - 1 holds position p)."""

    run: pathlib.Path
    variant: str
    seed: int
    step: int  # the checkpoint's
    loss_sum: np.ndarray  # float64 (T,)
    count: np.ndarray  # int64 (T,)
    logged_val_loss: float | None  # metrics.jsonl's val loss at `step` (None: no row there)
    # (windows, T) loss of every token of a dense run (None with --pack-documents): how much of a bin's mean is the
    # particular val text, which every seed and variant shares and the sd over seeds therefore never shows
    per_window: np.ndarray | None = None

    @property
    def by_position(self) -> np.ndarray:
        """Mean loss at each position (nan where no token sat there: packed documents shorter than the window)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.loss_sum / self.count

    @property
    def mean(self) -> float:
        """The mean over all scored tokens: train.evaluate's val loss for a dense run."""
        return float(self.loss_sum.sum() / self.count.sum())


def positions_in_document(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) 0-based position of every token inside its document within the window (where packed training
    restarts attention and RoPE): t minus the index of the first token of the same document in the row."""
    T = doc_ids.size(1)
    index = torch.arange(T).expand_as(doc_ids)
    starts_here = torch.ones_like(doc_ids, dtype=torch.bool)
    starts_here[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts_here, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


@torch.no_grad()
def loss_by_position(model, dataset: Dataset, tc: TrainConfig,
                     device) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Sums and counts of the per-token val loss by position over train.evaluate's windows (the same windows, in
    the same batches, with the same document ids), on one process without autocast (fp32); and the (windows, T)
    losses themselves for a dense run (None with --pack-documents, where positions restart inside a window)."""
    model.eval()
    T, size = tc.model.block_size, tc.batch_size
    starts = dataset.evaluation_starts("val", tc.eval_batches * size, T)
    loss_sum, count = torch.zeros(T, dtype=torch.float64), torch.zeros(T, dtype=torch.int64)
    rows = []
    for i in range(tc.eval_batches):
        x, y, doc_ids = read_batch(dataset, "val", starts[i * size:(i + 1) * size], tc, device)
        logits = model(x, doc_ids=doc_ids)
        # the cross-entropy TauGPT.logits takes the mean of, kept per token
        losses = F.cross_entropy(logits.flatten(0, 1), y.reshape(-1), reduction="none").view_as(y).cpu().double()
        where = torch.arange(T).expand_as(y) if doc_ids is None else positions_in_document(doc_ids)
        loss_sum.index_add_(0, where.reshape(-1), losses.reshape(-1))
        count.index_add_(0, where.reshape(-1), torch.ones(where.numel(), dtype=torch.int64))
        rows.append(losses)
    return loss_sum.numpy(), count.numpy(), None if tc.pack_documents else torch.cat(rows).numpy()


def train_config(folder: pathlib.Path) -> tuple[TrainConfig, int]:
    """The run's TrainConfig (as its checkpoint saved it) and the checkpoint's step."""
    state = load_state(folder)
    saved = dict(state["train_config"])
    saved.pop("model")
    names = set(TrainConfig.__dataclass_fields__) - {"model"}
    tc = TrainConfig(**{k: v for k, v in saved.items() if k in names})
    return tc, int(state["step"])


def expand_runs(paths: list[str]) -> list[pathlib.Path]:
    """The run folders named: each path with a checkpoint is one; one without that holds compare's layout
    (<variant>/seed-<seed>/ with checkpoints) stands for those, variants and seeds sorted."""
    runs = []
    for given in paths:
        path = pathlib.Path(given)
        if find_checkpoint(path) is not None:
            runs.append(path)
            continue
        found = sorted((p for p in path.glob("*/seed-*") if SEED_FOLDER.fullmatch(p.name) and find_checkpoint(p)),
                       key=lambda p: (p.parent.name, int(p.name[5:])))
        if not found:
            raise CheckpointError(f"{given}: neither a run folder with a checkpoint nor a folder of "
                                  "<variant>/seed-<seed> runs (compare's --out)")
        runs += found
    return runs


def measure(folder: pathlib.Path, device, cache_dir: str | None, log=print0) -> PositionLoss:
    """One run's PositionLoss: its checkpoint's model on its own data's val windows."""
    tc, step = train_config(folder)
    model, _ = load_model(folder, device)
    tc.model = model.config
    dataset = load_dataset(tc.data, cache_dir or tc.data_cache, tc.tokenizer, tc.bpe_vocab_size, log=log)
    loss_sum, count, per_window = loss_by_position(model, dataset, tc, device)
    seed = int(m.group(1)) if (m := SEED_FOLDER.fullmatch(folder.name)) else tc.seed
    variant = folder.parent.name if m else folder.name
    rows = [r for r in read_metrics(folder / "metrics.jsonl") if r["step"] == step]
    return PositionLoss(folder, variant, seed, step, loss_sum, count, rows[-1]["val_loss"] if rows else None,
                        per_window)


def check_comparable(runs: list[pathlib.Path]) -> None:
    """ValueError naming the runs whose val windows differ from the first run's (data, tokenizer, context,
    number of windows, packing): their positions would average over different text."""
    def key(folder):
        state = load_state(folder)["train_config"]
        return (state.get("data"), state.get("tokenizer"), state.get("bpe_vocab_size") if state.get("tokenizer") ==
                "bpe" else None, state["model"]["block_size"], state["batch_size"] * state["eval_batches"],
                state.get("pack_documents", False))

    first = key(runs[0])
    odd = [str(r) for r in runs[1:] if key(r) != first]
    if odd:
        raise ValueError(f"these runs are scored on other val windows than {runs[0]} (data, tokenizer, block_size, "
                         f"eval_batches × batch_size or --pack-documents differ): {', '.join(odd)}")


def position_bins(block_size: int) -> list[tuple[int, int]]:
    """Positions 1, 2, 3-4, 5-8, ..., each bin ending at a power of two (1-based, inclusive), the last at
    block_size: for a power-of-two window the last bin is its second half."""
    bins, hi = [(1, 1)], 1
    while hi < block_size:
        bins.append((hi + 1, min(2 * hi, block_size)))
        hi = bins[-1][1]
    return bins[:block_size]


def bin_mean(result: PositionLoss, lo: int, hi: int) -> float:
    """Mean loss of the tokens at positions lo..hi (every token weighs alike)."""
    return float(result.loss_sum[lo - 1:hi].sum() / result.count[lo - 1:hi].sum())


def window_se(results: list[PositionLoss], score) -> str:
    """The standard error that the choice of val windows puts on ``score`` (a function of a (windows, T) loss
    array's rows, giving one value per window): sd over the windows / √windows, the mean over the dense runs;
    "–" without any."""
    errors = [float(np.std(score(r.per_window), ddof=1) / math.sqrt(len(r.per_window)))
              for r in results if r.per_window is not None and len(r.per_window) > 1]
    return f"{sum(errors) / len(errors):.3f}" if errors else "–"


def group(results: list[PositionLoss]) -> dict[str, dict[int, PositionLoss]]:
    """variant -> seed -> result, variants in the order they first appear."""
    grouped: dict[str, dict[int, PositionLoss]] = {}
    for r in results:
        by_seed = grouped.setdefault(r.variant, {})
        if r.seed in by_seed:
            raise ValueError(f"{r.run} and {by_seed[r.seed].run}: two runs of variant {r.variant!r} with seed {r.seed}")
        by_seed[r.seed] = r
    return grouped


def label(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def tables(grouped: dict[str, dict[int, PositionLoss]], bins: list[tuple[int, int]]) -> str:
    """Markdown: loss by position bin (mean ± sd over seeds), the paired gap to the first variant, and the runs."""
    reference = next(iter(grouped))
    head = "| variant | seeds | step | " + " | ".join(label(*b) for b in bins) + " | all positions |"
    rule = "|---" * (len(bins) + 4) + "|"
    lines = ["### Val loss by position (nats per token, mean ± sd over seeds)", "", head, rule]
    for name, by_seed in grouped.items():
        cells = [mean_sd([bin_mean(r, *b) for r in by_seed.values()], 3) for b in bins]
        steps = sorted({r.step for r in by_seed.values()})
        lines.append(f"| {name} | {', '.join(map(str, by_seed))} | {'/'.join(map(str, steps))} | "
                     + " | ".join(cells) + f" | {mean_sd([r.mean for r in by_seed.values()], 4)} |")
    every = [r for by_seed in grouped.values() for r in by_seed.values()]
    lines.append("| standard error from the choice of val windows | | | " + " | ".join(
        window_se(every, lambda w, b=b: w[:, b[0] - 1:b[1]].mean(1)) for b in bins)
        + f" | {window_se(every, lambda w: w.mean(1))} |")
    # how much the loss still falls at the end of the window: the last bin against the one before it
    if len(bins) > 1:
        (plo, phi), (llo, lhi) = bins[-2], bins[-1]
        lines += ["", f"### Does the loss keep falling? Last bin ({label(llo, lhi)}) minus the one before "
                  f"({label(plo, phi)}), and the first bin ({label(*bins[0])}) minus the last", "",
                  "| variant | last − before (nats, mean ± sd) | its standard error from the choice of val windows | "
                  "seeds where it fell | first − last (nats) |",
                  "|---|---|---|---|---|"]
        for name, by_seed in grouped.items():
            falls = [bin_mean(r, llo, lhi) - bin_mean(r, plo, phi) for r in by_seed.values()]
            spans = [bin_mean(r, *bins[0]) - bin_mean(r, llo, lhi) for r in by_seed.values()]
            # paired by window: the same text at both bins, so the error is that of the difference
            se = window_se(list(by_seed.values()), lambda w: w[:, llo - 1:lhi].mean(1) - w[:, plo - 1:phi].mean(1))
            lines.append(f"| {name} | {mean_sd(falls, 4)} | {se} | {sum(f < 0 for f in falls)} of {len(falls)} | "
                         f"{mean_sd(spans, 3)} |")
    if len(grouped) > 1:
        lines += ["", f"### Gap to {reference} by position (nats, this variant minus {reference}, paired by seed)", "",
                  "| variant | seeds | " + " | ".join(label(*b) for b in bins) + " | all positions |",
                  "|---" * (len(bins) + 3) + "|"]
        for name, by_seed in list(grouped.items())[1:]:
            paired = [s for s in by_seed if s in grouped[reference]]
            if not paired:
                lines.append(f"| {name} | (no seed in common with {reference}) |")
                continue
            ref = grouped[reference]
            cells = [mean_sd([bin_mean(by_seed[s], *b) - bin_mean(ref[s], *b) for s in paired], 3) for b in bins]
            total = mean_sd([by_seed[s].mean - ref[s].mean for s in paired], 4)
            lines.append(f"| {name} | {', '.join(map(str, paired))} | " + " | ".join(cells) + f" | {total} |")
    lines += ["", "### Runs", "", "| run | step | tokens scored | mean over positions | metrics.jsonl val loss "
              "at that step | difference |", "|---|---|---|---|---|---|"]
    for by_seed in grouped.values():
        for r in by_seed.values():
            logged = "–" if r.logged_val_loss is None else f"{r.logged_val_loss:.6f}"
            diff = "–" if r.logged_val_loss is None else f"{r.mean - r.logged_val_loss:.1e}"
            lines.append(f"| {r.run} | {r.step} | {int(r.count.sum())} | {r.mean:.6f} | {logged} | {diff} |")
    return "\n".join(lines)


def plot_bins(block_size: int, per_octave: int = 4) -> list[tuple[int, int]]:
    """Finer bins for the plot: about `per_octave` per doubling of the position, none empty."""
    edges = sorted({round(2 ** (k / per_octave)) for k in range(int(per_octave * math.log2(block_size)) + 1)})
    edges = [e for e in edges if e <= block_size] + [block_size + 1]
    return [(lo, hi - 1) for lo, hi in zip(edges, edges[1:])]


def write_plot(path: pathlib.Path, grouped: dict[str, dict[int, PositionLoss]], block_size: int) -> None:
    """Loss against position (log axis): the mean over seeds of each variant with a band of ± sd; below it, each
    variant minus the first paired by seed, where the val text (the same for every line, the plot's zigzag)
    cancels. matplotlib's Agg canvas, no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax, gap_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    bins = plot_bins(block_size)
    centres = [math.sqrt(lo * hi) for lo, hi in bins]
    reference = next(iter(grouped))

    def band(axes, per_seed: np.ndarray, name: str) -> None:
        mean = per_seed.mean(0)
        sd = per_seed.std(0, ddof=1) if len(per_seed) > 1 else np.zeros_like(mean)
        axes.plot(centres, mean, marker=".", label=f"{name} ({len(per_seed)} seeds)")
        axes.fill_between(centres, mean - sd, mean + sd, alpha=0.2)

    for name, by_seed in grouped.items():
        band(ax, np.array([[bin_mean(r, *b) for b in bins] for r in by_seed.values()]), name)
        paired = [s for s in by_seed if s in grouped[reference]]
        if name != reference and paired:
            band(gap_ax, np.array([[bin_mean(by_seed[s], *b) - bin_mean(grouped[reference][s], *b) for b in bins]
                                   for s in paired]), name)
        else:  # keeps each variant's colour the same in both panels
            gap_ax.plot([], [])
    gap_ax.axhline(0.0, color="black", linewidth=0.8)
    gap_ax.set_xscale("log", base=2)
    gap_ax.set_xlabel("position in the window (tokens seen)")
    gap_ax.set_ylabel(f"minus {reference} (nats, paired by seed)")
    ax.set_ylabel("val loss (nats per token)")
    ax.set_title("Val loss by position (mean ± sd over seeds)")
    for axes in (ax, gap_ax):
        axes.grid(alpha=0.3, which="both")
    ax.legend()
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:  # a failed write leaves no half plot behind
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tauformer_model.positions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run folders (with a checkpoint), or a folder of compare's <variant>/seed-<seed> runs; "
                        "the first variant is the reference of the gaps")
    p.add_argument("--out", required=True, help="the markdown file written (tables)")
    p.add_argument("--plot", default=None, help="the PNG written (default: loss_by_position.png beside --out)")
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'auto', ...")
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--data-cache", default=None, help="where tokenised corpora are cached (default: each run's)")
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    if out.suffix != ".md":
        p.error(f"--out {args.out}: a markdown file (.md) is written there")
    plot = pathlib.Path(args.plot) if args.plot else out.with_name("loss_by_position.png")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        runs = expand_runs(args.runs)
        check_comparable(runs)
        results = []
        for folder in runs:
            results.append(measure(folder, device, args.data_cache))
            r = results[-1]
            print0(f"{folder}: step {r.step}, mean over positions {r.mean:.6f} (metrics.jsonl "
                   f"{r.logged_val_loss if r.logged_val_loss is not None else '–'})")
        grouped = group(results)
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as e:
        print0(f"error: {e}", file=sys.stderr)
        return 1
    block_size = len(results[0].count)
    text = tables(grouped, position_bins(block_size))
    out.parent.mkdir(parents=True, exist_ok=True)
    plot.parent.mkdir(parents=True, exist_ok=True)
    write_plot(plot, grouped, block_size)
    out.write_text(f"Loss by position over {len(results)} runs, context {block_size}; plot: {plot.name}\n\n"
                   + text + "\n")
    print0(text)
    print0(f"wrote {out} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
